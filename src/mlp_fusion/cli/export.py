"""``mlp-fusion export``: fold the scales of a fused checkpoint into a plain checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands) -> None:
    export = commands.add_parser(
        "export", help="fold the scales of a fused checkpoint into a plain checkpoint"
    )
    export.add_argument("fused", type=Path, help="directory written by 'compress --out'")
    export.add_argument("--out", type=Path, required=True, help="directory for the plain checkpoint")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..models import load_model
    from ..persistence import check_writable, export, read_fusion_file

    read_fusion_file(args.fused)
    check_writable(args.out, args.overwrite)
    loaded = load_model(str(args.fused))
    export(loaded.model, args.out, loaded.tokenizer, overwrite=args.overwrite)
    print(
        f"exported to {args.out}: a plain checkpoint, scales folded into the weights (same outputs; "
        "fine-tune the fused checkpoint to keep the paper's training dynamics)"
    )
    return 0
