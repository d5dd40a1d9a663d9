"""``mlp-fusion ntk``: output and kernel errors of every method x ratio against the original."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import FusionConfig
from ..errors import UserError
from .common import (
    add_calibration_options,
    add_config_options,
    add_load_options,
    calibration_texts,
    load_settings,
    log,
)

# FusionConfig fields that ntk passes through to every method (--methods, --ratios, --layers name the rest).
FUSION_OPTIONS = ("n_init", "keep_fraction", "canonical", "weighting", "refit", "ridge")


def add_parser(commands) -> None:
    from ..batches import PROBE_SENTENCES
    from ..loading import DEFAULT_MODEL
    from ..methods import METHODS

    ntk = commands.add_parser(
        "ntk", help="measure what each method preserves: output error, Adam and SGD kernels"
    )
    ntk.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, help=f"as for compress (default {DEFAULT_MODEL})"
    )
    ntk.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    ntk.add_argument(
        "--ratios", default="0.5,0.25,0.125", help="comma-separated ratios (default 0.5,0.25,0.125)"
    )
    ntk.add_argument("--layers", default="all", help="layers to fuse, as for compress (default all)")
    probes = ntk.add_mutually_exclusive_group()
    probes.add_argument(
        "--probes",
        type=int,
        help=f"number of built-in probe sentences (default 16, at most {len(PROBE_SENTENCES)})",
    )
    probes.add_argument(
        "--probe-file", type=Path, help="text file (one input per line) or TSV/CSV with a text column"
    )
    ntk.add_argument("--max-probes", type=int, default=64, help="inputs taken from --probe-file (default 64)")
    ntk.add_argument("--kernels", default="adam,sgd", help="comma-separated: adam, sgd (default both)")
    ntk.add_argument("--params", default="mlp", help="mlp, fused, all, or a layer index (default mlp)")
    ntk.add_argument(
        "--seed", type=int, default=0, help="seed of fusion and of the readout vector (default 0)"
    )
    ntk.add_argument(
        "--max-memory",
        type=float,
        default=1024,
        help="MB of per-example gradients held at once (default 1024)",
    )
    ntk.add_argument(
        "--batch-size", type=int, default=16, help="probes per forward/backward pass (default 16)"
    )
    ntk.add_argument(
        "--max-length", type=int, default=64, help="longest probe or calibration input in tokens (default 64)"
    )
    add_calibration_options(ntk)
    add_load_options(ntk)
    add_config_options(ntk, FusionConfig, FUSION_OPTIONS)
    ntk.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    ntk.add_argument("--plot", type=Path, help="write a PNG: error against ratio, one line per method")
    ntk.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..batches import PROBE_SENTENCES, probe_batch, read_probe_texts
    from ..calibration import first_calibration_batch
    from ..config import parse_layers
    from ..diagnostics import compare_methods
    from ..diagnostics.kernels import KERNELS
    from ..loading import load_model

    methods = _names(args.methods, "method")
    ratios = [_ratio(text) for text in _names(args.ratios, "ratio")]
    options = {name: getattr(args, name) for name in FUSION_OPTIONS}
    for method in methods:
        FusionConfig(method=method, **options)  # validates the name and the options
    kernels = tuple(_names(args.kernels, "kernel"))
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise UserError(f"unknown kernel {sorted(unknown)[0]!r}: choose from {', '.join(KERNELS)}")
    if args.params not in ("mlp", "fused", "all") and not args.params.isdigit():
        raise UserError(f"unknown parameter set {args.params!r}: use mlp, fused, all, or a layer index")
    layers = parse_layers(args.layers)
    if args.batch_size < 1 or args.max_memory <= 0:
        raise UserError("--batch-size must be at least 1 and --max-memory above 0")
    texts = None
    count = 16 if args.probes is None else args.probes
    if args.probe_file is not None:
        if args.max_probes < 1:
            raise UserError("--max-probes must be at least 1")
        texts = read_probe_texts(args.probe_file, args.max_probes)
        count = len(texts)
    elif not 1 <= count <= len(PROBE_SENTENCES):
        raise UserError(
            f"--probes must be between 1 and {len(PROBE_SENTENCES)}; use --probe-file for more inputs"
        )
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise UserError(f"--plot writes a PNG: give a file name ending in .png, not {args.plot.name}")
    calibration = calibration_texts(args)
    settings = load_settings(args)
    log(f"loading {args.model}")
    loaded = load_model(args.model, settings)
    batch = probe_batch(loaded.model, loaded.tokenizer, count=count, max_length=args.max_length, texts=texts)
    result = compare_methods(
        loaded.model,
        batch,
        methods=methods,
        ratios=ratios,
        layers=layers,
        kernels=kernels,
        params=args.params,
        seed=args.seed,
        batch_size=args.batch_size,
        max_memory_mb=args.max_memory,
        progress=log,
        fusion_options=options,
        calibration=first_calibration_batch(
            loaded.tokenizer, calibration, None, args.calibration_samples, args.max_length
        ),
    )
    result.pop("reference")  # tensors, for callers that compare more methods later
    result = {"model": loaded.source, "layers": layers, "params_set": args.params, **result}
    if args.plot is not None:
        from ..diagnostics.plot import plot_rows

        plot_rows(
            result["rows"], kernels, args.plot, title=f"{args.model}, layers {args.layers}, {count} probes"
        )
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_ntk_table(result["rows"], kernels))
    if args.plot is not None:
        print(f"plot written to {args.plot}")
    return 0


def format_ntk_table(rows: list[dict], kernels: tuple[str, ...]) -> str:
    header = f"{'method':8} {'ratio':>6} {'output err':>10} {'layer err':>9}"
    header += (
        "".join(f" {k + ' err':>9} {k + ' align':>10}" for k in kernels) + f" {'params':>12} {'seconds':>8}"
    )
    lines = [header]
    for row in rows:
        line = f"{row['method']:8} {row['ratio']:>6g} {row['output_error']:>10.4f} {row['layer_output_error']:>9.4f}"
        line += "".join(f" {row[k + '_error']:>9.4f} {row[k + '_alignment']:>10.4f}" for k in kernels)
        lines.append(line + f" {row['params']:>12,} {row['seconds']:>8.1f}")
    return "\n".join(lines)


def _names(text: str, what: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UserError(f"give at least one {what}")
    return names


def _ratio(text: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        raise UserError(f"ratio {text!r} is not a number") from None
    if not 0 < ratio <= 1:
        raise UserError(f"ratio must be in (0, 1], got {text}")
    return ratio
