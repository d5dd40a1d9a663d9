"""mlp-fusion: fuse the MLP blocks of pre-trained transformers (MLP Fusion, ICML 2023) for cheaper fine-tuning."""

import importlib

from .compression import Compressed, compress
from .config import FusionConfig
from .errors import UserError
from .exporting import export
from .families import find_sites
from .fuse import fuse
from .kmeans import KMeans, k_means
from .methods import METHODS
from .persistence import from_pretrained, info, save_pretrained
from .records import FusionReport
from .upcycle import upcycle
from .version import __version__

# verbs of the training and diagnostics stacks, which importing the core must not pull in: name -> module
_LAZY = {
    "distill": ".training",
    "evaluate": ".training.evaluate_run",
    "finetune": ".training.finetune_run",
    "add_lora": ".training.lora",
    "load_lora": ".training.lora",
    "merge_lora": ".training.lora",
    "ntk": ".diagnostics.ntk_run",
    "NtkSettings": ".diagnostics.ntk_run",
    "perplexity": ".diagnostics.perplexity_run",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mlp_fusion' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


__all__ = [
    "__version__",
    "METHODS",
    "Compressed",
    "FusionConfig",
    "FusionReport",
    "KMeans",
    "NtkSettings",
    "UserError",
    "add_lora",
    "compress",
    "distill",
    "evaluate",
    "export",
    "find_sites",
    "finetune",
    "from_pretrained",
    "fuse",
    "info",
    "k_means",
    "load_lora",
    "merge_lora",
    "ntk",
    "perplexity",
    "save_pretrained",
    "upcycle",
]
