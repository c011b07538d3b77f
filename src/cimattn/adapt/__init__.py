"""Adapt a converted model to its hardware without training from scratch (Leroux et al.'s recipe, and ours).

Stages, each resumable from the adapted directory:
  linear    the model with the *linear* cell: scalers fitted to the digital
            teacher's statistics (ours: training-free, `fit_scalers`, then
            the paper's iteration to its tolerance), then distillation
            fine-tuning (the paper's step 1); its per-head statistics
            become the targets of the next stage.
  init      the *nonlinear* model: the initialization algorithm moves every
            scaler until its statistics match the linear model's (step 2).
  layerwise each attention layer in turn trained alone to reproduce the
            teacher's attention output from the input the adapted layers
            before it produce (ours, cheap: no logits, one layer per step).
  finetune  end-to-end distillation fine-tuning (the paper's step 3).
A preset whose cell is linear skips the linear fine-tuning and `init`;
`Adapt.skip` names other stages not to run (the nonlinear model is still
measured where `init` would have ended, and the budget shares of skipped
stages go to the later ones).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from cimattn.adapt import checkpoint, distill, layerwise
from cimattn.adapt.initialize import (
    fit_scalers,
    initialize,
    measure_targets,
    teacher_targets,
)
from cimattn.config import HardwareConfig, load_preset
from cimattn.models.convert import (
    hardware_state_dict,
    load_hardware_state,
    set_cell,
    trainable_parameters,
)

# Shares of the wall-clock budget left when each stage starts:
LINEAR_BUDGET_SHARE = 0.15  # fine-tuning the linear model (the paper's step 1)
LAYERWISE_BUDGET_SHARE = 0.5  # layer-wise distillation; end-to-end fine-tuning takes the rest (measured best of 0.5 / 0.8)
CALIBRATION_BUDGET_SHARE = 0.15  # of the whole budget, at most, for each statistics-matching stage


def calibration_batch(ids: torch.Tensor, tokens: int, context: int) -> torch.Tensor:
    """The fixed batch of the initialization: the first `tokens` of calibration text in rows of `context`."""
    context = min(context, ids.numel())
    rows = max(1, min(tokens, ids.numel()) // context)
    return ids[: rows * context].reshape(rows, context)


def adapt_model(
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    calib_ids: torch.Tensor,
    hardware: HardwareConfig,
    *,
    budget_s: float | None,
    context: int,
    checkpoint_dir: Path,
    seed: int = 0,
    progress: Callable,
    evaluate: Callable[[str], float],
) -> dict:
    """Adapt `model` (converted to `hardware`) in place; returns its metrics and a `history` of losses.

    `context`: window length of calibration and training when the recipe's `calib_context` is null.
    """
    recipe = hardware.adapt.model_copy(update={"calib_context": hardware.adapt.calib_context or context})
    started = time.perf_counter()
    batch = calibration_batch(calib_ids, recipe.calib_tokens, recipe.calib_context).to(next(model.parameters()).device)
    final_cell = hardware.gaincell.cell
    state = checkpoint.read_state(checkpoint_dir)
    if state:  # resume: the parameters of the last finished stage
        load_hardware_state(model, checkpoint.load_parameters(checkpoint_dir))
        set_cell(model, state["cell"])
    if state.get("done"):
        return _result(state)

    evaluating = [0.0]  # seconds spent measuring perplexity: reported, not charged to the budget

    def measured(label: str) -> float:
        t0 = time.perf_counter()
        ppl = evaluate(label)
        evaluating[0] += time.perf_counter() - t0
        return ppl

    def remaining(share: float) -> float | None:
        if budget_s is None:
            return None
        return max(0.0, budget_s - (time.perf_counter() - started - evaluating[0])) * share

    def deadline() -> float | None:
        return None if budget_s is None else time.perf_counter() + CALIBRATION_BUDGET_SHARE * budget_s

    def finish(stage: str, cell: str, **entries) -> dict:
        checkpoint.save_parameters(checkpoint_dir, hardware_state_dict(model, recipe.train), hardware)
        state = checkpoint.update_state(checkpoint_dir, **{stage: True}, cell=cell, **entries)
        checkpoint.drop_training(checkpoint_dir, stage)
        return state

    def finetune(stage: str, budget: float | None) -> list[float]:
        steps = recipe.finetune_steps if budget_s is None else None
        if steps == 0 or budget == 0.0:
            return []
        return distill.distill(model, teacher, calib_ids, recipe, stage=stage, parameters=trainable_parameters(model, recipe.train),
                               steps=steps, budget_s=budget, checkpoint_dir=checkpoint_dir, seed=seed, progress=progress)

    if not state.get("linear"):
        set_cell(model, "linear")
        targets = teacher_targets(model, teacher, batch)
        fit_scalers(model, batch, targets)
        with progress("calibrate (linear cell)", total=recipe.init_iterations) as advance:
            calib = initialize(model, batch, targets, iterations=recipe.init_iterations,
                               tolerance=recipe.init_tolerance, deadline=deadline(), progress=advance)
        tune = final_cell == "nonlinear" and "linear_finetune" not in recipe.skip
        losses = finetune("linear", remaining(LINEAR_BUDGET_SHARE)) if tune else []
        state = finish("linear", "linear", calibration_error=calib, linear_loss=losses, ppl_linear_adapted=measured("linear cell, adapted"))
    if final_cell == "nonlinear" and "init" in recipe.skip and not state.get("init"):
        set_cell(model, "nonlinear")
        state = finish("init", "nonlinear", ppl_hardware_initialized=measured("nonlinear cell, linear model's parameters"))
    if final_cell == "nonlinear" and not state.get("init"):
        targets = measure_targets(model, list(batch.split(1)))
        set_cell(model, "nonlinear")
        with progress("initialization algorithm (nonlinear cell)", total=recipe.init_iterations) as advance:
            init = initialize(model, batch, targets, iterations=recipe.init_iterations, tolerance=recipe.init_tolerance,
                              deadline=deadline(), progress=advance)
        state = finish("init", "nonlinear", init_error=init, ppl_hardware_initialized=measured("initialization algorithm"))
    if "layerwise" in recipe.skip and not state.get("layerwise"):
        state = finish("layerwise", final_cell)
    if not state.get("layerwise"):
        captured = layerwise.capture_teacher(teacher, batch)
        steps = state.get("layerwise_steps")
        if steps is None:  # planned once, so a resumed run trains as many steps
            budget = remaining(LAYERWISE_BUDGET_SHARE)
            per_step = layerwise.time_one_step(model, captured, recipe) if budget else 1.0
            steps = recipe.layerwise_steps if budget is None else int(budget / len(captured.targets) / per_step)
            state = checkpoint.update_state(checkpoint_dir, layerwise_steps=steps)
        errors = layerwise.train_layers(model, captured, recipe, steps_per_layer=steps, progress=progress)
        entries = {"layerwise_error": [last for _, last in errors], "ppl_hardware_layerwise": measured("layer-wise distillation")} if errors else {}
        state = finish("layerwise", final_cell, **entries)
    if not state.get("finetune"):
        losses = [] if "finetune" in recipe.skip else finetune("finetune", remaining(1.0))
        state = finish("finetune", final_cell, finetune_loss=losses)
    state = checkpoint.update_state(checkpoint_dir, done=True)
    return _result(state)


def _result(state: dict) -> dict:
    metrics = {k: v for k, v in state.items() if k.startswith("ppl_")}
    histories = ("calibration_error", "linear_loss", "init_error", "layerwise_error", "finetune_loss")
    metrics["history"] = {k: state[k] for k in histories if state.get(k)}
    return metrics


def load_adapted(model: torch.nn.Module, directory: Path) -> HardwareConfig:
    """Load a finished adaptation's parameters into a model converted with the same preset."""
    hardware = load_preset(Path(directory) / checkpoint.PRESET)
    load_hardware_state(model, checkpoint.load_parameters(directory))
    return hardware


__all__ = ["adapt_model", "calibration_batch", "load_adapted"]
