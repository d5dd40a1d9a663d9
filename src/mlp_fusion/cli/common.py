"""What every command shares: the one-line parser errors, progress on stderr, quiet transformers."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path

from ..errors import UserError

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


def add_config_options(target, config_class: type, names: tuple[str, ...]) -> None:
    """Add ``--name`` options for the named fields of a config dataclass, typed and described by the fields.

    A boolean field that defaults to True becomes ``--no-name``; one that defaults to False, ``--name``.
    """
    hints = typing.get_type_hints(config_class)
    by_name = {f.name: f for f in dataclasses.fields(config_class)}
    for name in names:
        field = by_name[name]
        flag, help_text = "--" + name.replace("_", "-"), field.metadata.get("help", "")
        kind = _option_type(hints[name])
        if kind is bool:
            negated = bool(field.default)
            target.add_argument(
                "--no-" + flag[2:] if negated else flag,
                dest=name,
                action="store_false" if negated else "store_true",
                help=field.metadata.get("off_help", help_text) if negated else help_text,
            )
            continue
        shown = "" if field.default is None else f" (default {field.default})"
        choices = field.metadata.get("choices")
        target.add_argument(flag, type=kind, default=field.default, choices=choices, help=help_text + shown)


def config_values(args: argparse.Namespace, config_class: type) -> dict:
    """The config fields that ``args`` carries (options added by :func:`add_config_options`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}


def add_load_options(target) -> None:
    """``--dtype`` and ``--device``: how the command holds the model."""
    from ..loading import LoadSettings

    add_config_options(target, LoadSettings, ("dtype", "device"))


def load_settings(args: argparse.Namespace):
    """The checked ``--dtype`` / ``--device`` of ``args``."""
    from ..loading import LoadSettings

    return LoadSettings(**config_values(args, LoadSettings))


def _option_type(hint: object) -> type:
    """``float | None`` -> float; ``list[int] | str`` (a spec) -> str; plain types as they are."""
    choices = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
    simple = [arg for arg in choices if arg in (bool, int, float, str)]
    return simple[0] if simple else str


def add_shard_option(target) -> None:
    target.add_argument(
        "--shard-size", type=float, default=2.0, help="output file size when streaming, in GB (default 2)"
    )


def shard_bytes(args: argparse.Namespace) -> int:
    if not args.shard_size > 0:
        raise UserError(f"--shard-size must be above 0, not {args.shard_size}")
    return int(args.shard_size * 2**30)


def add_calibration_options(target, from_file: bool = True) -> None:
    """``--calibration FILE`` (or, for finetune, ``--calibrate`` on the training inputs) and its sample count."""
    if from_file:
        target.add_argument(
            "--calibration",
            type=Path,
            help="calibration-aware fusion on these inputs: a text file (one per line) or a TSV/CSV/JSONL "
            "file with a text column",
        )
    else:
        target.add_argument(
            "--calibrate", action="store_true", help="calibration-aware fusion on the task's training inputs"
        )
    target.add_argument(
        "--calibration-samples", type=int, default=128, help="calibration inputs to use (default 128)"
    )


def calibration_texts(args: argparse.Namespace) -> list[str] | None:
    """The texts of ``--calibration FILE`` (read before any model is loaded), or None without the option."""
    from ..batches import read_probe_texts

    if args.calibration_samples < 1 or args.max_length < 1:
        raise UserError("--calibration-samples and --max-length must be at least 1")
    path = getattr(args, "calibration", None)
    return None if path is None else read_probe_texts(path, args.calibration_samples, what="calibration file")


def add_recipe_option(target) -> None:
    """``--recipe``; it also makes ``--keep-fraction`` and ``--ridge`` default to the recipe's (None until a
    recipe decides)."""
    from ..recipes import RECIPE_CHOICES, RECIPE_FIELDS

    target.add_argument(
        "--recipe",
        choices=RECIPE_CHOICES,
        default="auto",
        help="auto (default): 'calibrated' for causal language models (calibration inputs, sampled from the "
        "model when none are given, and half of each fused width kept as its top neurons), 'paper' "
        "otherwise; 'paper': the paper's data-free fusion",
    )
    # set_defaults reaches only the options already added: the recipe's fields must come first
    assert set(RECIPE_FIELDS) <= {action.dest for action in target._actions}, "add the recipe's fields first"
    target.set_defaults(**dict.fromkeys(RECIPE_FIELDS))
    for action in target._actions:
        if action.dest in RECIPE_FIELDS:
            action.help = re.sub(r"\(default [^)]*\)", "(default: the recipe's)", action.help)
