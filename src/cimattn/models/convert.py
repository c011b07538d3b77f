"""Swap a model's attention for a hardware preset's, in place, and manage the attached hardware parameters.

`convert(model, hw)` finds every self-attention module (generic: a module
whose class name ends in "Attention" and that has `layer_idx` and `config`,
which covers Llama/SmolLM2, GPT-2, Qwen2, Mistral, …), attaches a
`GainCellParams` as `module.cim` for gain-cell presets, and sets the
model's attention implementation to the preset's registered function.

Hardware parameters (the per-head scalers a, b of q, k, v and the output)
are ordinary `nn.Parameter`s named `<attention module>.cim.scalers.<q|k|v|out>.<a|b>`
(and `….cim.scalers.score.b`, the per-head HardSigmoid offsets of `head_offsets`)
in `model.named_parameters()`: `hardware_parameters` yields them,
`trainable_parameters` picks a named set for an optimiser, `scaler_parameters`
gives one layer's (a, b), and `hardware_state_dict` / `load_hardware_state`
move them to and from a flat dict (safetensors-ready).  The chip's
variability gains are not in it: `convert` redraws them identically from
`noise.seed`.

Statistics for the initialization algorithm::

    with recorded_stats(model) as stats:
        model(input_ids)
    stats[(layer_idx, "q")].mean, stats[(layer_idx, "q")].std   # tensors over heads

The dict is filled when the block ends, from the last forward inside it
(each forward overwrites); keys are (layer index, scaler) for the scalers
"q", "k", "v", "out" (see `cimattn.attention.gaincell` for what is measured).
`hardware_stats(model)` reads the same statistics as {layer: {scaler: Moments}}.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from cimattn.attention import IMPLEMENTATIONS
from cimattn.attention.gaincell import SCALERS, GainCellParams, Moments
from cimattn.attention.prune_recompute import PruneRecomputeParams
from cimattn.config.schema import HardwareConfig
from cimattn.errors import CimattnError
from cimattn.models.loading import check_supported
from cimattn.models.lora import LORA, attach_lora

TrainSet = Literal["scalers", "lora", "attention", "all"]


def attention_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, module) of each self-attention module, in model order (converted or not)."""
    return [(m.layer_idx, m) for _, m in _named_attention_modules(model)]


def decoder_layers(model: nn.Module) -> list[tuple[int, nn.Module, nn.Module]]:
    """(layer index, decoder layer, its attention module) in model order: the layer is the attention's parent."""
    return [(m.layer_idx, model.get_submodule(name.rpartition(".")[0]), m) for name, m in _named_attention_modules(model)]


def _named_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__name__.endswith("Attention")
        and getattr(m, "layer_idx", None) is not None
        and hasattr(m, "config")
        and not getattr(m, "is_cross_attention", False)
    ]


def convert(model: nn.Module, hw: HardwareConfig) -> nn.Module:
    """Make `model` compute attention as the hardware `hw` does (in place); returns the model."""
    check_supported(model, getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)
    modules = attention_modules(model)
    if not modules:
        raise CimattnError(
            f"{type(model).__name__} has no self-attention modules cimattn recognises "
            "(a module named '*Attention' with `layer_idx` and `config`); use a Llama, GPT-2, Qwen2 or Mistral-like model"
        )
    for _, module in modules:  # converting again replaces, never stacks
        if isinstance(getattr(module, "cim", None), (GainCellParams, PruneRecomputeParams)):
            del module.cim
    if hw.attention == "gaincell":
        physics = hw.gaincell.model_copy(deep=True)  # one copy shared by all layers: the caller's config stays untouched
        for _, module in modules:
            n_heads, n_kv_heads, head_dim = _head_shape(module)
            device = next(module.parameters()).device
            module.cim = GainCellParams(physics, n_heads, n_kv_heads, head_dim, layer_idx=module.layer_idx).to(device)
            if hw.adapt.train == "lora":
                attach_lora(module, hw.adapt.lora_rank)
    elif hw.attention == "prune_recompute":  # per-layer thresholds and converter ranges, calibrated by the adapt stage
        physics = hw.prune_recompute.model_copy(deep=True)
        for _, module in modules:
            n_heads, n_kv_heads, head_dim = _head_shape(module)
            device = next(module.parameters()).device
            module.cim = PruneRecomputeParams(physics, n_heads, n_kv_heads, head_dim, layer_idx=module.layer_idx).to(device)
    elif hw.attention != "digital":
        raise CimattnError(f"preset '{hw.name}': attention '{hw.attention}' cannot be converted to yet")
    model.set_attn_implementation(IMPLEMENTATIONS[hw.attention])
    return model


def _head_shape(module: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of an attention module, read from its config."""
    cfg = module.config
    n_heads = getattr(cfg, "num_attention_heads", None)
    if not n_heads:
        raise CimattnError(f"{type(module).__name__}: its config has no num_attention_heads, cannot size the arrays")
    n_kv_heads = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(module, "head_dim", None) or cfg.hidden_size // n_heads
    return n_heads, n_kv_heads, head_dim


def hardware_layers(model: nn.Module) -> list[GainCellParams]:
    """The `GainCellParams` of every converted attention layer, by layer index."""
    layers = [m.cim for _, m in attention_modules(model) if isinstance(getattr(m, "cim", None), GainCellParams)]
    return sorted(layers, key=lambda cim: cim.layer_idx)


def _require_hardware(model: nn.Module) -> list[GainCellParams]:
    layers = hardware_layers(model)
    if not layers:
        raise CimattnError("the model has no gain-cell hardware parameters: convert it with a gain-cell preset first")
    return layers


def scaler_parameters(module: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """(a, b) of scaler `name` ("q", "k", "v", "out") of one converted attention module: 1-D over heads."""
    cim = getattr(module, "cim", None)
    if not isinstance(cim, GainCellParams):
        raise CimattnError(f"{type(module).__name__} is not converted to gain-cell hardware")
    if name not in SCALERS:
        raise CimattnError(f"unknown scaler '{name}': choose one of {', '.join(SCALERS)}")
    return cim.scalers[name].a, cim.scalers[name].b


def hardware_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable scaler parameters (a and b of q, k, v, out, every layer)."""
    for cim in hardware_layers(model):
        yield from cim.scalers.parameters()


def _scaler_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if trains(name, "scalers")}


def trainable_parameters(model: nn.Module, which: TrainSet = "scalers") -> dict[str, nn.Parameter]:
    """{name: parameter} to fine-tune: the scalers; the scalers and the LoRA adapters; the scalers and the attention
    modules' own weights; or everything."""
    _require_hardware(model)
    if which not in ("scalers", "lora", "attention", "all"):
        raise CimattnError(f"unknown parameter set '{which}': choose scalers, lora, attention or all")
    attention = tuple(f"{n}." for n, _ in _named_attention_modules(model))
    return {n: p for n, p in model.named_parameters() if trains(n, which) and (which != "attention" or n.startswith(attention))}


def trains(name: str, which: TrainSet) -> bool:
    """Whether parameter `name` (of a model or of one attention module) is in set `which`; "attention" within one module."""
    if which in ("attention", "all"):
        return True
    return ".cim.scalers." in f".{name}" or (which == "lora" and LORA in f".{name}")


def hardware_state_dict(model: nn.Module, which: TrainSet = "scalers") -> dict[str, torch.Tensor]:
    """{name: tensor} of what `trainable_parameters(model, which)` names: detached CPU copies, safetensors-ready."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in trainable_parameters(model, which).items()}


def load_hardware_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a state saved by `hardware_state_dict` into a converted model of the same shape (in place).

    Every scaler must be in it; any other key must name a parameter of the model.
    """
    _require_hardware(model)
    own = dict(model.named_parameters())
    missing = sorted(_scaler_named_parameters(model).keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise CimattnError(
            f"hardware state does not fit this model: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}; was it saved from the same model?"
        )
    with torch.no_grad():
        for key, value in state.items():
            if value.shape != own[key].shape:
                raise CimattnError(f"hardware state '{key}': shape {tuple(value.shape)}, the model has {tuple(own[key].shape)}")
            own[key].copy_(value)


def set_cell(model: nn.Module, cell: Literal["linear", "nonlinear"]) -> None:
    """Switch every layer's cell model (the adaptation stages go linear → nonlinear), in place."""
    if cell not in ("linear", "nonlinear"):
        raise CimattnError(f"unknown cell model '{cell}': choose 'linear' or 'nonlinear'")
    for cim in _require_hardware(model):
        cim.cell = cell


def reset_noise(model: nn.Module) -> None:
    """Restart every layer's read-noise generator from its seed."""
    for cim in hardware_layers(model):
        cim.reset_noise()


@contextmanager
def gradients_only_for(module: nn.Module, parameters):
    """Within the block only `parameters` of `module` require gradients; the others' flags are restored after.

    Training a subset (the scalers, the attention projections, LoRA) must not pay for
    the weight gradients of the rest: on SmolLM2 those of the MLPs, the embedding and
    the tied LM head are ~25 % of an end-to-end distillation step.
    """
    keep = {id(p) for p in parameters}
    frozen = [p for p in module.parameters() if p.requires_grad and id(p) not in keep]
    thawed = [p for p in parameters if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        for p in thawed:
            p.requires_grad_(True)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p in thawed:
            p.requires_grad_(False)


@contextmanager
def recorded_stats(model: nn.Module):
    """Record per-head scaler statistics during the block; yields a dict {(layer, scaler): Moments} filled at its end."""
    layers = _require_hardware(model)
    before = [cim.record_stats for cim in layers]
    for cim in layers:
        cim.record_stats = True
        cim.stats = {}
    stats: dict[tuple[int, str], Moments] = {}
    try:
        yield stats
    finally:
        for cim, was in zip(layers, before):
            cim.record_stats = was
            stats.update({(cim.layer_idx, name): m for name, m in cim.stats.items()})


def hardware_stats(model: nn.Module) -> dict[int, dict[str, Moments]]:
    """{layer_idx: {"q"|"k"|"v"|"out": Moments(mean[heads], std[heads])}} of the last recorded forward."""
    return {cim.layer_idx: dict(cim.stats) for cim in _require_hardware(model)}
