"""``fuse(model, config)``: the one verb. Validates everything first, then rewrites the chosen MLPs in place."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .calibration import ModelRuns, Runs
from .config import FusionConfig
from .errors import UserError, check_instance, check_loaded
from .families import find_sites
from .layer_runs import fuse_walking
from .persistence import follow_native_save
from .records import FusionReport
from .site_fusion import checked_calibration_batch, fuse_sites


def fuse(
    model: nn.Module,
    config: FusionConfig,
    progress: Callable[[str], None] | None = None,
    calibration: dict | Runs | None = None,
) -> FusionReport:
    """Fuse the MLPs of ``model`` chosen by ``config``, in place, and report what changed.

    Every check (layers, widths, finite weights) runs before the first site is touched. ``progress``, when
    given, receives one line per site. ``calibration``, a tokenised batch (``input_ids`` and
    ``attention_mask``, right-padded; cut to the model's positions), turns on calibration-aware fusion (see
    :mod:`mlp_fusion.calibration`); :class:`~mlp_fusion.calibration.Runs` of one's own are taken as they are.
    """
    check_loaded(model)
    check_instance(config, FusionConfig, "config")
    config.check_calibration(calibration is not None)
    report = None
    if calibration is not None and not hasattr(calibration, "parts"):  # a batch, not Runs
        calibration = checked_calibration_batch(calibration, model)
        report = fuse_walking(model, config, calibration, progress, find_sites(model))
        calibration = ModelRuns(model, calibration) if report is None else None
    if report is None and config.block_steps:  # own Runs, or no one list of layers; nothing has changed
        raise UserError("block_steps needs a calibration batch and the chosen MLPs in one list of layers")
    if report is None:
        report = fuse_sites(model, config, progress, calibration)
    follow_native_save(model)  # the model's own save_pretrained now writes the fused format
    return report
