"""Fusing a checkpoint on disk one layer at a time, so that the model never has to fit in memory.

The model is built on the meta device (shapes only). Every tensor that fusion does not change is copied
from the source files to the output shards one at a time; for each fused layer, the tensors of its MLPs
are read, fused with :func:`mlp_fusion.fuse` exactly as in memory, written out and released. Peak memory
is one output shard being assembled plus one layer's MLPs and the method's working memory.

Checkpoints saved by transformers keep stacked MoE experts in their per-expert layout
(``experts.0.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.0.w1.weight``); the reader stacks
them as the model holds them. A checkpoint whose tensor names still do not match the model cannot be
streamed (:class:`NotStreamable`), and the caller fuses it in memory.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from torch import nn

from .checkpoint_files import (
    DTYPES,
    atomic_directory,
    check_writable,
    meta_model,
    named_classes,
    shared_names,
    weight_files,
    write_side_files,
)
from .config import FusionConfig
from .errors import UserError
from .families import find_sites
from .layer_runs import LayerStackError, LayerWalk, spread_budget, stack_index
from .loading import check_head
from .persistence import fused_skeleton, placeholders, write_description
from .plain_export import export_notes, export_widths, set_widths
from .records import FusionReport, record_layers
from .shard_io import SHARD_BYTES, CheckpointReader, ShardWriter
from .site_fusion import (
    budget_widths,
    check_memory,
    checked_calibration_batch,
    fuse_sites,
    planned_width,
    select_sites,
    sensitivity,
)
from .sites import MlpSite


class NotStreamable(Exception):
    """Why a checkpoint cannot be fused layer by layer (the caller then fuses it in memory)."""


def fuse_checkpoint(
    source: Path,
    out: Path,
    config: FusionConfig,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    tokenizer=None,
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
    calibration: dict | None = None,
    annotate: Callable[[nn.Module], None] | None = None,
) -> FusionReport:
    """Fuse the local checkpoint ``source`` into the fused format in ``out``, one layer at a time.

    Gives the same tensors as loading ``source`` in ``dtype`` (default: its own), :func:`fuse` with
    ``config`` (and the tokenised ``calibration`` batch, see :mod:`mlp_fusion.layer_runs`) and
    :func:`save_pretrained`. ``annotate`` is called on the model before its description is written (the
    recipe records itself there). Raises :class:`NotStreamable` before writing anything when the checkpoint
    cannot be read this way.
    """
    config.check_calibration(calibration is not None)
    _return_large_blocks()
    device = torch.device(device)
    reader, model, sites, groups = _checked_plan(source, config, dtype, device)
    check_writable(out, overwrite, source=source)
    if calibration is not None:
        calibration = checked_calibration_batch(calibration, model)
    widths = None
    if config.budget is not None:  # every layer is measured before any is fused: a first pass
        widths = _spread(model, reader, groups, config, calibration, device)
        _check_memory(groups, config, device, widths)
    start = time.perf_counter()
    report = FusionReport.begin(model, sites, config.method)
    walk = _walk(model, reader, groups, calibration, device) if calibration is not None else None
    owners = {site.name: group for group in groups for site in group}
    done: set[int] = set()  # groups written
    entered: set[int] = set()  # layers the calibrated walk has run

    def write(tmp: Path) -> None:
        shards = ShardWriter(tmp, shard_bytes)
        for name in _stored_names(model, reader):
            layer = walk.layer_of(name) if walk is not None else None
            if layer is not None and layer not in entered:  # read, calibrate and fuse, carry on
                entered.add(layer)
                report.layers += walk.enter(layer, config, progress, widths)
            group = next((g for prefix, g in owners.items() if name.startswith(prefix + ".")), None)
            if group is None:
                shards.add(name, reader.read(name, torch.device("cpu"), dtype))
            elif id(group) not in done:
                done.add(id(group))
                if walk is None:  # data-free: the group's MLPs are read and fused here
                    fused = _fuse_group(model, group, reader, config, device, progress, widths)
                    report.layers += fused.layers
                _write_group(model, group, shards)
        if walk is not None:
            walk.release()
        shards.close()
        record_layers(model, config.layers)
        if annotate is not None:
            annotate(model)
        write_description(model, tmp, tokenizer)

    atomic_directory(out, overwrite, write)
    return report.finish(model, sites, start)


def _checked_plan(source: Path, config: FusionConfig, dtype: torch.dtype | None, device: torch.device):
    """The checkpoint's reader, its meta-device model, its sites and the chosen ones grouped by layer; every
    chosen width is checked (and refused) here, before anything is written (a budget's widths once it is
    spread)."""
    try:
        files = weight_files(source)
    except UserError as error:
        raise NotStreamable(f"no safetensors weights ({error})") from None
    reader = CheckpointReader(files)
    model = _meta_model(source, reader, dtype)
    sites = find_sites(model)
    groups = _layer_groups(select_sites(sites, config.layers))
    if config.budget is None:
        _check_memory(groups, config, device, None)
    return reader, model, sites, groups


def _check_memory(groups, config: FusionConfig, device: torch.device, widths: dict[str, int] | None) -> None:
    """Refuse a chosen site whose clustering cannot fit, at its planned width or at the budget's."""
    for group in groups:
        for site in group:
            width = widths[site.name] if widths is not None else planned_width(site, config)
            check_memory(site, site.read().row_length, width, config, device)


def _spread(
    model, reader: CheckpointReader, groups, config: FusionConfig, calibration, device
) -> dict[str, int]:
    """The budget's widths, from each site's sensitivity: on a first calibrated walk over the unfused layers,
    or (data-free) on each layer's MLPs read alone and released."""
    chosen = [site for group in groups for site in group]
    if calibration is not None:
        return spread_budget(_walk(model, reader, groups, calibration, device), chosen, config)
    curves = {}
    for group in groups:
        _read_group(model, group, reader, device)
        curves.update({site.name: sensitivity(model, site, config, None) for site in group})
        for site in group:
            model.get_submodule(site.name).to("meta")
    return budget_widths(chosen, curves, config)


def _write_group(model: nn.Module, group: list[MlpSite], shards: ShardWriter) -> None:
    """Write a fused layer's MLP tensors, then release them."""
    for site in group:
        module = model.get_submodule(site.name)
        for key, tensor in {
            **module.state_dict(prefix=site.name + "."),
            **placeholders(module, site.name),
        }.items():
            shards.add(key, tensor)
        module.to("meta")


def _walk(model, reader: CheckpointReader, groups, calibration: dict, device: torch.device) -> LayerWalk:
    """The calibrated walk over the layers of ``groups`` (refused as :class:`NotStreamable` when the chosen
    MLPs are not in one list of layers)."""
    aliases = {name: group for group in shared_names(model) for name in group}
    stored = reader.names()

    def read(name: str, where: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if name not in stored:
            name = next(alias for alias in aliases.get(name, ()) if alias in stored)
        return reader.read(name, where, dtype)

    try:
        by_layer = {stack_index(model, group[0].name): group for group in groups}
        return LayerWalk(model, read, by_layer, calibration, device)
    except LayerStackError as reason:
        raise NotStreamable(f"calibration layer by layer: {reason}") from None


def _return_large_blocks() -> None:
    """Let glibc serve blocks of 1 MB and more straight from the OS and give them back when freed, so that
    one layer's k-means memory is not kept (and added to by the next layer's) in per-thread heaps."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _meta_model(source: Path, reader: CheckpointReader, dtype: torch.dtype | None) -> nn.Module:
    """The model class the config names (else the bare model) whose tensor names the checkpoint has."""
    config = transformers.AutoConfig.from_pretrained(source)
    stored = getattr(config, "dtype", None)
    stored = DTYPES.get(str(stored).removeprefix("torch."), None) if stored is not None else None
    dtype = dtype or stored or reader.first_dtype or torch.float32
    builders = [*named_classes(config), transformers.AutoModel.from_config]
    for build in builders:
        model = meta_model(build, config, dtype, source)
        if _names_match(model, reader):
            return model.eval()
        if build is not builders[-1] and reader.names() <= set(model.state_dict()):
            check_head(type(model), missing_tensors(model, reader.names()), source)
    raise NotStreamable("its tensor names do not match the model's")


def _names_match(model: nn.Module, reader: CheckpointReader) -> bool:
    return reader.names() <= set(model.state_dict()) and not missing_tensors(model, reader.names())


def missing_tensors(model: nn.Module, stored: set[str]) -> list[str]:
    """The model's tensors that ``stored`` lacks, a tied weight counting as present under any of its names."""
    tied = {name: set(group) for group in shared_names(model) for name in group}
    return [name for name in model.state_dict() if name not in stored and not tied.get(name, set()) & stored]


def _stored_names(model: nn.Module, reader: CheckpointReader) -> list[str]:
    """The model's tensor names in its own order, each tied weight once (under the name the file uses)."""
    stored = reader.names()
    return [name for name in model.state_dict() if name in stored]


def _layer_groups(sites: list[MlpSite]) -> list[list[MlpSite]]:
    """Chosen sites grouped by layer (a layer can hold routed and shared experts)."""
    groups: dict[tuple, list[MlpSite]] = {}
    for site in sites:
        groups.setdefault((site.stack, site.layer), []).append(site)
    return list(groups.values())


def _fuse_group(
    model: nn.Module,
    group: list[MlpSite],
    reader: CheckpointReader,
    config: FusionConfig,
    device: torch.device,
    progress: Callable[[str], None] | None,
    widths: dict[str, int] | None,
) -> FusionReport:
    """Read one layer's MLPs onto ``device``, fuse them in place (at ``widths`` when a budget was spread),
    and bring them back to the CPU."""
    _read_group(model, group, reader, device)
    site = group[0]
    layer = f"{site.stack}:{site.layer}" if site.stack else site.layer
    report = fuse_sites(model, replace(config, layers=[layer]), progress, None, widths)
    for site in group:
        model.get_submodule(site.name).to("cpu")
    return report


def _read_group(
    model: nn.Module, group: list[MlpSite], reader: CheckpointReader, device: torch.device
) -> None:
    """Give one layer's chosen MLPs their tensors from the checkpoint, on ``device``."""
    for site in group:
        module = model.get_submodule(site.name)
        state = {
            key: reader.read(f"{site.name}.{key}", device, tensor.dtype)
            for key, tensor in module.state_dict().items()
        }
        module.load_state_dict(state, assign=True)


def export_checkpoint(
    source: Path,
    out: Path,
    *,
    tokenizer=None,
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
) -> int:
    """Fold the fused checkpoint ``source`` into a plain checkpoint in ``out``, one tensor at a time.

    Gives the tensors that :func:`mlp_fusion.export` gives on the loaded model, without loading it: each
    scaled or factored weight is read with its scale or factors, computed as the model computes it, and
    written; every other tensor is copied. Returns the number of weights folded.
    """
    model, _ = fused_skeleton(source)
    widths = export_widths(model)  # refused here, before anything is written
    check_writable(out, overwrite, source=source)
    reader = CheckpointReader(weight_files(source))
    missing = missing_tensors(model, reader.names())
    if missing:
        raise UserError(f"{source} lacks tensors the model needs: {', '.join(missing[:3])}; save it again")
    folded: set[str] = set()

    def write(tmp: Path) -> None:
        shards = ShardWriter(tmp, shard_bytes)
        for name in _stored_names(model, reader):
            owner, parametrized, rest = name.partition(".parametrizations.")
            if not parametrized:
                shards.add(name, reader.read(name, torch.device("cpu"), None))
                continue
            attr = rest.split(".")[0]  # "weight" of "weight.original", "weight.0.scale", ...
            chain = f"{owner}.parametrizations.{attr}"
            if chain not in folded:
                folded.add(chain)
                shards.add(f"{owner}.{attr}", _folded(model.get_submodule(chain), chain, reader))
        shards.close()
        set_widths(model.config, widths)
        write_side_files(tmp, model, tokenizer, export_notes(model))

    atomic_directory(out, overwrite, write)
    return len(folded)


def _folded(chain: nn.Module, prefix: str, reader: CheckpointReader) -> torch.Tensor:
    """The weight a parametrization chain computes from its stored tensors (then released)."""
    state = {key: reader.read(f"{prefix}.{key}", torch.device("cpu"), None) for key in chain.state_dict()}
    chain.load_state_dict(state, assign=True)
    with torch.no_grad():
        weight = chain()
    chain.to("meta")
    return weight
