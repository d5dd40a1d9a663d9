"""``ntk(model, NtkSettings(...))``: what each method keeps of a model (output error, Adam and SGD kernels)
at each ratio, on probe inputs: the library verb behind ``mlp-fusion ntk``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import FusionConfig, check_field_names, parse_layers
from ..errors import UserError, check_given
from ..loading import DEFAULT_MODEL, LoadSettings
from .kernels import KERNELS

# FusionConfig fields that ntk passes to every method (``methods``, ``ratios`` and ``layers`` name the rest)
FUSION_OPTIONS = ("n_init", "keep_fraction", "canonical", "weighting", "refit", "ridge")
BUILT_IN_PROBES = 16


@dataclass
class NtkSettings:
    """Which methods and ratios ``ntk`` compares, on which probes, and what it measures. Lists may be given
    as comma-separated text (as the command takes them)."""

    methods: tuple[str, ...] | str = field(
        default="all", metadata={"help": "comma-separated methods, or all"}
    )
    ratios: tuple[float, ...] | str = field(
        default="0.5,0.25,0.125", metadata={"help": "comma-separated ratios"}
    )
    layers: list[int] | str = field(default="all", metadata={"help": "layers to fuse, as for compress"})
    probes: int | None = field(
        default=None, metadata={"help": f"number of built-in probe sentences (default {BUILT_IN_PROBES})"}
    )
    probe_file: Path | None = field(
        default=None, metadata={"help": "text file (one input per line) or TSV/CSV with a text column"}
    )
    max_probes: int = field(default=64, metadata={"help": "inputs taken from --probe-file"})
    kernels: tuple[str, ...] | str = field(
        default="adam,sgd", metadata={"help": "comma-separated: adam, sgd"}
    )
    params: str = field(default="mlp", metadata={"help": "mlp, fused, all, or a layer index"})
    seed: int = field(default=0, metadata={"help": "seed of fusion and of the readout vector"})
    max_memory: float = field(default=1024, metadata={"help": "MB of per-example gradients held at once"})
    batch_size: int = field(default=16, metadata={"help": "probes per forward/backward pass"})
    max_length: int = field(default=64, metadata={"help": "longest probe or calibration input in tokens"})

    def __post_init__(self) -> None:
        from ..methods import METHODS

        methods = _names(self.methods, "method")
        self.methods = tuple(METHODS) if methods == ["all"] else tuple(methods)
        self.ratios = tuple(_ratio(text) for text in _names(self.ratios, "ratio"))
        self.kernels = tuple(_names(self.kernels, "kernel"))
        unknown = set(self.kernels) - set(KERNELS)
        if unknown:
            raise UserError(f"unknown kernel {sorted(unknown)[0]!r}: choose from {', '.join(KERNELS)}")
        if self.params not in ("mlp", "fused", "all") and not str(self.params).isdigit():
            raise UserError(f"unknown parameter set {self.params!r}: use mlp, fused, all, or a layer index")
        self.layers = parse_layers(self.layers)
        if self.batch_size < 1 or self.max_memory <= 0 or self.max_length < 1:
            raise UserError("--batch-size and --max-length must be at least 1, and --max-memory above 0")
        if self.probe_file is not None and self.probes is not None:
            raise UserError("give --probes or --probe-file, not both")
        if self.probe_file is not None and self.max_probes < 1:
            raise UserError("--max-probes must be at least 1")
        self.probe_file = None if self.probe_file is None else Path(self.probe_file)


def ntk(
    model: str | Path = DEFAULT_MODEL,
    settings: NtkSettings | None = None,
    *,
    calibration_texts: list[str] | None = None,
    calibration_samples: int = 128,
    load: LoadSettings | None = None,
    plot: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    **fusion_fields,
) -> dict:
    """Fuse copies of ``model`` (a bundled alias, directory or hub id) by every method at every ratio of
    ``settings`` and measure each against the original: ``{"model", "layers", "params_set", "rows", ...}``,
    a row per method and ratio (output and layer errors, each kernel's error and alignment, parameters,
    seconds). ``fusion_fields``: the FusionConfig fields of FUSION_OPTIONS, for every method;
    ``calibration_texts`` make every fusion calibration-aware; ``plot``: a PNG of error against ratio.
    Every argument is checked before the model is loaded."""
    from ..batches import probe_batch
    from ..calibration import first_calibration_batch
    from ..loading import load_model
    from .compare import compare_methods

    settings = settings or NtkSettings()
    check_given((settings, NtkSettings, "settings"), (load, LoadSettings, "load"))
    options = _fusion_options(settings, fusion_fields)
    texts, count = _probes(settings)
    plot = None if plot is None else Path(plot)
    if plot is not None and plot.suffix.lower() != ".png":
        raise UserError(f"--plot writes a PNG: give a file name ending in .png, not {plot.name}")
    if calibration_samples < 1 or (calibration_texts is not None and not calibration_texts):
        raise UserError("--calibration-samples must be at least 1, and calibration texts not empty")
    say = progress or (lambda message: None)
    say(f"loading {model}")
    loaded = load_model(str(model), load)
    batch = probe_batch(
        loaded.model, loaded.tokenizer, count=count, max_length=settings.max_length, texts=texts
    )
    calibration = first_calibration_batch(
        loaded.tokenizer, calibration_texts, None, calibration_samples, settings.max_length
    )
    result = compare_methods(
        loaded.model, batch, methods=list(settings.methods), ratios=list(settings.ratios), layers=settings.layers,
        kernels=settings.kernels, params=settings.params, seed=settings.seed, batch_size=settings.batch_size,
        max_memory_mb=settings.max_memory, progress=say, fusion_options=options, calibration=calibration,
    )  # fmt: skip
    result.pop("reference")  # tensors, for callers that compare more methods later
    result = {"model": loaded.source, "layers": settings.layers, "params_set": settings.params, **result}
    if plot is not None:
        from .plot import plot_rows

        plot_rows(
            result["rows"], settings.kernels, plot, title=f"{model}, layers {settings.layers}, {count} probes"
        )
    return result


def _probes(settings: NtkSettings) -> tuple[list[str] | None, int]:
    """The probe texts (None: the built-in sentences) and how many are used."""
    from ..batches import PROBE_SENTENCES, read_probe_texts

    if settings.probe_file is not None:
        texts = read_probe_texts(settings.probe_file, settings.max_probes)
        return texts, len(texts)
    count = BUILT_IN_PROBES if settings.probes is None else settings.probes
    if not 1 <= count <= len(PROBE_SENTENCES):
        raise UserError(
            f"--probes must be between 1 and {len(PROBE_SENTENCES)}; use --probe-file for more inputs"
        )
    return None, count


def _fusion_options(settings: NtkSettings, fusion_fields: dict) -> dict:
    """The FusionConfig fields given for every method, each method's config checked with them."""
    check_field_names(fusion_fields)
    extra = sorted(set(fusion_fields) - set(FUSION_OPTIONS))
    if extra:
        raise UserError(f"{extra[0]} is set by ntk itself or not a fusion option it takes; leave it out")
    for method in settings.methods:
        FusionConfig(method=method, **fusion_fields)  # validates the name and the options
    return fusion_fields


def format_ntk_table(rows: list[dict], kernels: tuple[str, ...]) -> str:
    """The rows of :func:`ntk` as the command prints them."""
    header = f"{'method':8} {'ratio':>6} {'output err':>10} {'layer err':>9}"
    header += (
        "".join(f" {k + ' err':>9} {k + ' align':>10}" for k in kernels) + f" {'params':>12} {'seconds':>8}"
    )
    lines = [header]
    for row in rows:
        line = f"{row['method']:8} {row['ratio']:>6g} {row['output_error']:>10.4f} {row['layer_output_error']:>9.4f}"
        line += "".join(f" {row[k + '_error']:>9.4f} {row[k + '_alignment']:>10.4f}" for k in kernels)
        lines.append(line + f" {row['params']:>12,} {row['seconds']:>8.1f}")
    return "\n".join(lines)


def _names(value: tuple | list | str, what: str) -> list[str]:
    parts = value.split(",") if isinstance(value, str) else [str(part) for part in value]
    names = [part.strip() for part in parts if part.strip()]
    if not names:
        raise UserError(f"give at least one {what}")
    return names


def _ratio(text: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        raise UserError(f"ratio {text!r} is not a number") from None
    if not 0 < ratio <= 1:
        raise UserError(f"ratio must be in (0, 1], got {text}")
    return ratio
