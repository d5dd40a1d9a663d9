"""Fusing the chosen sites of a model one after the other, on calibration runs when given: every check
(layers, widths, finite weights, memory) first, then each site's method, its result written in place,
the refit, and the record. :func:`mlp_fusion.fuse` drives it for the whole model, the layer walks
(:mod:`mlp_fusion.layer_runs`, :mod:`mlp_fusion.streaming`) for one layer at a time."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace

import torch
from torch import nn

from .batches import fit_to_positions
from .budget import WidthCurve, allocate_widths, width_curve
from .calibration import Runs, calibrate_hidden, calibrate_site, reconstruct, refit_output
from .config import FusionConfig, names_site
from .errors import UserError
from .families import find_sites
from .memory import check_fits, experts_per_chunk
from .methods import METHODS, MethodResult, SubMlps, join_results
from .narrowing import apply_result, use_compatible_experts_kernel
from .records import RECORD_ATTR, FusionReport, LayerReport, SiteRecord, fusion_records
from .sites import MlpSite, StackedExperts


def fuse_sites(
    model: nn.Module,
    config: FusionConfig,
    progress: Callable[[str], None] | None,
    calibration: Runs | None,
    widths: dict[str, int] | None = None,
) -> FusionReport:
    """Fuse the sites ``config`` chooses, in place, on the ``calibration`` runs when given; the report.
    ``widths``: each site's width when a budget was already spread (see :func:`plan_sites`)."""
    start = time.perf_counter()
    sites = find_sites(model)
    plans = plan_sites(model, sites, config, calibration, widths)
    report = FusionReport.begin(model, sites, config.method)
    records = fusion_records(model)
    stream = {site.name: position for position, site in enumerate(sites)}
    for number, (site, width) in enumerate(plans, 1):
        if progress is not None:
            progress(f"[{number}/{len(plans)}] {config.method} {site.describe()} -> {width}")
        site_start = time.perf_counter()
        sub = replace(working_copy(site), stream=stream[site.name])
        result, refit_error = _fuse_site(model, site, sub, width, config, calibration)
        seconds = time.perf_counter() - site_start
        records.append(
            SiteRecord(
                site.name, site.layer, site.experts, sub.width, result.sub.width, config.method,
                result.scale is not None, result.rank, config.seed, asdict(config),
            )
        )  # fmt: skip
        for expert in range(sub.batch):
            inertia = None if result.inertia is None else float(result.inertia[expert])
            report.layers.append(
                LayerReport(
                    site.name, site.layer, expert if site.experts else None, sub.width, result.sub.width,
                    inertia, seconds / sub.batch, refit_error,
                )
            )  # fmt: skip
        # Kept current, so that an interrupted call still says what it changed.
        setattr(model, RECORD_ATTR, records)
    return report.finish(model, sites, start)


def _fuse_site(
    model: nn.Module, site: MlpSite, sub: SubMlps, width: int, config: FusionConfig, calibration: Runs | None
) -> tuple[MethodResult, float | None]:
    """Run the method on one site and write the result; with calibration inputs, weight and refit."""
    statistics = calibrate_site(calibration, site) if calibration is not None else None
    weights = statistics.input_weights(sub) if statistics is not None and config.weighting else None
    with torch.no_grad():
        if weights is None:
            result = run_method(sub, width, config)
        else:
            result = run_method(sub.scale_inputs(weights), width, config)
            result.sub = result.sub.scale_inputs(1.0 / weights)
        apply_result(site, result)
    use_compatible_experts_kernel(model, [site])  # before the next forward pass, not only at the end
    if statistics is None or result.rank is not None:
        return result, None
    error = refit_output(calibration, site, statistics, config.ridge) if config.refit else None
    if config.reconstruct_steps:
        fitted = reconstruct(model, site, statistics, config.reconstruct_steps, config.seed)
        error = fitted if fitted is not None else error
    return result, error


def run_method(sub: SubMlps, width: int, config: FusionConfig) -> MethodResult:
    """``config.method`` on one site; a clustering method takes a layer's experts in chunks that fit in free
    memory (each expert is clustered on its own, so the result does not depend on the chunk size)."""
    method = METHODS[config.method]
    chunk = sub.batch
    if method.clusters:
        chunk = experts_per_chunk(sub.width, sub.row_length, width, sub.batch, sub.output.device)
    if chunk >= sub.batch:
        return method(sub, width, config)
    chunks = [
        replace(sub.map_rows(lambda t, s=start: t[s : s + chunk]), first_expert=start)
        for start in range(0, sub.batch, chunk)
    ]
    return join_results([method(part, width, config) for part in chunks])


def check_memory(
    site: MlpSite, row_length: int, width: int, config: FusionConfig, device: torch.device
) -> None:
    """Refuse a site whose clustering would not fit in the free memory of ``device`` even one MLP at a time."""
    if METHODS[config.method].clusters:
        check_fits(site.describe(), site.width, row_length, width, device)


def checked_calibration_batch(batch: dict, model: nn.Module) -> dict:
    """A tokenised calibration batch, checked and cut to the model's position limit."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not len(ids):
        raise UserError("calibration must be a tokenised batch: a dict with a 2-D input_ids tensor")
    if "attention_mask" not in batch or batch["attention_mask"].shape != ids.shape:
        raise UserError("calibration needs an attention_mask of the same shape as input_ids")
    return fit_to_positions(batch, model)


def select_sites(sites: list[MlpSite], layers: list[int | str] | str) -> list[MlpSite]:
    """The sites ``layers`` names; a layer past the last, or a layer with no MLP, is an error."""
    if layers == "all":
        return sites
    for reference in layers:
        stack, _, index = str(reference).rpartition(":")
        present = sorted({s.layer for s in sites if not stack or s.stack == stack})
        where = f"the {stack} stack's" if stack else "this model's"
        if not present:
            stacks = sorted({s.stack for s in sites if s.stack}) or ["none: the model has one stack"]
            raise UserError(f"no MLP in a {stack} stack; this model's stacks: {', '.join(stacks)}")
        if int(index) not in present:
            problem = "is out of range" if int(index) > present[-1] else "has no MLP"
            raise UserError(f"layer {reference} {problem}: {where} MLP layers are {_ranges(present)}")
    return [site for site in sites if names_site(layers, site.stack, site.layer)]


def working_copy(site: MlpSite) -> SubMlps:
    """The site's sub-MLPs in at least float32: methods and k-means never work in half precision (the
    result is written back in the model's own dtype)."""
    sub = site.read()
    return sub.map_rows(lambda t: t.float()) if sub.output.dtype in (torch.float16, torch.bfloat16) else sub


def plan_sites(
    model: nn.Module,
    sites: list[MlpSite],
    config: FusionConfig,
    calibration: Runs | None,
    widths: dict[str, int] | None = None,
) -> list[tuple[MlpSite, int]]:
    """Each chosen site with its new width, every check made: ``config``'s width, a budget spread by each
    site's sensitivity on the ``calibration`` runs, or the ``widths`` given (a budget spread already)."""
    return planned(model, checked_sites(model, sites, config), config, calibration, widths)


def planned(
    model: nn.Module,
    checked: list[tuple[MlpSite, tuple[int, torch.device]]],
    config: FusionConfig,
    calibration: Runs | None,
    widths: dict[str, int] | None = None,
) -> list[tuple[MlpSite, int]]:
    """:func:`plan_sites` on sites :func:`checked_sites` has checked already."""
    chosen = [site for site, _ in checked]
    if widths is None and config.budget is not None:
        curves = {site.name: sensitivity(model, site, config, calibration) for site in chosen}
        widths = budget_widths(chosen, curves, config)
    plans = [(site, planned_width(site, config) if widths is None else widths[site.name]) for site in chosen]
    for (site, width), (_, (row_length, device)) in zip(plans, checked):
        check_memory(site, row_length, width, config, device)
    return plans


def chosen_sites(sites: list[MlpSite], config: FusionConfig, done: set[str]) -> list[MlpSite]:
    """The sites ``config`` chooses, refused when one is in ``done`` (fused already) or cannot have its
    width. Reads no weight, so it also serves a model built on the meta device, before any work."""
    chosen = select_sites(sites, config.layers)
    for site in chosen:
        if site.name in done:
            raise UserError(f"{site.name} is already fused; start again from the original model")
        planned_width(site, config)
    return chosen


def checked_sites(
    model: nn.Module, sites: list[MlpSite], config: FusionConfig
) -> list[tuple[MlpSite, tuple[int, torch.device]]]:
    """The sites ``config`` chooses, in model order, each with its row length and device, once its weights
    are checked (loaded, finite, not fused already) and its width is one it can have."""
    checked = []
    for site in chosen_sites(sites, config, {record.name for record in fusion_records(model)}):
        sub = site.read()  # not kept: one site's copy at a time
        if any(t.is_meta for t in (*sub.inputs, sub.output)):
            raise UserError(
                f"{site.describe()} has weights that are not loaded (offloaded, or on the meta device); load "
                "the whole model onto one device, without device_map offloading, before fusing"
            )
        if not all(bool(torch.isfinite(t).all()) for t in (*sub.inputs, sub.output)):
            raise UserError(f"{site.describe()} has NaN or infinite weights; fusion needs finite weights")
        checked.append((site, (sub.row_length, sub.output.device)))
    return checked


def planned_width(site: MlpSite, config: FusionConfig) -> int:
    """The width ``config`` gives ``site`` (before a budget is spread); refused above the site's width."""
    width = config.target_width(site.width)
    if config.ratio is not None:
        width = kernel_friendly_width(site, width)
    if width > site.width:
        raise UserError(f"width {width} is above the width of {site.describe()}; choose at most {site.width}")
    return width


def kernel_friendly_width(site: MlpSite, width: int) -> int:
    """For stacked experts, ``width`` rounded to a multiple that keeps rows 16-byte aligned, so that
    transformers' grouped-matmul experts kernel stays usable (an unaligned width forces the eager loop on
    the whole model); other sites, and widths that would move by more than an eighth (small MLPs) or past
    the MLP's width, are kept."""
    if not isinstance(site, StackedExperts):
        return width
    multiple = max(1, 16 // site.module.down_proj.element_size())
    rounded = max(multiple, round(width / multiple) * multiple)
    return rounded if rounded <= site.width and abs(rounded - width) <= width / 8 else width


def budget_widths(
    sites: list[MlpSite], curves: dict[str, WidthCurve], config: FusionConfig
) -> dict[str, int]:
    """Each site's width (by name) keeping ``config.budget`` of the sites' parameters, spread by their
    sensitivity ``curves`` (by name)."""
    ordered = [curves[site.name] for site in sites]
    total = sum(curve.neuron_cost * site.width for curve, site in zip(ordered, sites))
    budget = int(config.budget * total)
    if budget < sum(curve.neuron_cost for curve in ordered):
        raise UserError(f"a budget of {config.budget} cannot keep one neuron in every chosen MLP; raise it")
    widths = allocate_widths(ordered, budget, config.budget)
    return {site.name: width for site, width in zip(sites, widths)}


def sensitivity(
    model: nn.Module, site: MlpSite, config: FusionConfig, calibration: Runs | None
) -> WidthCurve:
    """The site's error against width, for a budget: its output error on the calibration runs (of the unfused
    model) when there are some, else the data-free inertia."""
    sub = working_copy(site)
    if calibration is None:
        return width_curve(sub, config.canonical, config.seed)
    statistics, hidden = calibrate_hidden(calibration, site)
    if config.weighting:
        sub = sub.scale_inputs(statistics.input_weights(sub))
    return width_curve(sub, config.canonical, config.seed, hidden)


def _ranges(values: list[int]) -> str:
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))
