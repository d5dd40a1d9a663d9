"""``mlp-fusion compress``: fuse a model's MLPs, report, save, verify."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import log


def add_parser(commands) -> None:
    from ..methods import METHODS
    from ..models import BUNDLED, DEFAULT_MODEL

    compress = commands.add_parser("compress", help="fuse a model's MLPs and save the result")
    compress.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"hub id, local directory, or bundled alias ({', '.join(BUNDLED)}; default {DEFAULT_MODEL})",
    )
    compress.add_argument("--method", default="fusion", help=f"one of: {', '.join(METHODS)} (default fusion)")
    size = compress.add_mutually_exclusive_group()
    size.add_argument(
        "--ratio", type=float, help="kept fraction of each MLP's width, in (0, 1] (default 0.25)"
    )
    size.add_argument("--width", type=int, help="new width of every fused MLP")
    compress.add_argument(
        "--layers", default="all", help="'all', a list '2,3' or a range '2-5' (default all)"
    )
    compress.add_argument("--seed", type=int, default=0, help="seed of k-means and of the sketch (default 0)")
    compress.add_argument("--n-init", type=int, default=1, help="k-means restarts (default 1)")
    compress.add_argument(
        "--keep-fraction", type=float, default=0.0, help="sketch: share of the width kept exactly"
    )
    compress.add_argument("--out", type=Path, help="save the fused model to this directory")
    compress.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    compress.add_argument(
        "--verify",
        action="store_true",
        help="compare outputs on probe sentences: fused vs original, and reloaded vs in-memory when --out is given",
    )
    compress.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    compress.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import FusionConfig
    from ..fuse import fuse
    from ..models import load_model
    from ..persistence import check_writable, from_pretrained, save_pretrained
    from ..probes import compare, main_output, probe_batch

    config = FusionConfig(
        method=args.method,
        ratio=args.ratio,
        width=args.width,
        layers=args.layers,
        seed=args.seed,
        n_init=args.n_init,
        keep_fraction=args.keep_fraction,
    )
    if args.out is not None:
        check_writable(args.out, args.overwrite)
    log(f"loading {args.model}")
    loaded = load_model(args.model)
    model = loaded.model
    if args.verify:
        batch = probe_batch(model, loaded.tokenizer)
        original = main_output(model, batch)
    report = fuse(model, config, progress=log)
    result = {"model": loaded.source, **report.to_dict(), "out": str(args.out) if args.out else None}
    if args.verify:
        fused = main_output(model, batch)
        result["verify"] = {"fused_vs_original": compare(original, fused, batch["attention_mask"])}
    if args.out is not None:
        save_pretrained(model, args.out, loaded.tokenizer, overwrite=args.overwrite)
        if args.verify:
            reloaded = main_output(from_pretrained(args.out), batch)
            result["verify"]["reloaded_vs_fused"] = compare(fused, reloaded, batch["attention_mask"])
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{loaded.source}: {config.method}")
    print(report.format_table())
    for name, numbers in result.get("verify", {}).items():
        print(
            f"{name}: max abs diff {numbers['max_abs_diff']:.3g}, relative error {numbers['relative_error']:.4f}"
        )
    print(f"saved to {args.out}" if args.out else "not saved: pass --out DIR to keep the fused model")
    return 0
