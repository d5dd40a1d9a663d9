"""mlp-fusion: fuse the MLP blocks of pre-trained transformers (MLP Fusion, ICML 2023) for cheaper fine-tuning."""

from .compression import Compressed, compress
from .config import FusionConfig
from .errors import UserError
from .exporting import export
from .families import find_sites
from .fuse import fuse
from .kmeans import KMeans, k_means
from .methods import METHODS
from .persistence import from_pretrained, save_pretrained
from .records import FusionReport
from .upcycle import upcycle
from .version import __version__


def __getattr__(name: str):
    # these live in the training stack, which importing the core must not pull in
    if name == "distill":
        from .training import distill

        return distill
    if name == "evaluate":
        from .training.evaluate_run import evaluate

        return evaluate
    if name == "finetune":
        from .training.finetune_run import finetune

        return finetune
    if name == "perplexity":
        from .diagnostics.perplexity_run import perplexity

        return perplexity
    if name in ("add_lora", "load_lora", "merge_lora"):
        from .training import lora

        return getattr(lora, name)
    raise AttributeError(f"module 'mlp_fusion' has no attribute {name!r}")


__all__ = [
    "__version__",
    "METHODS",
    "Compressed",
    "FusionConfig",
    "FusionReport",
    "KMeans",
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
    "k_means",
    "load_lora",
    "merge_lora",
    "perplexity",
    "save_pretrained",
    "upcycle",
]
