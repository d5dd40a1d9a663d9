"""FusionConfig: what to fuse and how, validated when it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .errors import UserError
from .methods import METHODS

# the fields that matter only with calibration inputs
CALIBRATION_FIELDS = ("weighting", "refit", "ridge", "reconstruct_steps", "block_steps")


@dataclass
class FusionConfig:
    """Settings of one :func:`mlp_fusion.fuse` call.

    Give either ``ratio`` (kept fraction of each MLP's width) or ``width`` (the same width for every fused
    MLP). ``layers`` is ``"all"``, a list of layer indices, or a spec such as ``"2-5"``, ``"0,2,4-6"`` or
    ``"encoder:1,decoder:9-11"`` (see :func:`parse_layers`).
    """

    method: str = field(
        default="fusion", metadata={"help": "one of the methods ('mlp-fusion methods' lists them)"}
    )
    ratio: float | None = field(
        default=None, metadata={"help": "kept fraction of each MLP's width, in (0, 1] (default 0.25)"}
    )
    width: int | None = field(default=None, metadata={"help": "new width of every fused MLP"})
    budget: float | None = field(
        default=None,
        metadata={
            "help": "fraction of the chosen MLPs' parameters to keep, widths spread across layers by "
            "their sensitivity (instead of one ratio)"
        },
    )
    layers: list[int | str] | str = field(
        default="all",
        metadata={
            "help": "layers to fuse: 'all', a list '2,3,5', a range '2-5', or per stack 'encoder:1,decoder:9-11'"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of k-means and of the sketch"})
    n_init: int = field(default=1, metadata={"help": "k-means restarts (the lowest inertia is kept)"})
    max_iter: int = field(default=100, metadata={"help": "Lloyd iterations per restart"})
    hartigan_rounds: int = field(default=50, metadata={"help": "rounds of Hartigan refinement (0: off)"})
    keep_fraction: float = field(
        default=0.0,
        metadata={
            "help": "sketch and the k-means methods: share of the width given to the top-scored neurons "
            "(||w_in|| ||w_out||, activation-weighted with calibration), kept exactly; the method fills the rest"
        },
    )
    canonical: bool = field(
        default=True,
        metadata={
            "help": "k-means methods: cluster sub-MLPs in a canonical form of their exact symmetries",
            "off_help": "k-means methods: cluster the raw sub-MLP vectors, as the paper did",
        },
    )
    weighting: bool = field(
        default=True,
        metadata={
            "help": "with calibration inputs: weight input coordinates by their RMS activation before the method",
            "off_help": "with calibration inputs: do not weight the input coordinates",
        },
    )
    refit: bool = field(
        default=True,
        metadata={
            "help": "with calibration inputs: refit the output projection by ridge least squares (scale kept)",
            "off_help": "with calibration inputs: keep the method's output projection (no least-squares refit)",
        },
    )
    ridge: float = field(
        default=0.1,
        metadata={
            "help": "ridge weight of the refit toward the method's weights, relative to the activation energy"
        },
    )
    reconstruct_steps: int = field(
        default=0,
        metadata={
            "help": "with calibration inputs: Adam steps fitting each fused dense MLP's stored weights (scale "
            "kept) to the original MLP's outputs on the calibration tokens, after the refit (0: off)"
        },
    )

    block_steps: int = field(
        default=0,
        metadata={
            "help": "with calibration inputs: Adam steps fitting each fused layer's MLP weights (scales kept) so "
            "that the whole layer, on the already fused layers' outputs, gives the original model's layer "
            "outputs, after the refit (0: off)"
        },
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(sorted(METHODS))}")
        if sum(value is not None for value in (self.ratio, self.width, self.budget)) > 1:
            raise UserError("give one of a ratio, a width or a budget, not several")
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
                raise UserError(f"budget must be a number in (0, 1], got {self.budget!r}")
            if not (math.isfinite(self.budget) and 0 < self.budget <= 1):
                raise UserError(f"budget must be in (0, 1], got {self.budget}")
        elif self.ratio is None and self.width is None:
            self.ratio = 0.25
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise UserError(f"ratio must be a number in (0, 1], got {self.ratio!r}")
            if not (math.isfinite(self.ratio) and 0 < self.ratio <= 1):
                raise UserError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int)):
            raise UserError(f"width must be a whole number of neurons, got {self.width!r}")
        if self.width is not None and self.width < 1:
            raise UserError(f"width must be at least 1, got {self.width}")
        if not 0 <= self.keep_fraction < 1:
            raise UserError(f"keep_fraction must be in [0, 1), got {self.keep_fraction}")
        for name in ("n_init", "max_iter"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge >= 0):
            raise UserError(f"ridge must be a number >= 0, got {self.ridge!r}")
        for name in ("reconstruct_steps", "block_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be a whole number, got {value!r}")
            if value < 0:
                raise UserError(f"{name} must be at least 0, got {value}")
        if self.hartigan_rounds < 0:
            raise UserError(f"hartigan_rounds must be at least 0, got {self.hartigan_rounds}")
        self.layers = parse_layers(self.layers)

    def check_calibration(self, given: bool) -> None:
        """Refuse fitting steps when no calibration inputs are ``given``: they fit toward them."""
        asked = [name for name in ("reconstruct_steps", "block_steps") if getattr(self, name)]
        if asked and not given:
            raise UserError(
                f"{' and '.join(asked)} need calibration inputs (the calibrated recipe, or --calibration FILE)"
            )

    def target_width(self, width: int) -> int:
        """The new width of an MLP that is ``width`` neurons wide now (with a budget: planned by fuse)."""
        if self.budget is not None:
            return width
        if self.width is not None:
            return self.width
        return max(1, round(self.ratio * width))


def check_field_names(given) -> None:
    """Refuse a name among ``given`` that is no FusionConfig field (a misspelt keyword, say)."""
    unknown = sorted(set(given) - {f.name for f in fields(FusionConfig)})
    if unknown:
        raise UserError(f"unknown fusion setting {unknown[0]!r}: use the fields of FusionConfig")


def parse_layers(spec: list[int | str] | tuple | range | str) -> list[int | str] | str:
    """``"all"`` stays ``"all"``; a spec becomes a sorted list of distinct layer references.

    A reference is an index (that layer in every stack) or ``"stack:index"`` (that layer of one stack of an
    encoder-decoder: ``encoder`` or ``decoder``). In a spec, ``stack:`` applies to the numbers after it
    until the next prefix: ``"2-5"``, ``"1,3"``, ``"encoder:5,7"``, ``"encoder:1,decoder:9-11"``.
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return "all"
        parts = [p.strip() for p in text.split(",") if p.strip()]
    else:
        try:
            parts = [str(i).strip().lower() for i in spec]
        except TypeError:
            raise UserError(f"layers must be 'all', a spec like '2-5' or a list, got {spec!r}") from None
    references: set[int | str] = set()
    stack = None
    for part in parts:
        if ":" in part:
            stack, _, part = (piece.strip() for piece in part.partition(":"))
            if stack not in STACKS:
                raise UserError(f"unknown stack {stack!r} in layers {spec!r}: use {' or '.join(STACKS)}")
        for index in _layer_range(part, spec):
            references.add(index if stack is None else f"{stack}:{index}")
    if not references:
        raise UserError(f"bad layer spec {spec!r}: it names no layer")
    return sorted(references, key=lambda r: (isinstance(r, str), str(r).partition(":")[0], _index(r)))


STACKS = ("encoder", "decoder")


def _layer_range(part: str, spec: object) -> range:
    low, dash, high = part.partition("-")
    try:
        start, end = int(low), int(high if dash else low)
    except ValueError:
        raise UserError(
            f"bad layer spec {spec!r}: use 'all', a list like '2,3,5', a range like '2-5', "
            "or a stack prefix like 'decoder:9-11'"
        ) from None
    if start < 0 or end < start:
        raise UserError(f"bad layer range {part!r}: use 'low-high' with 0 <= low <= high")
    return range(start, end + 1)


def _index(reference: int | str) -> int:
    return reference if isinstance(reference, int) else int(reference.partition(":")[2])


def names_site(layers: list[int | str] | str, stack: str | None, layer: int) -> bool:
    """Whether the parsed ``layers`` choose the MLP of ``layer`` in ``stack`` (None for a single stack)."""
    return layers == "all" or layer in layers or (stack is not None and f"{stack}:{layer}" in layers)
