"""Find a model's MLP sites by module structure (attribute names and shapes), never by checkpoint name.

Adding a family means adding a row to one of the tables below, or one matcher function.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import UserError
from .sites import ExpertModules, LinearMlp, MlpSite, StackedExperts, WeightSlot, weight_shape

# (gate, up, down): SwiGLU / GeGLU MLPs.
GATED_LAYOUTS = [
    ("gate_proj", "up_proj", "down_proj"),  # LLaMA, Mistral, Qwen, SmolLM, Gemma
    ("wi_0", "wi_1", "wo"),  # T5 v1.1 style gated
    ("w1", "w3", "w2"),  # per-expert Mixtral-style modules
]
# (in, out): plain MLPs.
PLAIN_LAYOUTS = [
    ("intermediate.dense", "output.dense"),  # BERT, RoBERTa, MPNet, ELECTRA, ...
    ("c_fc", "c_proj"),  # GPT-2 (Conv1D)
    ("wi", "wo"),  # T5, Switch Transformers experts
    ("fc1", "fc2"),  # OPT, ViT-style
    ("lin1", "lin2"),  # DistilBERT
    ("dense_h_to_4h", "dense_4h_to_h"),  # GPT-NeoX, Falcon
]
SUPPORTED_FAMILIES = (
    "plain MLPs (BERT, RoBERTa, MPNet, DistilBERT, GPT-2, OPT, T5), gated MLPs (LLaMA, Mistral, Qwen2, "
    "SmolLM, Gemma 2/3), Mixture-of-Experts (Mixtral, Qwen2-MoE, Qwen3-MoE, Switch Transformers)"
)
# Config fields that set an MLP's width, most specific first.
EXPERT_WIDTH_KEYS = ["moe_intermediate_size", "intermediate_size", "d_ff", "ffn_dim"]
SHARED_WIDTH_KEYS = ["shared_expert_intermediate_size"]
DENSE_WIDTH_KEYS = ["intermediate_size", "d_ff", "n_inner", "ffn_dim", "encoder_ffn_dim", "hidden_dim"]
# Where plain MLPs keep their activation: on the MLP module, or beside its input projection.
ACTIVATION_ATTRS = ("act", "act_fn", "activation_fn", "activation", "intermediate_act_fn")


def find_sites(model: nn.Module) -> list[MlpSite]:
    """Every MLP site of ``model``, in module order. Raises :class:`UserError` if there is none."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    active = getattr(text_config, "num_experts_per_tok", None) or 1
    sites: list[MlpSite] = []
    claimed: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in claimed):
            continue
        site = _match(name, module, active)
        if site is not None:
            site.config_key = _width_key(text_config, site)
            sites.append(site)
            claimed.append(name)
    if not sites:
        raise UserError(
            f"found no supported MLP in {type(model).__name__}; supported families: {SUPPORTED_FAMILIES}"
        )
    return sites


def layer_index(name: str) -> int:
    """The first numeric component of a module path (``encoder.layer.3.mlp`` -> 3), 0 if there is none."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else 0


def _match(name: str, module: nn.Module, active_experts: int) -> MlpSite | None:
    for matcher in MATCHERS:
        site = matcher(name, module, active_experts)
        if site is not None:
            return site
    return None


def _stacked_experts(name: str, module: nn.Module, active_experts: int) -> MlpSite | None:
    names = {n for n, _ in module.named_parameters(recurse=False)}
    names |= set(getattr(module, "parametrizations", {}))  # a fused site's weights live in parametrizations
    if names != {"gate_up_proj", "down_proj"}:
        return None
    gate_up, down = module.gate_up_proj, module.down_proj
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
        return None
    experts, double_width, hidden = gate_up.shape
    if double_width != 2 * down.shape[2] or down.shape[1] != hidden:
        return None
    return StackedExperts(name, layer_index(name), module, active_experts)


def _expert_modules(name: str, module: nn.Module, active_experts: int) -> MlpSite | None:
    is_container = isinstance(module, (nn.ModuleList, nn.ModuleDict))
    if not is_container or name.rsplit(".", 1)[-1] != "experts" or len(module) < 2:
        return None
    members, shapes = [], set()
    for index, (child_name, child) in enumerate(module.named_children()):
        member = _dense_mlp(f"{name}.{child_name}", child, 1, expert=index)
        if member is None:
            return None
        members.append(member)
        shapes.add(tuple(_neuron_major_shape(slot) for slot in member.slots()))
    if len(shapes) != 1:
        return None
    return ExpertModules(name, layer_index(name), members, active_experts)


def _dense_mlp(name: str, module: nn.Module, active_experts: int, expert: int = 0) -> LinearMlp | None:
    for layout in GATED_LAYOUTS + PLAIN_LAYOUTS:
        projections = [_projection(module, path) for path in layout]
        if any(p is None for p in projections):
            continue
        *inputs, output = projections
        homogeneous = len(inputs) == 1 and _homogeneous_activation(module, layout[0])
        site = LinearMlp(name, layer_index(name), inputs, output, expert=expert, homogeneous=homogeneous)
        shapes = [_neuron_major_shape(slot) for slot in site.slots()]
        if len(set(shapes)) == 1:  # every projection: D neurons x d features
            return site
    return None


def _homogeneous_activation(module: nn.Module, input_path: str) -> bool:
    """Whether the MLP's activation satisfies ``act(a x) = a act(x)`` for ``a > 0`` (ReLU, leaky ReLU).

    Tested on numbers rather than by class name, so any activation module or function is judged
    correctly; an activation that cannot be found counts as not homogeneous (no symmetry is assumed).
    """
    parent = module
    for part in input_path.split(".")[:-1]:
        parent = getattr(parent, part)
    for owner in (module, parent):
        for attr in ACTIVATION_ATTRS:
            act = getattr(owner, attr, None)
            if callable(act):
                return _is_homogeneous(act)
    return False


def _is_homogeneous(act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    x = torch.linspace(-4.0, 4.0, 33)
    try:
        with torch.no_grad():
            once, twice = act(x), act(2.5 * x)
    except Exception:  # an activation that takes other inputs: assume nothing
        return False
    return bool(once.abs().max() > 0) and torch.allclose(twice, 2.5 * once, rtol=1e-6, atol=1e-7)


def _neuron_major_shape(slot: WeightSlot) -> tuple[int, int]:
    shape = weight_shape(slot.module, slot.attr)
    return shape[slot.neuron_axis], shape[1 - slot.neuron_axis]


def _projection(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, (nn.Linear, Conv1D)) else None


def _width_key(config: object, site: MlpSite) -> str | None:
    """The config field that sets this site's width, so an export can set it."""
    if site.experts:
        keys = EXPERT_WIDTH_KEYS
    elif "shared" in site.name.rsplit(".", 1)[-1]:
        keys = SHARED_WIDTH_KEYS
    else:
        # a stack's own field first (BART: encoder_ffn_dim / decoder_ffn_dim); never the other stack's
        own = [f"{site.stack}_ffn_dim"] if site.stack else []
        keys = own + [k for k in DENSE_WIDTH_KEYS if not k.endswith("_ffn_dim") or not site.stack]
    return next((key for key in keys if hasattr(config, key)), None)


MATCHERS: list[Callable[[str, nn.Module, int], MlpSite | None]] = [
    _stacked_experts,
    _expert_modules,
    _dense_mlp,
]
