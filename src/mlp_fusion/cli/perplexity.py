"""``mlp-fusion perplexity``: what a compression costs a causal language model, before any fine-tuning."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_load_options, load_settings, log


def add_parser(commands) -> None:
    from ..loading import BUNDLED

    perplexity = commands.add_parser(
        "perplexity", help="perplexity of a causal language model (fused or not) on a text file"
    )
    perplexity.add_argument(
        "model", help=f"hub id, local directory, fused directory, or bundled alias ({', '.join(BUNDLED)})"
    )
    perplexity.add_argument(
        "--data",
        type=Path,
        required=True,
        help="text file (one text per line), or a TSV/CSV/JSONL file with a text column",
    )
    perplexity.add_argument("--max-samples", type=int, help="score the first N texts only")
    perplexity.add_argument(
        "--max-length", type=int, default=512, help="longest text in tokens (default 512)"
    )
    perplexity.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    perplexity.add_argument(
        "--json", action="store_true", help="print the result as one JSON object on stdout"
    )
    add_load_options(perplexity)
    perplexity.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..diagnostics.perplexity_run import perplexity

    options = {name: getattr(args, name) for name in ("max_samples", "max_length", "batch_size")}
    result = perplexity(args.model, args.data, **options, load=load_settings(args), progress=log)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['model']}: perplexity {result['perplexity']:.3f} over {result['tokens']:,} predicted tokens"
        )
    return 0
