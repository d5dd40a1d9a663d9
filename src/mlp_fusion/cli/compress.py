"""``mlp-fusion compress``: fuse a model's MLPs, report, save, verify."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from ..config import CALIBRATION_FIELDS, FusionConfig
from .common import (
    add_calibration_options,
    add_config_options,
    add_load_options,
    add_recipe_option,
    add_shard_option,
    calibration_texts,
    config_values,
    log,
    shard_bytes,
)

# FusionConfig fields that compress takes as options, besides --ratio / --width.
FUSION_OPTIONS = (
    "method",
    "layers",
    "seed",
    "n_init",
    "max_iter",
    "hartigan_rounds",
    "keep_fraction",
    "canonical",
)


def add_parser(commands) -> None:
    from ..loading import BUNDLED, DEFAULT_MODEL
    from ..training.heal import HealSettings

    compress = commands.add_parser("compress", help="fuse a model's MLPs and save the result")
    compress.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"hub id, local directory, or bundled alias ({', '.join(BUNDLED)}; default {DEFAULT_MODEL})",
    )
    size = compress.add_mutually_exclusive_group()
    add_config_options(size, FusionConfig, ("ratio", "width", "budget"))
    size.add_argument(
        "--size", type=float,
        help="fraction of the whole model's parameters to keep, e.g. 0.9 for 10%% fewer; the layers and widths "
        "follow the plan measured best for a cut of that size (one ratio over --layers when given)",
    )  # fmt: skip
    add_config_options(compress, FusionConfig, FUSION_OPTIONS)
    calibration = compress.add_argument_group("calibration-aware fusion")
    add_calibration_options(calibration)
    calibration.add_argument(
        "--max-length", type=int, default=128, help="longest calibration input in tokens (default 128)"
    )
    add_config_options(calibration, FusionConfig, CALIBRATION_FIELDS)
    healing = compress.add_argument_group("healing (causal language models; both models held whole)")
    add_config_options(healing, HealSettings, tuple(f.name for f in fields(HealSettings)))
    add_load_options(compress)
    compress.add_argument("--out", type=Path, help="save the fused model to this directory")
    compress.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    compress.add_argument(
        "--verify",
        action="store_true",
        help="compare outputs on probe sentences: fused vs original, and reloaded vs in-memory when --out is given",
    )
    compress.add_argument(
        "--in-memory",
        action="store_true",
        help="load the whole model before fusing (default for a local safetensors checkpoint: one layer at "
        "a time, reading and writing the files as it goes)",
    )
    add_recipe_option(compress)
    add_shard_option(compress)
    compress.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    compress.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..compression import compress
    from ..training.heal import HealSettings

    fields = config_values(args, FusionConfig)  # None: the recipe's
    done = compress(
        args.model, args.out, recipe=args.recipe, calibration_texts=calibration_texts(args),
        calibration_samples=args.calibration_samples, max_length=args.max_length, dtype=args.dtype,
        device=args.device, in_memory=args.in_memory, overwrite=args.overwrite,
        shard_bytes=shard_bytes(args), verify=args.verify, progress=log,
        heal=HealSettings(**config_values(args, HealSettings)), size=args.size, **fields,
    )  # fmt: skip
    return _print_result(done.to_dict(), done.report, args.json)


def _print_result(result: dict, report, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
        return 0
    print(f"{result['model']}: {report.method}, recipe {result['recipe']}")
    print(report.format_table())
    for name, numbers in result.get("verify", {}).items():
        print(_verified(name, numbers))
    out = result["out"]
    print(f"saved to {out}" if out else "not saved: pass --out DIR to keep the fused model")
    return 0


def _verified(name: str, numbers: dict) -> str:
    """One line of ``--verify``, in the terms of the model's job where there are some."""
    if name == "reloaded_vs_fused":
        same = "identical" if numbers["max_abs_diff"] == 0 else f"max abs diff {numbers['max_abs_diff']:.3g}"
        return f"reloaded from disk vs fused in memory: {same}"
    if "next_token_agreement" in numbers:
        shown = f"same next token at {100 * numbers['next_token_agreement']:.1f}% of positions"
    elif "embedding_cosine_mean" in numbers:
        shown = (
            f"sentence-embedding cosine {numbers['embedding_cosine_mean']:.3f} on average "
            f"(lowest {numbers['embedding_cosine_min']:.3f})"
        )
    else:
        shown = f"relative error {numbers['relative_error']:.4f}"
    return (
        f"fused vs original on the probe sentences: {shown}; fusion keeps the training dynamics, not every "
        "output: fine-tune the fused model (mlp-fusion finetune) to get its quality back"
    )
