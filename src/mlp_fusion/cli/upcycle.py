"""``mlp-fusion upcycle``: turn a dense LLaMA-style model into a Mixtral-style MoE with the same outputs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands) -> None:
    upcycle = commands.add_parser(
        "upcycle", help="copy a dense model's MLPs into experts with zero routers (a Mixtral-style MoE)"
    )
    upcycle.add_argument("model", help="dense LLaMA/Mistral model: hub id, directory, or the bundled smollm2")
    upcycle.add_argument("--experts", type=int, default=4, help="experts per layer (default 4)")
    upcycle.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    upcycle.add_argument("--out", type=Path, required=True, help="directory for the MoE checkpoint")
    upcycle.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    upcycle.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint_files import check_writable
    from ..loading import load_model, resolve
    from ..plain_export import save_plain
    from ..upcycle import check_counts, upcycle

    check_counts(args.experts, args.top_k)
    check_writable(args.out, args.overwrite, source=resolve(args.model))
    loaded = load_model(args.model)
    moe = upcycle(loaded.model, num_experts=args.experts, top_k=args.top_k)
    save_plain(moe, args.out, loaded.tokenizer, overwrite=args.overwrite)
    params = sum(p.numel() for p in moe.parameters())
    print(
        f"saved {args.out}: {type(moe).__name__}, {args.experts} experts (top {args.top_k}) per layer, "
        f"{params:,} parameters; its outputs equal {loaded.source}'s until it is trained"
    )
    return 0
