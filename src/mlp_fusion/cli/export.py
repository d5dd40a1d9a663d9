"""``mlp-fusion export``: fold the scales of a fused checkpoint into a plain checkpoint, one tensor at a time."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_shard_option, shard_bytes


def add_parser(commands) -> None:
    export = commands.add_parser(
        "export", help="fold the scales of a fused checkpoint into a plain checkpoint"
    )
    export.add_argument("fused", type=Path, help="directory written by 'compress --out'")
    export.add_argument("--out", type=Path, required=True, help="directory for the plain checkpoint")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_shard_option(export)
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint_files import check_writable
    from ..loading import load_tokenizer
    from ..persistence import read_fusion_file
    from ..streaming import export_checkpoint

    read_fusion_file(args.fused)
    check_writable(args.out, args.overwrite)
    folded = export_checkpoint(
        args.fused, args.out, tokenizer=load_tokenizer(args.fused), overwrite=args.overwrite,
        shard_bytes=shard_bytes(args),
    )  # fmt: skip
    print(
        f"exported to {args.out}: a plain checkpoint, {folded} weights with their scales or factors folded in "
        "(same outputs; fine-tune the fused checkpoint to keep the paper's training dynamics)"
    )
    return 0
