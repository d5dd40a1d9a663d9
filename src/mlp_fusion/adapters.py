"""The former name of :mod:`mlp_fusion.families` (finding a model's MLP sites); old imports keep working."""

import sys

from . import families

sys.modules[__name__] = families
