"""``mlp-fusion compress``: fuse a model's MLPs, report, save, verify."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import FusionConfig
from .common import (
    add_calibration_options,
    add_config_options,
    add_load_options,
    add_shard_option,
    calibration_inputs,
    calibration_texts,
    config_values,
    load_settings,
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
CALIBRATION_OPTIONS = ("weighting", "refit", "ridge")


def add_parser(commands) -> None:
    from ..models import BUNDLED, DEFAULT_MODEL

    compress = commands.add_parser("compress", help="fuse a model's MLPs and save the result")
    compress.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"hub id, local directory, or bundled alias ({', '.join(BUNDLED)}; default {DEFAULT_MODEL})",
    )
    size = compress.add_mutually_exclusive_group()
    add_config_options(size, FusionConfig, ("ratio", "width", "budget"))
    add_config_options(compress, FusionConfig, FUSION_OPTIONS)
    calibration = compress.add_argument_group("calibration-aware fusion")
    add_calibration_options(calibration)
    calibration.add_argument(
        "--max-length", type=int, default=128, help="longest calibration input in tokens (default 128)"
    )
    add_config_options(calibration, FusionConfig, CALIBRATION_OPTIONS)
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
    add_shard_option(compress)
    compress.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    compress.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..fuse import fuse
    from ..models import load_model
    from ..persistence import check_writable, from_pretrained, save_pretrained
    from ..probes import compare, main_output, probe_batch

    config = FusionConfig(**config_values(args, FusionConfig))
    settings = load_settings(args)
    shard_bytes(args)  # checked before any work
    texts = calibration_texts(args)
    if args.out is not None:
        check_writable(args.out, args.overwrite)
    streamed = _streamed(args, config, settings)
    if streamed is not None:
        return _print_result(*streamed, config, args.json)
    log(f"loading {args.model}")
    loaded = load_model(args.model, settings)
    model = loaded.model
    if args.verify:
        batch = probe_batch(model, loaded.tokenizer)
        original = main_output(model, batch)
    calibration = calibration_inputs(args, loaded.tokenizer, texts)
    report = fuse(model, config, progress=log, calibration=calibration)
    result = {"model": loaded.source, **report.to_dict(), "out": str(args.out) if args.out else None}
    result["streamed"] = False
    if args.verify:
        fused = main_output(model, batch)
        result["verify"] = {"fused_vs_original": compare(original, fused, batch["attention_mask"])}
    if args.out is not None:
        save_pretrained(model, args.out, loaded.tokenizer, overwrite=args.overwrite)
        if args.verify:
            reloaded = main_output(from_pretrained(args.out, device=settings.torch_device()), batch)
            result["verify"]["reloaded_vs_fused"] = compare(fused, reloaded, batch["attention_mask"])
    return _print_result(result, report, config, args.json)


def _streamed(args: argparse.Namespace, config: FusionConfig, settings) -> tuple[dict, object] | None:
    """Fuse a local checkpoint layer by layer when it can be: (result, report); None when the caller
    must load it whole."""
    from ..models import is_fused, load_tokenizer, resolve
    from ..streaming import NotStreamable, fuse_checkpoint

    path = resolve(args.model)
    if args.in_memory or args.out is None or path is None or is_fused(path):
        return None
    held = {"--calibration": args.calibration is not None, "--verify": args.verify}
    if any(held.values()):
        log(f"fusing in memory: {' and '.join(k for k, v in held.items() if v)} need(s) the whole model")
        return None
    try:
        log(f"fusing {path} layer by layer into {args.out}")
        report = fuse_checkpoint(
            path, args.out, config, dtype=settings.torch_dtype(), device=settings.torch_device(),
            tokenizer=load_tokenizer(path), overwrite=args.overwrite,
            shard_bytes=shard_bytes(args), progress=log,
        )  # fmt: skip
    except NotStreamable as reason:
        log(f"fusing in memory: this checkpoint cannot be streamed ({reason})")
        return None
    return {"model": str(path), **report.to_dict(), "out": str(args.out), "streamed": True}, report


def _print_result(result: dict, report, config: FusionConfig, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
        return 0
    print(f"{result['model']}: {config.method}")
    print(report.format_table())
    for name, numbers in result.get("verify", {}).items():
        print(
            f"{name}: max abs diff {numbers['max_abs_diff']:.3g}, relative error {numbers['relative_error']:.4f}"
        )
    out = result["out"]
    print(f"saved to {out}" if out else "not saved: pass --out DIR to keep the fused model")
    return 0
