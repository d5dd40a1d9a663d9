"""The registry of methods: pure functions from one layer's sub-MLP tensors to new tensors."""

from . import clustering, mmd, pruning, sketch, svd  # noqa: F401  (each module registers its methods)
from .base import DESCRIPTIONS, METHODS, MethodResult, SubMlps, join_results, register

__all__ = ["DESCRIPTIONS", "METHODS", "MethodResult", "SubMlps", "join_results", "register"]
