"""Sparse upcycling: a dense LLaMA-style decoder becomes a Mixtral-style Mixture-of-Experts.

Every expert starts as a copy of the layer's dense MLP and every router starts at zero. A zero router
scores the experts equally, the top-k weights are renormalised to sum to one, and the chosen experts are
identical, so the MoE computes exactly the dense model's function; fine-tuning then lets them diverge.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from torch.nn.utils import parametrize

from .errors import UserError, check_loaded

UPCYCLABLE = ("llama", "mistral")  # SwiGLU MLPs, RMSNorm, bias-free attention: Mixtral's layer


def check_counts(num_experts: int, top_k: int) -> None:
    """Refuse expert counts no MoE has (the command checks them before it loads the model)."""
    if not 1 <= top_k <= num_experts:
        raise UserError(
            "the experts per token (top_k, --top-k) must be at least 1 and at most the experts per layer "
            f"(num_experts, --experts); got {top_k} of {num_experts}"
        )


def upcycle(model: nn.Module, num_experts: int = 4, top_k: int = 2) -> nn.Module:
    """A ``MixtralForCausalLM`` with ``num_experts`` copies of each dense MLP and zero routers."""
    check_loaded(model)
    config = model.config
    if getattr(config, "model_type", None) not in UPCYCLABLE or not hasattr(model, "lm_head"):
        raise UserError(
            f"upcycle takes a dense causal LM of the {', '.join(UPCYCLABLE)} families, not {type(model).__name__}"
        )
    check_counts(num_experts, top_k)
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise UserError("the model is already fused; upcycle the dense model first, then fuse the experts")
    if getattr(config, "mlp_bias", False) or getattr(config, "hidden_act", "silu") != "silu":
        raise UserError("upcycle needs bias-free SwiGLU MLPs (hidden_act 'silu', mlp_bias False)")
    if getattr(config, "attention_bias", False):
        raise UserError("upcycle needs attention projections without biases (Mixtral has none)")
    moe_config = transformers.MixtralConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters),
        sliding_window=getattr(config, "sliding_window", None),
        attention_dropout=getattr(config, "attention_dropout", 0.0),
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
    )
    dtype = next(model.parameters()).dtype
    moe = transformers.MixtralForCausalLM(moe_config).to(dtype)
    state = {name: tensor for name, tensor in model.state_dict().items() if ".mlp." not in name}
    for index, layer in enumerate(model.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{index}.mlp"
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        state[f"{prefix}.experts.gate_up_proj"] = gate_up.expand(num_experts, -1, -1).clone()
        state[f"{prefix}.experts.down_proj"] = mlp.down_proj.weight.expand(num_experts, -1, -1).clone()
        state[f"{prefix}.gate.weight"] = torch.zeros(num_experts, config.hidden_size, dtype=dtype)
    moe.load_state_dict(state, strict=True)
    if getattr(model, "generation_config", None) is not None:
        moe.generation_config = model.generation_config
    return moe.eval()
