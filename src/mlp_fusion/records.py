"""What fusing did: the per-site records a fused model carries (and ``fusion.json`` holds), and the report
of one fuse call. The floor under fusing, saving and loading alike."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from torch import nn

from .sites import MlpSite

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
