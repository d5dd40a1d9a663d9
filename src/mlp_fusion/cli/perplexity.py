"""``mlp-fusion perplexity``: what a compression costs a causal language model, before any fine-tuning."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
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
    from ..batches import read_probe_texts
    from ..diagnostics.perplexity import has_lm_head, perplexity
    from ..loading import load_model

    for name in ("max_samples", "max_length", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    texts = read_probe_texts(args.data, args.max_samples, what="text file")
    settings = load_settings(args)
    log(f"loading {args.model}")
    loaded = load_model(args.model, settings)
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.source} has no tokenizer files; perplexity needs the model's tokenizer")
    if not has_lm_head(loaded.model):
        raise UserError(f"{loaded.source} is not a causal language model: perplexity needs one")
    log(f"scoring {len(texts)} texts")
    result = perplexity(loaded.model, loaded.tokenizer, texts, args.max_length, args.batch_size)
    if result["max_length"] < args.max_length:
        log(f"texts cut to {result['max_length']} tokens, the model's position limit")
    result = {"model": loaded.source, "data": str(args.data), **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{loaded.source}: perplexity {result['perplexity']:.3f} over {result['tokens']:,} predicted tokens"
        )
    return 0
