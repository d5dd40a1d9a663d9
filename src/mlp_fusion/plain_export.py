"""The plain copy of a fused model (its scales and factors folded into the weights: the same function, not
the fused model's fine-tuning dynamics), and its save as a checkpoint folder that vanilla transformers loads."""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import transformers
from torch import nn
from torch.nn.utils import parametrize

from .checkpoint_files import atomic_directory, write_side_files
from .errors import UserError
from .families import find_sites
from .parametrizations import plain_forward
from .records import RECORD_ATTR, fusion_records

EXPORT_NOTE_FILE = "mlp_fusion_export.json"


def folded_copy(model: nn.Module) -> nn.Module:
    """A plain copy of a fused model: scales and factors folded into the weights, the caller's model intact.

    It computes the same function with the stock modules only (any widths; :func:`export` also needs one
    width per config field to save it).
    """
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            _own_class(module)
            plain_forward(module)
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    if hasattr(plain, RECORD_ATTR):
        delattr(plain, RECORD_ATTR)
    plain.__dict__.pop("save_pretrained", None)  # the plain copy saves as any transformers model
    return plain


def export_widths(model: nn.Module) -> dict[str, int]:
    """The width each MLP config field takes in an export; refused unless every MLP it sets has one width."""
    sites = find_sites(model)
    fused = {record.name for record in fusion_records(model)}
    unknown = [site.name for site in sites if site.config_key is None and site.name in fused]
    if unknown:
        raise UserError(
            f"cannot export: no config field sets the width of {unknown[0]}; keep the fused format (save_pretrained)"
        )
    widths: dict[str, set[int]] = {}
    for site in sites:
        if site.config_key is not None:
            widths.setdefault(site.config_key, set()).add(site.width)
    for key, values in widths.items():
        if len(values) > 1:
            raise UserError(
                f"cannot export: MLPs set by config field {key!r} have different widths {sorted(values)}; "
                "fuse every layer to the same width, or keep the fused format (save_pretrained)"
            )
    return {key: values.pop() for key, values in widths.items()}


def set_widths(config: transformers.PretrainedConfig, widths: dict[str, int]) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, width in widths.items():
        setattr(text, key, width)


def export_notes(model: nn.Module) -> dict[str, dict]:
    """The note file an export carries next to its weights."""
    note = {
        "note": "Exported by mlp-fusion with the fixed scales folded into the weights: the same function as the "
        "fused model, but not its fine-tuning dynamics. Fine-tune the fused checkpoint instead.",
        "sites": [asdict(record) for record in fusion_records(model)],
    }
    return {EXPORT_NOTE_FILE: note}


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own.

    torch gives every parametrized module a generated subclass, and a deep copy shares it with the original;
    removing a parametrization deletes its property from that class, which would break the caller's model.
    """
    cls = module.__class__
    members = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, members)


def save_plain(
    model: nn.Module,
    directory: str | Path,
    tokenizer=None,
    *,
    overwrite: bool = False,
    notes: dict | None = None,
) -> Path:
    """Save an unfused model as a vanilla transformers checkpoint (atomically), with JSON ``notes`` files."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)  # its weights, config and generation config
        write_side_files(tmp, model, tokenizer, notes, configs=False)

    return atomic_directory(Path(directory), overwrite, write)
