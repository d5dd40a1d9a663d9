"""Output error of a fused model: each fused MLP's output and the final output, padding excluded."""

from __future__ import annotations

import torch
from torch import nn

from ..config import names_site
from ..families import find_sites
from ..verification import compare, main_output


def output_errors(original: nn.Module, fused: nn.Module, batch: dict, layers: list[int] | str) -> dict:
    """``{"final": e, "layers": {site name: e}, "mean_layer": mean of the layer errors}`` (relative errors).

    The layer errors compare each model's own MLP output on its own inputs, so they include what earlier
    fused layers changed.
    """
    names = [s.name for s in find_sites(original) if names_site(layers, s.stack, s.layer)]
    reference, outputs = _mlp_outputs(original, names, batch), _mlp_outputs(fused, names, batch)
    mask = batch["attention_mask"]
    per_layer = {name: compare(reference[name], outputs[name], mask)["relative_error"] for name in names}
    final = compare(main_output(original, batch), main_output(fused, batch), mask)["relative_error"]
    mean = sum(per_layer.values()) / len(per_layer) if per_layer else 0.0
    return {"final": final, "layers": per_layer, "mean_layer": mean}


@torch.no_grad()
def _mlp_outputs(model: nn.Module, names: list[str], batch: dict) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def store(module: nn.Module, args: tuple, output) -> None:
            captured[name] = (output[0] if isinstance(output, tuple) else output).float()

        return store

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        main_output(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return captured
