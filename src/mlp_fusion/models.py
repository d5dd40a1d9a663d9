"""The former name of :mod:`mlp_fusion.loading` (loading bundled and local models); old imports keep working."""

import sys

from . import loading

sys.modules[__name__] = loading
