"""Training fused models: layer-wise task-specific tuning (distillation from the original model)."""

from .distill import distill, hidden_state_error

__all__ = ["distill", "hidden_state_error"]
