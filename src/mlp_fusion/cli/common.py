"""What every command shares: the one-line parser errors, progress on stderr, quiet transformers."""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
