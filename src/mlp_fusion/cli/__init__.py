"""The ``mlp-fusion`` command line: ``compress``, ``export``, ``info``, ``ntk``, ``perplexity``,
``finetune`` / ``evaluate``, ``upcycle``, ``methods``.

Every bad input ends in one line on stderr and exit status 2, before any file is touched.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserError
from . import compress, evaluate, export, finetune, info, ntk, perplexity, upcycle
from .common import EXIT_USAGE, Parser, quiet_transformers


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mlp-fusion", description="Fuse the MLP blocks of a transformer (MLP Fusion).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (compress, export, info, ntk, perplexity, finetune, evaluate, upcycle):
        command.add_parser(commands)
    commands.add_parser("methods", help="list the compression methods").set_defaults(run=run_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already printed on one line
        return int(stop.code or 0)
    quiet_transformers()
    try:
        return args.run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"interrupted; {getattr(args, 'on_interrupt', 'nothing was saved')}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (`| head`): what was asked is done, so stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # as a process ended by SIGPIPE


def run_methods(args: argparse.Namespace) -> int:
    from ..methods import DESCRIPTIONS

    for name, description in DESCRIPTIONS.items():
        print(f"{name:8} {description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
