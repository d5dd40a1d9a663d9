"""``mlp-fusion ntk``: output and kernel errors of every method x ratio against the original."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import FusionConfig
from .common import (
    add_calibration_options,
    add_config_options,
    add_load_options,
    calibration_texts,
    config_values,
    load_settings,
    log,
)


def add_parser(commands) -> None:
    from ..diagnostics.ntk_run import FUSION_OPTIONS, NtkSettings
    from ..loading import DEFAULT_MODEL

    ntk = commands.add_parser(
        "ntk", help="measure what each method preserves: output error, Adam and SGD kernels"
    )
    ntk.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, help=f"as for compress (default {DEFAULT_MODEL})"
    )
    add_config_options(ntk, NtkSettings, ("methods", "ratios", "layers"))
    add_config_options(ntk.add_mutually_exclusive_group(), NtkSettings, ("probes", "probe_file"))
    add_config_options(
        ntk,
        NtkSettings,
        ("max_probes", "kernels", "params", "seed", "max_memory", "batch_size", "max_length"),
    )
    add_calibration_options(ntk)
    add_load_options(ntk)
    add_config_options(ntk, FusionConfig, FUSION_OPTIONS)
    ntk.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    ntk.add_argument("--plot", type=Path, help="write a PNG: error against ratio, one line per method")
    ntk.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..diagnostics.ntk_run import FUSION_OPTIONS, NtkSettings, format_ntk_table, ntk

    settings = NtkSettings(**config_values(args, NtkSettings))
    result = ntk(
        args.model,
        settings,
        calibration_texts=calibration_texts(args),
        calibration_samples=args.calibration_samples,
        load=load_settings(args),
        plot=args.plot,
        progress=log,
        **{name: getattr(args, name) for name in FUSION_OPTIONS},
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_ntk_table(result["rows"], settings.kernels))
    if args.plot is not None:
        print(f"plot written to {args.plot}")
    return 0
