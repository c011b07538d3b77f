"""Layer-wise distillation on cached teacher activations (ours; cheap on a CPU).

One teacher forward records, for every attention module, its inputs and its
output.  Each hardware attention module is then trained alone to map the
teacher's inputs to the teacher's output (MSE normalised by the output's
variance): no MLPs, no other layers, no logits, so a step costs one
attention layer instead of the whole model.  Errors that compound across
layers are left to the end-to-end fine-tuning that follows.
"""

from __future__ import annotations

import time

import torch

from cimattn.config import Adapt
from cimattn.models.convert import attention_modules

Captured = dict[int, tuple[tuple, dict, torch.Tensor]]  # layer → (args, kwargs, output)


@torch.no_grad()
def capture_attention_io(teacher: torch.nn.Module, batch: torch.Tensor) -> Captured:
    """Inputs and outputs of every attention module of `teacher` on `batch` (no cache)."""
    captured: Captured = {}
    hooks = []
    for layer, module in attention_modules(teacher):

        def hook(_, args, kwargs, output, layer=layer):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
            captured[layer] = (args, kwargs | {"use_cache": False}, output[0].detach())

        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        teacher(batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


def layer_parameters(module: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    """What trains in one attention module: its hardware scalers, or (attention/all) every parameter it has."""
    if which == "scalers":
        return list(module.cim.scalers.parameters())
    return list(module.parameters())


def normalised_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.float() - target.float()).pow(2).mean() / target.float().var().clamp_min(1e-12)


def train_layers(
    model: torch.nn.Module,
    captured: Captured,
    recipe: Adapt,
    *,
    steps_per_layer: int,
    progress,
) -> list[tuple[float, float]]:
    """Train each attention layer of `model` for `steps_per_layer`; returns (first, last) loss per layer."""
    result = []
    modules = dict(attention_modules(model))
    with progress("layer-wise distillation", total=len(captured) * steps_per_layer) as advance:
        for layer, (args, kwargs, target) in sorted(captured.items()):
            module = modules[layer]
            params = layer_parameters(module, recipe.train)
            optimizer = torch.optim.AdamW(params, lr=recipe.layerwise_lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
            module.train()
            losses = []
            for _ in range(steps_per_layer):
                loss = normalised_mse(module(*args, **kwargs)[0], target)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                advance(1)
            module.eval()
            if losses:
                result.append((losses[0], losses[-1]))
    return result


def time_one_step(model: torch.nn.Module, captured: Captured, recipe: Adapt) -> float:
    """Seconds of one training step of the first layer, on a copy (the model is untouched)."""
    import copy

    layer, (args, kwargs, target) = min(captured.items())
    module = copy.deepcopy(dict(attention_modules(model))[layer])
    t0 = time.perf_counter()
    normalised_mse(module(*args, **kwargs)[0], target).backward()
    return time.perf_counter() - t0
