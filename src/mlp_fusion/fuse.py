"""``fuse(model, config)``: the one verb. Validates everything first, then rewrites the chosen MLPs in place."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .budget import WidthCurve, allocate_widths, width_curve
from .calibration import ModelRuns, Runs, calibrate_hidden, calibrate_site, reconstruct, refit_output
from .config import FusionConfig, names_site
from .errors import UserError
from .families import find_sites
from .memory import check_fits, experts_per_chunk
from .methods import METHODS, MethodResult, SubMlps, join_results
from .narrowing import apply_result, use_compatible_experts_kernel
from .sites import MlpSite, StackedExperts

RECORD_ATTR = "mlp_fusion_record"


@dataclass
class SiteRecord:
    """What was done to one site; enough to rebuild its shapes when loading."""

    name: str
    layer: int
    experts: int | None
    width_before: int
    width: int
    method: str
    scaled: bool
    rank: int | None
    seed: int | None = None
    settings: dict | None = None  # every field of the FusionConfig that made it


@dataclass
class LayerReport:
    name: str
    layer: int
    expert: int | None
    width_before: int
    width_after: int
    inertia: float | None
    seconds: float
    calibration_error: float | None = None  # relative output error on calibration tokens after the refit


@dataclass
class FusionReport:
    method: str
    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    mlp_flops_before: int = 0
    mlp_flops_after: int = 0
    seconds: float = 0.0

    @classmethod
    def begin(cls, model: nn.Module, sites: list[MlpSite], method: str) -> FusionReport:
        """An empty report of ``model`` before fusing: its parameters and the MLP FLOPs of ``sites``."""
        report = cls(method=method, params_before=count_parameters(model))
        report.mlp_flops_before = sum(site.mlp_flops_per_token() for site in sites)
        return report

    def finish(self, model: nn.Module, sites: list[MlpSite], start: float) -> FusionReport:
        """The report completed after fusing: parameters, MLP FLOPs and seconds since ``start``."""
        self.params_after = count_parameters(model)
        self.mlp_flops_after = sum(site.mlp_flops_per_token() for site in sites)
        self.seconds = time.perf_counter() - start
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def format_table(self) -> str:
        refit = any(row.calibration_error is not None for row in self.layers)
        extra = f" {'refit err':>9}" if refit else ""
        lines = [f"{'layer':>5} {'expert':>6} {'width':>13} {'inertia':>12}{extra} {'seconds':>8}  module"]
        for row in self.layers:
            expert = "-" if row.expert is None else str(row.expert)
            inertia = "-" if row.inertia is None else f"{row.inertia:.2f}"
            widths = f"{row.width_before} -> {row.width_after}"
            error = "-" if row.calibration_error is None else f"{row.calibration_error:.4f}"
            extra = f" {error:>9}" if refit else ""
            lines.append(
                f"{row.layer:>5} {expert:>6} {widths:>13} {inertia:>12}{extra} {row.seconds:>8.2f}  {row.name}"
            )
        lines.append(
            f"parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({100 * (1 - self.params_after / self.params_before):.1f}% fewer)"
        )
        lines.append(f"MLP FLOPs per token: {self.mlp_flops_before:,} -> {self.mlp_flops_after:,}")
        lines.append(f"method {self.method}, {len(self.layers)} rows, {self.seconds:.1f} s")
        return "\n".join(lines)


def fuse(
    model: nn.Module,
    config: FusionConfig,
    progress: Callable[[str], None] | None = None,
    calibration: dict | Runs | None = None,
) -> FusionReport:
    """Fuse the MLPs of ``model`` chosen by ``config``, in place, and report what changed.

    Every check (layers, widths, finite weights) runs before the first site is touched. ``progress``, when
    given, receives one line per site. ``calibration``, a tokenised batch (``input_ids`` and
    ``attention_mask``, right-padded), turns on calibration-aware fusion (see :mod:`mlp_fusion.calibration`);
    layer-by-layer fusion passes its own :class:`~mlp_fusion.calibration.Runs` instead.
    """
    if not isinstance(config, FusionConfig):
        raise UserError(f"config must be a FusionConfig, got {type(config).__name__}")
    if calibration is not None and not hasattr(calibration, "parts"):  # a batch, not Runs
        check_calibration_batch(calibration)
        walked = _fuse_walking(model, config, calibration, progress)
        if walked is not None:
            return walked
        calibration = ModelRuns(model, calibration)
    start = time.perf_counter()
    sites = find_sites(model)
    plans = _plan(model, sites, config, calibration)
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
                site.name,
                site.layer,
                site.experts,
                sub.width,
                result.sub.width,
                config.method,
                result.scale is not None,
                result.rank,
                config.seed,
                asdict(config),
            )
        )
        for expert in range(sub.batch):
            inertia = None if result.inertia is None else float(result.inertia[expert])
            report.layers.append(
                LayerReport(
                    site.name,
                    site.layer,
                    expert if site.experts else None,
                    sub.width,
                    result.sub.width,
                    inertia,
                    seconds / sub.batch,
                    refit_error,
                )
            )
        # Kept current, so that an interrupted call still says what it changed.
        setattr(model, RECORD_ATTR, records)
    from .persistence import follow_native_save  # here, not at the top: persistence builds on this module

    follow_native_save(model)  # the model's own save_pretrained now writes the fused format
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


def check_calibration_batch(batch: dict | None) -> None:
    if batch is None:
        return
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not len(ids):
        raise UserError("calibration must be a tokenised batch: a dict with a 2-D input_ids tensor")
    if "attention_mask" not in batch or batch["attention_mask"].shape != ids.shape:
        raise UserError("calibration needs an attention_mask of the same shape as input_ids")


def _fuse_walking(
    model: nn.Module, config: FusionConfig, batch: dict, progress: Callable[[str], None] | None
) -> FusionReport | None:
    """Calibrated fusion one layer at a time (:func:`mlp_fusion.layer_runs.fuse_walking`), after every check;
    None when it does not apply. A budget compares every site on the unfused model first, so it does not."""
    if config.budget is not None:
        return None
    sites = find_sites(model)
    chosen = [site for site, _ in _plan(model, sites, config, None)]  # every check before any site is touched
    from .layer_runs import fuse_walking  # here, not at the top: layer_runs builds on this module

    return fuse_walking(model, config, batch, progress, sites, chosen)


def record_layers(model: nn.Module, layers, since: int = 0) -> None:
    """Record ``layers`` as the chosen layers of every record from the ``since``-th on: a call that fused
    one layer at a time (each with a :func:`fuse` of its own) is recorded as the one call it was."""
    for record in fusion_records(model)[since:]:
        record.settings = {**record.settings, "layers": layers}


def fusion_records(model: nn.Module) -> list[SiteRecord]:
    """What earlier :func:`fuse` calls did to ``model`` (empty for an unfused model)."""
    return list(getattr(model, RECORD_ATTR, []))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


def _plan(
    model: nn.Module, sites: list[MlpSite], config: FusionConfig, calibration: Runs | None
) -> list[tuple[MlpSite, int]]:
    done = {record.name for record in fusion_records(model)}
    plans, shapes = [], {}
    for site in select_sites(sites, config.layers):
        if site.name in done:
            raise UserError(f"{site.name} is already fused; start again from the original model")
        width = planned_width(site, config)
        sub = site.read()  # not kept: one site's copy at a time
        if any(t.is_meta for t in (*sub.inputs, sub.output)):
            raise UserError(
                f"{site.describe()} has weights that are not loaded (offloaded, or on the meta device); load "
                "the whole model onto one device, without device_map offloading, before fusing"
            )
        if not all(bool(torch.isfinite(t).all()) for t in (*sub.inputs, sub.output)):
            raise UserError(f"{site.describe()} has NaN or infinite weights; fusion needs finite weights")
        plans.append((site, width))
        shapes[site.name] = (sub.row_length, sub.output.device)
    if config.budget is not None:
        plans = _plan_budget(model, plans, config, calibration)
    for site, width in plans:
        row_length, device = shapes[site.name]
        check_memory(site, row_length, width, config, device)
    return plans


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


def _plan_budget(
    model: nn.Module, plans: list[tuple[MlpSite, int]], config: FusionConfig, calibration: Runs | None
) -> list[tuple[MlpSite, int]]:
    """Widths that keep ``config.budget`` of the chosen sites' parameters, spread by sensitivity: each site's
    output error on the calibration inputs when there are some (measured on the unfused model), else the
    data-free inertia."""
    curves = [_sensitivity(model, site, config, calibration) for site, _ in plans]
    total = sum(curve.neuron_cost * site.width for curve, (site, _) in zip(curves, plans))
    budget = int(config.budget * total)
    if budget < sum(curve.neuron_cost for curve in curves):
        raise UserError(f"a budget of {config.budget} cannot keep one neuron in every chosen MLP; raise it")
    widths = allocate_widths(curves, budget, config.budget)
    return [(site, width) for (site, _), width in zip(plans, widths)]


def _sensitivity(
    model: nn.Module, site: MlpSite, config: FusionConfig, calibration: Runs | None
) -> WidthCurve:
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
