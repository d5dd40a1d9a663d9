"""Fully sharded data parallel fine-tuning (torch FSDP2) of a fused model across ``torchrun`` processes.

Each layer of the model's layer lists, then the model itself, is wrapped with ``fully_shard``: parameters,
gradients and AdamW's state are split across the processes and a layer's parameters are gathered only
while it runs. Fusion's fixed scales are buffers, so they are copied whole to every process and never
trained. The Hugging Face ``Trainer`` still drives the loop (data split per process, schedule, clipping,
evaluation); it is only kept from wrapping the sharded model once more in DistributedDataParallel. At the
end the full weights are gathered onto the main process, into a copy of the model made before sharding
whose tensors were never allocated, so one plain fused model is scored and saved.
"""

from __future__ import annotations

import copy
import os

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
