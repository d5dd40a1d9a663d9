"""The ``mlp-fusion`` command line: ``compress``, ``export`` and ``methods``.

Every bad input ends in one line on stderr and exit status 2, before any file is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS
    from .models import BUNDLED, DEFAULT_MODEL
    from .probes import PROBE_SENTENCES

    parser = _Parser(prog="mlp-fusion", description="Fuse the MLP blocks of a transformer (MLP Fusion).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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

    export = commands.add_parser(
        "export", help="fold the scales of a fused checkpoint into a plain checkpoint"
    )
    export.add_argument("fused", type=Path, help="directory written by 'compress --out'")
    export.add_argument("--out", type=Path, required=True, help="directory for the plain checkpoint")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

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
    ntk.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    ntk.add_argument("--plot", type=Path, help="write a PNG: error against ratio, one line per method")

    commands.add_parser("methods", help="list the compression methods")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already printed on one line
        return int(stop.code or 0)
    _quiet_transformers()
    try:
        commands = {"compress": run_compress, "export": run_export, "ntk": run_ntk, "methods": run_methods}
        return commands[args.command](args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; nothing was saved", file=sys.stderr)
        return 130


def run_compress(args: argparse.Namespace) -> int:
    from .config import FusionConfig
    from .fuse import fuse
    from .models import load_model
    from .persistence import check_writable, from_pretrained, save_pretrained
    from .probes import compare, main_output, probe_batch

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
    _log(f"loading {args.model}")
    loaded = load_model(args.model)
    model = loaded.model
    if args.verify:
        batch = probe_batch(model, loaded.tokenizer)
        original = main_output(model, batch)
    report = fuse(model, config, progress=_log)
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


def run_export(args: argparse.Namespace) -> int:
    from .models import load_model
    from .persistence import check_writable, export, read_fusion_file

    read_fusion_file(args.fused)
    check_writable(args.out, args.overwrite)
    loaded = load_model(str(args.fused))
    export(loaded.model, args.out, loaded.tokenizer, overwrite=args.overwrite)
    print(
        f"exported to {args.out}: a plain checkpoint, scales folded into the weights (same outputs; "
        "fine-tune the fused checkpoint to keep the paper's training dynamics)"
    )
    return 0


def run_ntk(args: argparse.Namespace) -> int:
    from .config import FusionConfig, parse_layers
    from .diagnostics import compare_methods
    from .diagnostics.kernels import KERNELS
    from .models import load_model
    from .probes import PROBE_SENTENCES, probe_batch, read_probe_texts

    methods = _names(args.methods, "method")
    ratios = [_ratio(text) for text in _names(args.ratios, "ratio")]
    for method in methods:
        FusionConfig(method=method)  # validates the name
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
    _log(f"loading {args.model}")
    loaded = load_model(args.model)
    batch = probe_batch(loaded.model, loaded.tokenizer, count=count, texts=texts)
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
        progress=_log,
    )
    result = {"model": loaded.source, "layers": layers, "params_set": args.params, **result}
    if args.plot is not None:
        from .diagnostics.plot import plot_rows

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


def run_methods(args: argparse.Namespace) -> int:
    from .methods import DESCRIPTIONS

    for name, description in DESCRIPTIONS.items():
        print(f"{name:8} {description}")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
