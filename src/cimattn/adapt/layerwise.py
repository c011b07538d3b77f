"""Layer-wise distillation on cached teacher activations (ours; cheap on a CPU).

One teacher forward records every attention module's output and every
decoder layer's inputs.  The hardware model is then walked layer by layer:
each attention module is trained alone (MSE normalised by the target's
variance) to map *its own* inputs — the hidden state that the adapted
layers before it produce — to the teacher's attention output, and the
trained decoder layer then produces the next layer's input.  So each layer
also learns to undo the drift of the layers before it, while a step costs
one attention layer: no logits, no backward through other layers.

The teacher is captured on the calibration batch, or on the first
`layerwise_text_tokens` of calibration text, and a step reads all of it,
or with `layerwise_tokens` a seeded draw of that many tokens' rows: text
larger than one step gives the layer more than a step holds, so long
training does not fit one small batch.  A layer's q/k/v/o projections
memorise a 1,024-token batch within tens of steps (SmolLM2-135M layer 9:
held-out error 0.60 → 0.64 while the batch's own falls to 0.02; drawing
from 32,768 tokens, 0.60 → 0.30).  Ppl after this stage, the demo's
recipe: 192 at 46 steps per layer on the whole 1,024-token batch, 244 at
124; 142 at 124 on 1,024-token draws from 4,096 tokens; 173 at 46 on
draws from 8,192 tokens.
"""

from __future__ import annotations

import copy
import time
from typing import NamedTuple

import torch

from cimattn.adapt.distill import digital_autocast
from cimattn.config import Adapt
from cimattn.models.convert import decoder_layers, gradients_only_for, trains

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
Call = tuple[tuple, dict]  # positional and keyword arguments of a module call


class Captured(NamedTuple):
    """What the teacher showed on the calibration batch."""

    hidden: torch.Tensor  # input hidden state of the first decoder layer
    layer_calls: dict[int, Call]  # decoder layer → its other arguments (mask, position embeddings…)
    targets: dict[int, torch.Tensor]  # attention module → its output


def _without_cache(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS} | {"use_cache": False}


@torch.no_grad()
def capture_teacher(teacher: torch.nn.Module, batch: torch.Tensor) -> Captured:
    """The first decoder layer's input, every decoder layer's other arguments and every attention output."""
    first: list[torch.Tensor] = []  # only the first layer's input: the walk makes every later one
    calls: dict[int, Call] = {}
    targets: dict[int, torch.Tensor] = {}
    hooks = []
    for layer, block, attention in decoder_layers(teacher):

        def before_block(_, args, kwargs, layer=layer):
            if not first:
                first.append((args[0] if args else kwargs["hidden_states"]).detach())
            calls[layer] = (args[1:], _without_cache({k: v for k, v in kwargs.items() if k != "hidden_states"}))

        def after_attention(_, args, output, layer=layer):
            targets[layer] = output[0].detach()

        hooks.append(block.register_forward_pre_hook(before_block, with_kwargs=True))
        hooks.append(attention.register_forward_hook(after_attention))
    try:
        teacher(batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return Captured(first[0], calls, targets)


class _Captured(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is not computed."""


@torch.no_grad()
def attention_inputs(block: torch.nn.Module, attention: torch.nn.Module, hidden: torch.Tensor, call: Call) -> Call:
    """The arguments `block` passes its attention module when its input is `hidden`."""
    found: dict[str, Call] = {}

    def hook(_, args, kwargs):
        found["call"] = (args, _without_cache(kwargs))
        raise _Captured

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        block(hidden, *call[0], **call[1])
    except _Captured:
        pass
    finally:
        handle.remove()
    return found["call"]


@torch.no_grad()
def block_output(block: torch.nn.Module, hidden: torch.Tensor, call: Call) -> torch.Tensor:
    out = block(hidden, *call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out


def layer_parameters(module: torch.nn.Module, which: str) -> dict[str, torch.nn.Parameter]:
    """What trains in one attention module: its hardware scalers, with its LoRA adapters, or every parameter it has."""
    return {name: p for name, p in module.named_parameters() if trains(name, which)}


def adamw(parameters: dict[str, torch.nn.Parameter], recipe: Adapt) -> torch.optim.AdamW:
    """The layer-wise optimizer: AdamW at `layerwise_lr`; with `layerwise_scaler_lr` the hardware scalers in a group
    of their own at that rate and without weight decay (it would pull their gains toward zero)."""
    if recipe.layerwise_scaler_lr is None:
        groups = [{"params": list(parameters.values())}]
    else:
        groups = [{"params": [p for name, p in parameters.items() if not trains(name, "scalers")]},
                  {"params": [p for name, p in parameters.items() if trains(name, "scalers")], "lr": recipe.layerwise_scaler_lr,
                   "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.layerwise_lr, betas=recipe.betas, weight_decay=recipe.weight_decay)


def normalised_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.float() - target.float()).pow(2).mean() / target.float().var().clamp_min(1e-12)


def layer_loss(attention: torch.nn.Module, args: tuple, kwargs: dict, target: torch.Tensor, recipe: Adapt) -> torch.Tensor:
    """The layer-wise loss of one step: the attention module's output against the teacher's, its projections under
    the recipe's autocast (the arrays stay fp32)."""
    with digital_autocast(recipe, target.device):
        out = attention(*args, **kwargs)[0]
    return normalised_mse(out, target)


def train_layers(
    model: torch.nn.Module,
    captured: Captured,
    recipe: Adapt,
    *,
    steps_per_layer: int,
    progress,
    seed: int = 0,
) -> list[tuple[float, float]]:
    """Train each attention layer of `model`, in order, for `steps_per_layer`; returns (first, last) loss per layer."""
    result = []
    hidden = captured.hidden
    layers = decoder_layers(model)
    with progress("layer-wise distillation", total=len(layers) * steps_per_layer) as advance:
        for layer, block, attention in layers:
            call = captured.layer_calls[layer]
            if steps_per_layer:
                args, kwargs = attention_inputs(block, attention, hidden, call)
                draw = step_rows(hidden, recipe, seed, layer)
                losses = _train(attention, args, kwargs, captured.targets[layer], recipe, steps_per_layer, advance, draw)
                result.append((losses[0], losses[-1]))
            hidden = block_output(block, hidden, call)
    return result


def step_rows(hidden: torch.Tensor, recipe: Adapt, seed: int, layer: int):
    """step → the batch rows a layer-wise step reads (None: all), seeded by (seed, layer, step)."""
    rows, length = hidden.shape[:2]
    take = rows if recipe.layerwise_tokens is None else max(1, min(rows, recipe.layerwise_tokens // length))
    if take == rows:
        return lambda step: None
    g = torch.Generator()
    return lambda step: torch.randperm(rows, generator=g.manual_seed(seed * 1_000_003 + layer * 10_007 + step))[:take].sort().values


def take_rows(x, rows: torch.Tensor | None, n: int):
    """`x` (a tensor, or tuples / lists / dicts of them) with only `rows` of its batch dimension (size n, first);
    tensors of other shapes (a broadcast mask, cache positions) as they are."""
    if rows is None:
        return x
    if isinstance(x, torch.Tensor):
        return x[rows.to(x.device)] if x.dim() >= 2 and x.shape[0] == n else x
    if isinstance(x, (tuple, list)):
        return type(x)(take_rows(v, rows, n) for v in x)
    if isinstance(x, dict):
        return {k: take_rows(v, rows, n) for k, v in x.items()}
    return x


def _train(attention, args, kwargs, target, recipe: Adapt, steps: int, advance, draw=lambda step: None) -> list[float]:
    named = layer_parameters(attention, recipe.train)
    params = list(named.values())
    optimizer = adamw(named, recipe)
    attention.train()
    losses = []
    with gradients_only_for(attention, params):
        for step in range(steps):
            a, k, t = take_rows((args, kwargs, target), draw(step), target.shape[0])
            loss = layer_loss(attention, a, k, t, recipe)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            advance(1)
    attention.eval()
    return losses


def time_one_step(model: torch.nn.Module, captured: Captured, recipe: Adapt) -> float:
    """Seconds of one training step of the first layer, on a copy (the model is untouched).

    The second of two steps is timed: the first pays one-off set-up costs.
    """
    layer, block, attention = decoder_layers(model)[0]
    args, kwargs = attention_inputs(block, attention, captured.hidden, captured.layer_calls[layer])
    rows = step_rows(captured.hidden, recipe, 0, layer)(0)
    args, kwargs, target = take_rows((args, kwargs, captured.targets[layer]), rows, captured.hidden.shape[0])
    attention = copy.deepcopy(attention)
    for _ in range(2):
        t0 = time.perf_counter()
        layer_loss(attention, args, kwargs, target, recipe).backward()
    return time.perf_counter() - t0
