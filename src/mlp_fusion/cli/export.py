"""``mlp-fusion export``: a fused checkpoint with its scales folded in, as a plain transformers checkpoint
(streamed a tensor at a time) or as one GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_shard_option, shard_bytes


def add_parser(commands) -> None:
    from ..exporting import EXPORT_FORMATS
    from ..gguf_export import GGUF_TYPES

    export = commands.add_parser(
        "export",
        help="fold the scales of a fused checkpoint into a plain checkpoint or a llama.cpp GGUF file",
    )
    export.add_argument(
        "fused", help="directory written by 'compress --out' (for gguf also any model: alias or folder)"
    )
    export.add_argument(
        "--out", type=Path, required=True, help="directory for the plain checkpoint, or the .gguf file"
    )
    export.add_argument(
        "--format", choices=EXPORT_FORMATS, default="hf",
        help="hf: a checkpoint folder vanilla transformers loads (one MLP width per config field); "
        "gguf: one file llama.cpp runs, each layer at its own width (Llama-family decoders) (default hf)",
    )  # fmt: skip
    export.add_argument(
        "--gguf-type", choices=GGUF_TYPES, default="f16",
        help="GGUF weight type; q8_0 and q4_k_m use llama.cpp's quantiser (the serve extra) (default f16)",
    )  # fmt: skip
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_shard_option(export)
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..exporting import export_saved

    print(
        export_saved(
            args.fused,
            args.out,
            format=args.format,
            gguf_type=args.gguf_type,
            overwrite=args.overwrite,
            shard_bytes=shard_bytes(args),
        )  # fmt: skip
    )
    return 0
