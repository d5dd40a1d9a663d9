"""The export verb: a fused model, in memory or saved, written with its scales folded in, in a format another
tool loads. Formats are rows: a plain transformers checkpoint folder (``hf``, :mod:`.plain_export`,
streamed a tensor at a time from a saved checkpoint by :mod:`.streaming`) and one llama.cpp file
(``gguf``, :mod:`.gguf_export`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import UserError, check_loaded
from .persistence import check_fused_format, read_fusion_file
from .plain_export import export_notes, export_widths, folded_copy, save_plain, set_widths
from .shard_io import SHARD_BYTES

EXPORT_FORMATS = ("hf", "gguf")


def export(
    model: nn.Module | str | Path,
    out: str | Path,
    tokenizer=None,
    *,
    format: str = "hf",
    gguf_type: str = "f16",
    overwrite: bool = False,
) -> Path:
    """Fold the scales into the weights and save the model in a format other tools load.

    ``format="hf"``: a plain checkpoint folder that vanilla transformers loads; every MLP whose width one
    config field sets must have the same width. ``format="gguf"``: one file that llama.cpp runs, with each
    layer's own width (Llama-family decoders), ``gguf_type`` one of f32, f16, q8_0, q4_k_m (the quantised
    types need the ``serve`` extra). Either computes the same function as the fused model, but no longer has
    its fine-tuning dynamics. ``model`` may also be a saved one (what :func:`export_saved` takes, its
    tokenizer read from it), exported as ``mlp-fusion export`` does.
    """
    if isinstance(model, str | Path):
        if tokenizer is not None:
            raise UserError("a saved model is exported with its own tokenizer: give no tokenizer")
        export_saved(model, out, format=format, gguf_type=gguf_type, overwrite=overwrite)
        return Path(out)
    check_loaded(model)
    check_fused_format(model)
    _check_format(format)
    if format == "gguf":
        from .gguf_export import check_gguf_model, write_gguf

        check_gguf_model(model, tokenizer, gguf_type, Path(out), overwrite)
        return write_gguf(folded_copy(model), Path(out), tokenizer, gguf_type, overwrite=overwrite)
    widths = export_widths(model)
    plain = folded_copy(model)
    set_widths(plain.config, widths)
    return save_plain(plain, out, tokenizer, overwrite=overwrite, notes=export_notes(model))


def export_saved(
    source: str | Path,
    out: str | Path,
    *,
    format: str = "hf",
    gguf_type: str = "f16",
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
) -> str:
    """:func:`export` of a saved model (what ``mlp-fusion export`` runs); returns a line saying what was
    written. The plain format takes a fused checkpoint folder and streams it a tensor at a time; GGUF loads
    ``source``, which may also be any model the other commands take (an alias, an unfused folder), so that
    the original can be served beside its fused version."""
    from .loading import load_model, load_tokenizer

    out = Path(out)
    _check_format(format)
    if format == "gguf":
        loaded = load_model(str(source))
        export(loaded.model, out, loaded.tokenizer, format=format, gguf_type=gguf_type, overwrite=overwrite)
        size = out.stat().st_size / 2**20
        return f"exported to {out}: a {gguf_type} GGUF file of {size:.1f} MiB for llama.cpp, each layer at its own width"
    from .streaming import export_checkpoint

    source = Path(source)
    read_fusion_file(source)
    folded = export_checkpoint(
        source, out, tokenizer=load_tokenizer(source), overwrite=overwrite, shard_bytes=shard_bytes
    )
    return (
        f"exported to {out}: a plain checkpoint, {folded} weights with their scales or factors folded in "
        "(same outputs; fine-tune the fused checkpoint to keep the paper's training dynamics)"
    )


def _check_format(format: str) -> None:
    if format not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {format!r}: use {', '.join(EXPORT_FORMATS)}")
