"""Every method x ratio against the original model: output errors, Adam and SGD kernel errors, parameters."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

from torch import nn

from ..config import FusionConfig, parse_layers
from ..fuse import fuse
from ..records import count_parameters
from .kernels import KERNELS, empirical_kernels, kernel_error
from .outputs import output_errors
from .parameters import kernel_modules


def compare_methods(
    original: nn.Module,
    batch: dict,
    *,
    methods: list[str],
    ratios: list[float],
    layers: list[int] | str = "all",
    kernels: tuple[str, ...] = KERNELS,
    params: str = "mlp",
    seed: int = 0,
    batch_size: int = 16,
    max_memory_mb: float = 1024,
    progress: Callable[[str], None] | None = None,
    fusion_options: dict | None = None,
    calibration: dict | None = None,
    reference: dict | None = None,
) -> dict:
    """Fuse a copy of ``original`` per method and ratio and measure it; the original's kernels are computed once.

    ``batch`` holds every probe, right-padded; the kernels run on it in micro-batches of ``batch_size``.
    ``fusion_options`` holds further :class:`FusionConfig` fields (``canonical``, ``n_init``, ...);
    ``calibration``, a tokenised batch, makes every fusion calibration-aware. ``reference``: the original's
    kernels from an earlier call with the same probes, layers and parameter set (returned as ``reference``).
    """
    say = progress or (lambda message: None)
    layers = parse_layers(layers)
    options = {"batch_size": batch_size, "max_memory_mb": max_memory_mb, "seed": seed}
    if reference is None:
        say("kernels of the original model")
        modules = kernel_modules(original, params, layers)
        reference = empirical_kernels(original, batch, modules, kernels, **options)
    rows = []
    for method in methods:
        for ratio in ratios:
            say(f"{method} at ratio {ratio}")
            start = time.perf_counter()
            model = copy.deepcopy(original)
            config = FusionConfig(
                method=method, ratio=ratio, layers=layers, seed=seed, **(fusion_options or {})
            )
            fuse(model, config, calibration=calibration)
            errors = output_errors(original, model, batch, layers)
            measured = empirical_kernels(
                model, batch, kernel_modules(model, params, layers), kernels, **options
            )
            row = {
                "method": method,
                "ratio": ratio,
                "calibrated": calibration is not None,
                "output_error": errors["final"],
                "layer_output_error": errors["mean_layer"],
            }
            for name in kernels:
                row[f"{name}_error"], row[f"{name}_alignment"] = kernel_error(reference[name], measured[name])
            row["params"] = count_parameters(model)
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
    return {
        "params": count_parameters(original),
        "probes": len(batch["input_ids"]),
        "rows": rows,
        "reference": reference,
    }
