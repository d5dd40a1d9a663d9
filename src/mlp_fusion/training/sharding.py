"""Fully sharded data parallel fine-tuning (torch FSDP2) of a fused model across ``torchrun`` processes.

Each layer of the model's layer lists, then the model itself, is wrapped with ``fully_shard``: parameters,
gradients and AdamW's state are split across the processes and a layer's parameters are gathered only
while it runs. Fusion's fixed scales are buffers, so they are copied whole to every process and never
trained. The Hugging Face ``Trainer`` still drives the loop (data split per process, schedule, clipping,
evaluation); it is only kept from wrapping the sharded model once more in DistributedDataParallel. At the
end the full weights are gathered onto the main process, into a copy of the model made before sharding
whose tensors were never allocated, so one plain fused model is scored and saved.

A fused checkpoint need not be loaded whole by every process: :func:`load_sharded` builds it on the meta
device, shards it, and lets each process read only its own rows of every stored tensor.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import transformers
from torch import nn

from ..errors import UserError


def world_size() -> int:
    """How many processes torchrun (or accelerate launch) started; 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_shardable() -> None:
    if world_size() < 2:
        raise UserError(
            "--fsdp shards the model across the processes torchrun starts: run it as "
            "torchrun --nproc_per_node N $(which mlp-fusion) finetune ... --fsdp"
        )


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose stored tensors are on the meta device (no memory); the buffers that are
    not stored (rotary tables) are copied as they are."""
    memo = {}
    for tensor in model.state_dict(keep_vars=True).values():
        empty = torch.empty_like(tensor, device="meta")
        is_parameter = isinstance(tensor, nn.Parameter)
        memo[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) if is_parameter else empty
    return copy.deepcopy(model, memo)


def shard(model: nn.Module) -> None:
    """``fully_shard`` every layer of each list of layers that holds an MLP, then the model (the root
    keeps the embeddings, norms and head)."""
    from torch.distributed.fsdp import fully_shard

    from ..families import find_sites
    from ..layer_runs import layer_list_names

    for name in layer_list_names(model, find_sites(model)):
        for layer in model.get_submodule(name):
            fully_shard(layer)
    fully_shard(model)


# a model load_sharded built -> the unsharded copy of it (shapes only) that the gather fills at the end
_SKELETONS: dict[int, nn.Module] = {}


def prepare(model: nn.Module) -> nn.Module:
    """Shard ``model`` across the processes (unless :func:`load_sharded` built it sharded); returns the
    unsharded copy of it, its tensors never allocated, that :func:`gather` fills."""
    plain = _SKELETONS.pop(id(model), None)
    if plain is None:
        plain = skeleton(model)
        shard(model)
    return plain


def load_fused_sharded(spec: str, settings=None):
    """``spec`` as a :class:`~mlp_fusion.loading.LoadedModel` read already split across the processes
    (:func:`load_sharded`) when it is a fused checkpoint; None for any other model (load it whole)."""
    from ..loading import FLOAT32_CPU, LoadedModel, is_fused, load_tokenizer, resolve

    path = resolve(spec)
    if path is None or not is_fused(path):
        return None
    settings = settings or FLOAT32_CPU
    device = settings.torch_device()
    if device.type == "cuda":  # the GPU torchrun gave this process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    model = load_sharded(path, settings.torch_dtype() or torch.float32, device)
    return LoadedModel(model, load_tokenizer(path), str(path))


def load_sharded(directory: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The fused checkpoint in ``directory`` split across the processes from the start: built on the meta
    device, sharded, then each process reads from the files only its own rows of every stored tensor (and
    the whole of each buffer), so no process ever holds the whole model. Every process must call it; it
    joins the process group torchrun describes."""
    import torch.distributed as dist

    from ..checkpoint_files import materialise_derived_buffers, weight_files
    from ..persistence import fused_skeleton

    if not dist.is_initialized():
        dist.init_process_group()  # gloo for CPU tensors, nccl for CUDA ones; the Trainer then reuses it
    model, _ = fused_skeleton(directory, dtype)
    materialise_derived_buffers(model, torch.device("cpu"))  # so the skeleton the gather fills has them
    _SKELETONS[id(model)] = skeleton(model)
    shard(model)
    model.to_empty(device=device)
    materialise_derived_buffers(model, device)  # to_empty left them unset
    _read_own_rows(model, weight_files(directory))
    return model


def _read_own_rows(model: nn.Module, files: list[Path]) -> None:
    """Fill every sharded parameter with its process's rows of the stored tensor (FSDP2 splits dim 0 as
    ``torch.chunk`` does) and every buffer with the whole stored one; refuse a checkpoint that misses one."""
    from ..persistence import placeholders
    from ..shard_io import open_stored

    targets, skipped = model.state_dict(), set(placeholders(model))
    filled = set()  # storage of the local tensors written (tied weights share one)
    with torch.no_grad():
        for path in files:
            with open_stored(path) as stored:
                for key in stored.keys():
                    if key in skipped:
                        continue
                    if key not in targets:
                        raise UserError(f"{path} holds {key!r}, which the fused model lacks: save it again")
                    local, start = _own_rows(targets[key])
                    rows = stored.get_slice(key)[start : start + local.shape[0]] if local.dim() else None
                    local.copy_(rows if rows is not None else stored.get_tensor(key))
                    filled.add(local.data_ptr())
    missing = [key for key, tensor in targets.items() if _own_rows(tensor)[0].data_ptr() not in filled]
    if missing:
        raise UserError(f"{files[0].parent} lacks {missing[:3]}: the checkpoint is damaged, save it again")


def _own_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This process's part of ``tensor`` and the first row it holds (all of it, from 0, if not sharded)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor, 0
    if tensor.placements != (Shard(0),):
        raise RuntimeError(f"expected rows split across the processes, found {tensor.placements}")
    mesh = tensor.device_mesh
    chunk = -(-tensor.shape[0] // mesh.size())  # torch.chunk's size: the last process may hold fewer
    return tensor.to_local(), mesh.get_local_rank() * chunk


def keep_sharded(trainer: transformers.Trainer) -> None:
    """Keep the Trainer's accelerator from wrapping the sharded model in DistributedDataParallel (on CPU
    processes it always would): FSDP already averages the gradients across processes."""
    accelerator = trainer.accelerator

    def prepare_model(model, device_placement=None, evaluation_mode=False):
        accelerator._models.append(model)
        return model

    accelerator.prepare_model = prepare_model


def gather(model: nn.Module, plain: nn.Module) -> nn.Module | None:
    """The full weights of the sharded ``model`` loaded into ``plain`` (its :func:`skeleton`) on the main
    process; None on the others. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not is_main_process():
        return None
    plain.load_state_dict(state, assign=True)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()  # the gathered copies of tied weights are one tensor again
    return plain
