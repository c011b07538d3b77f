"""The initialization algorithm of Leroux et al. (shared/PAPERS.md §1, "Adaptation", step 2).

Every scaler x' = a·x + b of every layer and head is moved, all at once,
so that the per-head mean μ and std σ of its output (before the clamp)
reach targets μ*, σ*:

    a ← α·a·σ*/σ + (1 − α)·a        (only where |σ − σ*| > tolerance)
    b ← α·(b + μ* − μ) + (1 − α)·b  (only where |μ − μ*| > tolerance)

with α = linspace(1.0, 0.1, 50)[iteration], then 0.1, one full forward of a
fixed batch per iteration, until every error is below the tolerance or the
iteration limit.  Stopped by the limit or a deadline (ours), the scalers
keep the lowest error measured — after the last update too — not the last
update's: so a budget cut after n updates equals a run of n iterations, and
a timed run can be replayed step for step (`adapt_model(steps=...)`).

Targets: the paper records them from the fine-tuned *linear* model
(`measure_targets`).  Before any model exists to record from, ours come from
the digital teacher (`teacher_targets`): q, k and v centred in their
converter's range with a quarter of the range as std, and the attention
output matching the teacher's own per-head output statistics, so the layers
after attention see what they were trained on.

From a freshly converted model the all-at-once update diverges (the output
scalers are rescaled for attention inputs that the same update changes).
`fit_scalers` (ours) solves each scaler exactly instead, in one forward:
layer by layer, q, k, v, then out, each on inputs already shaped by the
scalers fitted before it.  The paper's iteration then starts converged.
"""

from __future__ import annotations

import time

import torch

from cimattn.attention.gaincell import Moments
from cimattn.models.convert import (
    SCALERS,
    attention_modules,
    recorded_stats,
    scaler_parameters,
)

Targets = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, scaler) → (μ*, σ*) per head
ALPHA_START, ALPHA_END, ALPHA_STEPS = 1.0, 0.1, 50  # the paper's step-size schedule
QKV_SPREAD = 0.25  # teacher targets: q, k, v std as a fraction of their converter's range (±2σ fills it)


def alpha(iteration: int) -> float:
    if iteration >= ALPHA_STEPS:
        return ALPHA_END
    return ALPHA_START + (ALPHA_END - ALPHA_START) * iteration / (ALPHA_STEPS - 1)


@torch.no_grad()
def measure(model: torch.nn.Module, batch: torch.Tensor) -> Targets:
    """Per-head (μ, σ) after every scaler of every layer, from one forward of `batch`."""
    with recorded_stats(model) as stats:
        model(batch)
    return {key: (mu.clone(), sd.clone()) for key, (mu, sd) in stats.items()}


@torch.no_grad()
def fit_scalers(model: torch.nn.Module, batch: torch.Tensor, targets: Targets) -> None:
    """Set every scaler so its output has exactly the target per-head mean and std, in one forward."""
    modules = dict(attention_modules(model))
    for layer, module in modules.items():
        module.cim.fit_targets = {name: Moments(*targets[(layer, name)]) for name in SCALERS if (layer, name) in targets}
    try:
        model(batch)
    finally:
        for module in modules.values():
            module.cim.fit_targets = None


@torch.no_grad()
def measure_targets(model: torch.nn.Module, batches: list[torch.Tensor], momentum: float = 0.1) -> Targets:
    """Running averages (the paper's momentum 0.1) of the statistics over `batches`."""
    targets: Targets = {}
    for batch in batches:
        for key, (mu, sd) in measure(model, batch).items():
            if key not in targets:
                targets[key] = (mu, sd)
            else:
                m0, s0 = targets[key]
                targets[key] = ((1 - momentum) * m0 + momentum * mu, (1 - momentum) * s0 + momentum * sd)
    return targets


@torch.no_grad()
def teacher_targets(
    model: torch.nn.Module, teacher: torch.nn.Module, batch: torch.Tensor, spread: dict[str, float] | None = None
) -> Targets:
    """Targets from the digital teacher: converters' ranges for q, k, v; the teacher's output statistics for out.

    q, k, v are centred in their converter's range with std = spread × range
    (default QKV_SPREAD of the range).
    """
    spread = {name: QKV_SPREAD for name in ("q", "k", "v")} | (spread or {})
    targets: Targets = {}
    for layer, module in attention_modules(model):
        g = module.cim.config
        for name, quantizer in (("q", g.q), ("k", g.k), ("v", g.v)):
            a = scaler_parameters(module, name)[0]  # one per head, on the model's device
            mid, std = (quantizer.low + quantizer.high) / 2, (quantizer.high - quantizer.low) * spread[name]
            targets[(layer, name)] = (torch.full_like(a, mid), torch.full_like(a, std))
    for layer, (mu, sd) in teacher_attention_output_stats(teacher, batch).items():
        targets[(layer, "out")] = (mu, sd)
    return targets


@torch.no_grad()
def teacher_attention_output_stats(teacher: torch.nn.Module, batch: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per-head mean and std of the teacher's attention output (the input of its output projection)."""
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for layer, module in attention_modules(teacher):
        heads = module.config.num_attention_heads

        def hook(_, args, layer=layer, heads=heads):
            x = args[0].float()  # (B, T, H·D)
            x = x.reshape(*x.shape[:-1], heads, -1).transpose(0, -2).reshape(heads, -1)  # (H, B·T·D)
            found[layer] = (x.mean(dim=1), x.std(dim=1))

        hooks.append(output_projection(module).register_forward_pre_hook(hook))
    try:
        teacher(batch)
    finally:
        for h in hooks:
            h.remove()
    return found


def output_projection(module: torch.nn.Module) -> torch.nn.Module:
    for name in ("o_proj", "c_proj", "out_proj", "dense"):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"{type(module).__name__}: no output projection found")


@torch.no_grad()
def initialize(
    model: torch.nn.Module,
    batch: torch.Tensor,
    targets: Targets,
    *,
    iterations: int = 100,
    tolerance: float = 1e-4,
    deadline: float | None = None,
    progress=None,
) -> list[float]:
    """Run the algorithm for at most `iterations` updates; returns the largest |μ − μ*| or |σ − σ*| measured before
    each update and after the last one (the loss per iteration: at most iterations + 1 entries)."""
    history: list[float] = []
    modules = dict(attention_modules(model))
    best: tuple[float, list[torch.Tensor]] | None = None  # lowest error measured, and the scalers that had it
    for iteration in range(iterations + 1):
        stats = measure(model, batch)
        errors = {key: ((mu - targets[key][0]).abs(), (sd - targets[key][1]).abs()) for key, (mu, sd) in stats.items()}
        history.append(max(torch.maximum(e_mu, e_sd).max().item() for e_mu, e_sd in errors.values()))
        if best is None or history[-1] < best[0]:
            best = (history[-1], [p.detach().clone() for p in _scalers(modules)])
        if progress:
            progress(1)
        if history[-1] < tolerance:
            break
        if iteration == iterations or (deadline is not None and time.perf_counter() > deadline):
            # Cut short (by the limit or the budget), possibly while the early iterations (α near 1)
            # overshoot: keep the scalers of the lowest error measured, not the last ones.
            if best[0] < history[-1]:
                for p, saved in zip(_scalers(modules), best[1]):
                    p.copy_(saved)
            break
        step = alpha(iteration)
        for (layer, name), (mu, sd) in stats.items():
            mu_t, sd_t = targets[(layer, name)]
            e_mu, e_sd = errors[(layer, name)]
            a, b = scaler_parameters(modules[layer], name)
            # a head whose output is constant (σ = 0) has no gain to correct: leave its a
            fix_a = (e_sd > tolerance) & (sd > 0)
            a.copy_(torch.where(fix_a, step * a * sd_t / sd.clamp_min(1e-12) + (1 - step) * a, a))
            b.copy_(torch.where(e_mu > tolerance, step * (b + mu_t - mu) + (1 - step) * b, b))
    return history


def _scalers(modules: dict[int, torch.nn.Module]) -> list[torch.Tensor]:
    return [p for m in modules.values() for name in SCALERS for p in scaler_parameters(m, name)]


__all__ = ["SCALERS", "alpha", "fit_scalers", "initialize", "measure", "measure_targets", "teacher_targets"]
