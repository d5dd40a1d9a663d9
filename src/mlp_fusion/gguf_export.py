"""GGUF export for llama.cpp: a Llama-family decoder, fused or not, written with the scales folded in as
llama.cpp's ``deci`` architecture, the Llama block that builds every layer's MLP with that layer's own width
(llama.cpp's ``llama`` takes one width for all layers). Widths are written exactly, never padded.

Float types are written here with the ``gguf`` package; quantised types are made from a float32 file by
llama.cpp's own quantiser (the ``serve`` extra: ``pip install "mlp-fusion[serve]"``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint_files import atomic_file, check_writable_file
from .errors import UserError

GGUF_MAGIC = b"GGUF"
FLOAT_TYPES = ("f32", "f16")
# llama.cpp's names; it keeps a matrix whose rows are no multiple of the type's block in a fallback type
QUANTISED_TYPES = ("q8_0", "q4_k_m")
GGUF_TYPES = FLOAT_TYPES + QUANTISED_TYPES
ARCH = "deci"


def write_gguf(plain: nn.Module, target: Path, tokenizer, gguf_type: str = "f16", *, overwrite=False) -> Path:
    """Write the unfused model ``plain`` (:func:`mlp_fusion.plain_export.folded_copy` of a fused one) and its
    ``tokenizer`` as one GGUF file that llama.cpp runs; checked first by :func:`check_gguf_model`."""

    def write(tmp: Path) -> None:
        if gguf_type in FLOAT_TYPES:
            write_float_gguf(plain, tmp, tokenizer, gguf_type)
            return
        full = tmp.with_name(tmp.name + ".f32")
        try:
            write_float_gguf(plain, full, tokenizer, "f32")
            quantise(full, tmp, gguf_type)
        finally:
            full.unlink(missing_ok=True)

    return atomic_file(target, overwrite, write, GGUF_MAGIC)


def check_gguf_model(model: nn.Module, tokenizer, gguf_type: str, target: Path, overwrite: bool) -> None:
    """Refuse, in one line and before any work, what llama.cpp's ``deci`` block would compute differently."""
    check_writable_file(target, overwrite, GGUF_MAGIC)
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"unknown GGUF type {gguf_type!r}: use {', '.join(GGUF_TYPES)}")
    config = model.config
    if config.model_type != "llama":
        raise UserError(
            f"cannot export {config.model_type} to GGUF: only Llama-family decoders are written, as llama.cpp's "
            "deci block, which gives each layer its own MLP width (llama.cpp's other blocks build the MLP with "
            "one width for every layer); use the plain format"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"cannot export to GGUF: {rope['rope_type']} rope scaling is not supported")
    if getattr(config, "attention_bias", False) or config.hidden_act != "silu":
        raise UserError(
            "cannot export to GGUF: attention biases or a non-SiLU MLP differ from llama.cpp's block"
        )
    if tokenizer is None:
        raise UserError("cannot export to GGUF without a tokenizer: the file must carry one for llama.cpp")
    if gguf_type in QUANTISED_TYPES:
        _llama_cpp()


def write_float_gguf(plain: nn.Module, path: Path, tokenizer, gguf_type: str) -> None:
    """The GGUF file of an unfused Llama model in float32 or float16 (norms stay float32, as llama.cpp keeps
    them)."""
    import gguf

    from .gguf_vocab import add_tokenizer

    config = plain.config
    layers = plain.model.layers
    writer = gguf.GGUFWriter(str(path), ARCH)
    _add_hyperparameters(writer, config, [layer.mlp.gate_proj.out_features for layer in layers], gguf_type)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, len(layers))
    for name, tensor in plain.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses the token embedding when the file has no output matrix
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            if "rotary_emb" in name:
                continue  # rotary frequencies: llama.cpp derives them from the hyper-parameters
            raise UserError(f"cannot export to GGUF: no llama.cpp tensor for {name}")
        data = _for_llama_cpp(name, tensor.detach().float(), config)
        half = gguf_type == "f16" and data.dim() > 1  # norms and biases stay float32
        writer.add_tensor(target, data.numpy().astype("float16" if half else "float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hyperparameters(writer, config, widths: list[int], gguf_type: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(Path(getattr(config, "name_or_path", "") or "mlp-fusion export").name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(widths)  # one per layer: the deci block reads each layer's own
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((config.rope_parameters or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.ALL_F32
    writer.add_file_type(int(file_type))


def _for_llama_cpp(name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    """Query and key rows reordered for llama.cpp's rotary embedding, which rotates adjacent pairs of a head
    where transformers' Llama rotates its two halves."""
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return _pairs_from_halves(tensor, config.num_attention_heads)
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return _pairs_from_halves(tensor, config.num_key_value_heads)
    return tensor


def _pairs_from_halves(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    shape = tensor.shape
    return tensor.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def quantise(source: Path, target: Path, gguf_type: str) -> None:
    """``source`` (a float GGUF file) quantised by llama.cpp's own quantiser into ``target``."""
    import ctypes
    import logging

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[
        gguf_type
    ]
    logger = logging.getLogger("llama-cpp-python")  # llama.cpp logs every tensor it quantises through it
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(target).encode(), ctypes.byref(params)
        )
    finally:
        logger.setLevel(level)
    if status != 0:
        raise UserError(f"llama.cpp could not quantise the model to {gguf_type} (status {status})")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            'quantised GGUF types need llama.cpp\'s quantiser: pip install "mlp-fusion[serve]" '
            "(or write f16/f32, which need no extra)"
        ) from None
    return llama_cpp
