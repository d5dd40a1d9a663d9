"""The former home of :mod:`mlp_fusion.batches` and :mod:`mlp_fusion.verification`; old imports keep working."""

from .batches import *  # noqa: F403
from .batches import _text_of  # noqa: F401
from .verification import compare, main_output  # noqa: F401
