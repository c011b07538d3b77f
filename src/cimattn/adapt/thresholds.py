"""Calibrate prune-and-recompute hardware: per-head thresholds and converter ranges on calibration text.

This is the adapt stage of the `sprint` / `hyatt` presets.  One forward over
a fixed batch of calibration windows (the run's context) with every layer in
calibration mode: each layer first sets its query-DAC and key ranges to the
batch's max |q|, |k| per head, then — for the threshold rules, when the
preset gives no fixed threshold — the per-head threshold (or margin) that
keeps `selection.keep_rate` of the visible keys on this batch.  Layers run
in model order, so each is calibrated on inputs already shaped by the
pruning of the layers before it.  A second forward measures the keep rate
the calibrated thresholds reach on the same batch.

With `selection.learn_steps > 0` the calibrated thresholds are then trained
(LeOPArd-style, `learn_thresholds`): a soft comparator makes the keep
decision differentiable, and only the thresholds move, to match the digital
teacher's next-token distribution at the target keep rate.  Learning runs on
shorter windows (`selection.learn_context`); one offset added to every
learned threshold then restores the keep rate at the run's context
(`prepare_thresholds`).

The calibrated buffers are saved in the run's `adapted/` directory
(`hardware.safetensors`, `preset.yaml`, `state.json`), so a rerun resumes
and `cimattn eval --adapted` reloads them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cimattn.adapt import checkpoint
from cimattn.attention.prune_recompute import collect_telemetry, prune_layers
from cimattn.config import HardwareConfig
from cimattn.config.schema import MARGIN_RULES
from cimattn.errors import CimattnError
from cimattn.models.convert import gradients_only_for

CALIBRATED = ("threshold", "q_full_scale", "k_full_scale")  # the buffers a calibration sets
SHARED_THRESHOLD_STEPS = 10  # bisection steps of a model-wide threshold: 1/1024 of the per-layer values' spread


def calibration_windows(ids: torch.Tensor, tokens: int, context: int) -> torch.Tensor:
    """The first `tokens` calibration tokens as (rows, context), at least one row."""
    context = min(context, ids.numel())
    rows = max(1, min(tokens, ids.numel()) // context)
    return ids[: rows * context].reshape(rows, context)


@torch.no_grad()
def calibrate_thresholds(model: torch.nn.Module, batch: torch.Tensor, *, measure: bool = True) -> dict:
    """Calibrate every prune-and-recompute layer of `model` on the token rows `batch` (B, L), in place.

    Returns {"calib_tokens": tokens used} and, with `measure` (one more
    forward), "calib_keep_rate": the keep rate reached on the batch.
    """
    layers = prune_layers(model)
    if not layers:
        raise CimattnError("the model has no prune-and-recompute layers: convert it with a prune_recompute preset first")
    device = next(model.parameters()).device
    batch = batch.to(device)
    for cim in layers:
        cim.calibrate_to = cim.config.selection.keep_rate
    try:
        model(input_ids=batch, use_cache=False)
    finally:
        for cim in layers:
            cim.calibrate_to = None
    if layers[0].config.selection.calibrate_per == "model":
        _share_one_threshold(model, layers, batch)
    if not measure:
        return {"calib_tokens": int(batch.numel())}
    return calibrate_thresholds_rate(model, batch)


def _share_one_threshold(model: torch.nn.Module, layers: list, batch: torch.Tensor) -> None:
    """One threshold (or margin) for every layer and head, bisected until the whole model keeps `keep_rate` on `batch`.

    The per-layer calibration brackets it: at the smallest per-layer value every
    layer keeps at most its target, at the largest at least (the keep rate is
    monotone in the threshold).
    """
    values = torch.cat([cim.threshold.flatten() for cim in layers])
    values = values[values.isfinite()]
    if values.numel():
        shift_to_rate(model, layers, batch, [torch.zeros_like(cim.threshold) for cim in layers], values.min().item(), values.max().item())


@torch.no_grad()
def shift_to_rate(model: torch.nn.Module, layers: list, batch: torch.Tensor, base: list[torch.Tensor], lo: float, hi: float) -> float:
    """Set every layer's thresholds to base + δ, one δ in [lo, hi] bisected until the model keeps `keep_rate` on `batch`.

    Each bisection step is one forward; the keep rate is monotone in δ.  Returns δ.
    """
    sel = layers[0].config.selection
    keeps_more_when_higher = sel.rule in MARGIN_RULES  # a wider margin keeps more; a higher threshold fewer

    def place(delta: float) -> None:
        for cim, b in zip(layers, base):
            cim.threshold.copy_(b + delta)

    for _ in range(SHARED_THRESHOLD_STEPS):
        mid = (lo + hi) / 2
        place(mid)
        too_many = calibrate_thresholds_rate(model, batch)["calib_keep_rate"] > sel.keep_rate
        if too_many == keeps_more_when_higher:
            hi = mid
        else:
            lo = mid
    place((lo + hi) / 2)
    return (lo + hi) / 2


@torch.no_grad()
def calibrate_thresholds_rate(model: torch.nn.Module, batch: torch.Tensor) -> dict:
    """{"calib_keep_rate", "calib_tokens"}: the keep rate the current thresholds reach on the calibration batch."""
    with collect_telemetry(model) as telemetry:
        model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    return {"calib_keep_rate": telemetry.summary()["keep_rate"], "calib_tokens": int(batch.numel())}


def learn_thresholds(model: torch.nn.Module, teacher: torch.nn.Module, batch: torch.Tensor) -> list[float]:
    """Train the calibrated thresholds through a soft comparator (LeOPArd-style), in place; returns the loss per step.

    The comparator becomes sigmoid((score − threshold) / learn_temperature),
    the soft mask weighs each key's softmax term, and Adam moves only the
    thresholds to minimise KL(teacher ‖ model) per token plus
    learn_rate_weight · (keep rate − keep_rate)², the keep rate counted by the
    hard comparator with the soft one's gradient (straight-through).  Hard comparators
    come back afterwards.  Threshold rules only (top-k rules have nothing to learn).
    """
    layers = prune_layers(model)
    sel = layers[0].config.selection
    if sel.rule not in ("threshold", *MARGIN_RULES):
        raise CimattnError(f"learned thresholds need a threshold, relative or probability rule, not '{sel.rule}'")
    if any(cim.threshold.isnan().any() for cim in layers):
        calibrate_thresholds(model, batch, measure=False)
    device = next(model.parameters()).device
    batch = batch.to(device)
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=batch, use_cache=False).logits.float(), dim=-1).flatten(0, 1)
    thresholds = [cim.threshold for cim in layers]  # buffers: they require gradients only while they learn
    optimizer = torch.optim.Adam(thresholds, lr=sel.learn_lr)
    losses = []
    try:
        for cim in layers:
            cim.soft_temperature = sel.learn_temperature
        with gradients_only_for(model, thresholds):
            for _ in range(sel.learn_steps):
                for cim in layers:
                    cim.soft_kept = []
                logp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1).flatten(0, 1)
                kl = torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")
                kept = sum(k for cim in layers for k, _ in cim.soft_kept) / sum(n for cim in layers for _, n in cim.soft_kept)
                loss = kl + sel.learn_rate_weight * (kept - sel.keep_rate) ** 2
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    finally:
        for cim in layers:
            cim.soft_temperature, cim.soft_kept = None, []
    return losses


def prepare_thresholds(model: torch.nn.Module, batch: torch.Tensor, teacher: torch.nn.Module | None = None, *,
                       measure: bool = True) -> dict:
    """Calibrate, and with `selection.learn_steps` learn, every prune-and-recompute layer's thresholds on `batch`.

    Learning runs on windows of `selection.learn_context` cut from `batch` (the
    backward holds every layer's soft (H, T, T) mask); the keep rate a margin
    reaches depends on the context, so afterwards one offset added to every
    learned threshold restores `keep_rate` on `batch` itself: learning decides
    how the keys are shared among layers and heads, the offset how many there are.
    Returns the calibration metrics ("learn_loss" too when learning; the keep rate reached only with `measure`).
    """
    layers = prune_layers(model)
    if not layers or not layers[0].config.selection.learn_steps:
        return calibrate_thresholds(model, batch, measure=measure)
    sel = layers[0].config.selection
    if teacher is None:
        raise CimattnError("learned thresholds (selection.learn_steps > 0) need the digital teacher model")
    calibrate_thresholds(model, batch, measure=False)
    calibrated = [cim.threshold.clone() for cim in layers]
    window = min(sel.learn_context, batch.shape[-1])
    windows = batch.flatten()[: batch.numel() // window * window].reshape(-1, window)
    losses = learn_thresholds(model, teacher, windows)
    learned = [cim.threshold.clone() for cim in layers]
    # bracket: at the smallest (calibrated − learned) every head sits at or below its calibrated value, at the largest at or above
    gaps = torch.cat([(c - t).flatten() for c, t in zip(calibrated, learned)])
    shift = shift_to_rate(model, layers, batch, learned, gaps.min().item(), gaps.max().item())
    return {"learn_loss": losses, "learn_shift": shift, **calibrate_thresholds_rate(model, batch)}


def threshold_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{buffer name: tensor} of every calibrated buffer, named as in `model.named_buffers()`."""
    return {name: b.detach().cpu().clone() for name, b in model.named_buffers() if name.rsplit(".", 1)[-1] in CALIBRATED and ".cim." in name}


def load_thresholds(model: torch.nn.Module, directory: Path) -> None:
    """Load the calibrated buffers saved in an adapted directory into a model converted with the same preset."""
    state = checkpoint.load_parameters(directory)
    own = dict(model.named_buffers())
    expected = threshold_state(model).keys()
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        raise CimattnError(f"{directory}: its thresholds do not fit this model (missing {missing}); was it calibrated on the same model and preset?")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CimattnError(f"{directory}: '{name}' has shape {tuple(tensor.shape)}, the model {tuple(own[name].shape)}")
        own[name].copy_(tensor)


def adapt_thresholds(
    model: torch.nn.Module, calib_ids: torch.Tensor, hardware: HardwareConfig, *, context: int, checkpoint_dir: Path,
    teacher: torch.nn.Module | None = None,
) -> dict:
    """The adapt stage for prune_recompute presets: calibrate (and learn, when asked) or reload a finished one; save it."""
    state = checkpoint.read_state(checkpoint_dir)
    if state.get("done"):
        load_thresholds(model, checkpoint_dir)
        return {k: v for k, v in state.items() if k.startswith("calib_")}
    recipe = hardware.adapt
    result = prepare_thresholds(model, calibration_windows(calib_ids, recipe.calib_tokens, recipe.calib_context or context), teacher)
    checkpoint.save_parameters(checkpoint_dir, threshold_state(model), hardware)
    checkpoint.update_state(checkpoint_dir, done=True, **result)
    return result


__all__ = [
    "adapt_thresholds", "calibrate_thresholds", "calibrate_thresholds_rate", "calibration_windows", "learn_thresholds",
    "load_thresholds", "prepare_thresholds", "shift_to_rate", "threshold_state",
]
