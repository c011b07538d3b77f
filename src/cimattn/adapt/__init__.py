"""Adapt a converted model to its hardware without training from scratch (Leroux et al.'s recipe, and ours).

Stages, each resumable from the adapted directory:
  linear    the model with the *linear* cell: scalers fitted to the digital
            teacher's statistics (ours: training-free, `fit_scalers`, then
            the paper's iteration to its tolerance), then distillation
            fine-tuning (the paper's step 1); its per-head statistics
            become the targets of the next stage.
  init      the *nonlinear* model: the initialization algorithm moves every
            scaler until its statistics match the linear model's (step 2).
  finetune  distillation fine-tuning of the nonlinear model (step 3).
A preset whose cell is linear stops after the first stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from cimattn.adapt import checkpoint
from cimattn.adapt import distill
from cimattn.adapt.initialize import fit_scalers, initialize, measure_targets, teacher_targets
from cimattn.config import HardwareConfig, load_preset
from cimattn.models.convert import hardware_state_dict, load_hardware_state, set_cell, trainable_parameters

LINEAR_BUDGET_SHARE = 1 / 3  # of the fine-tuning budget, spent on the linear model; the rest on the nonlinear one
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
    checkpoint_dir: Path,
    seed: int = 0,
    progress: Callable,
    evaluate: Callable[[str], float],
) -> dict:
    """Adapt `model` (converted to `hardware`) in place; returns its metrics and a `history` of losses."""
    recipe = hardware.adapt
    started = time.perf_counter()
    batch = calibration_batch(calib_ids, recipe.calib_tokens, recipe.calib_context)
    final_cell = hardware.gaincell.cell
    state = checkpoint.read_state(checkpoint_dir)
    if state.get("done"):
        load_hardware_state(model, checkpoint.load_parameters(checkpoint_dir))
        set_cell(model, final_cell)
        return _result(state)

    def deadline() -> float | None:
        return None if budget_s is None else time.perf_counter() + CALIBRATION_BUDGET_SHARE * budget_s

    def finish(stage: str, cell: str, **entries) -> dict:
        checkpoint.save_parameters(checkpoint_dir, hardware_state_dict(model), hardware)
        return checkpoint.update_state(checkpoint_dir, **{stage: True}, cell=cell, **entries)

    def finetune(stage: str, share: float) -> list[float]:
        steps = recipe.finetune_steps if budget_s is None else None
        remaining = None if budget_s is None else max(0.0, budget_s - (time.perf_counter() - started)) * share
        if steps == 0 or remaining == 0.0:
            return []
        return distill.distill(model, teacher, calib_ids, recipe, stage=stage, parameters=trainable_parameters(model, recipe.train),
                       steps=steps, budget_s=remaining, checkpoint_dir=checkpoint_dir, seed=seed, progress=progress)

    if state.get("cell"):  # resume: the parameters of the last finished stage
        load_hardware_state(model, checkpoint.load_parameters(checkpoint_dir))

    if not state.get("linear"):
        set_cell(model, "linear")
        targets = teacher_targets(model, teacher, batch)
        fit_scalers(model, batch, targets)
        with progress("calibrate (linear cell)", total=recipe.init_iterations) as advance:
            calib = initialize(model, batch, targets, iterations=recipe.init_iterations,
                               tolerance=recipe.init_tolerance, deadline=deadline(), progress=advance)
        share = LINEAR_BUDGET_SHARE if final_cell == "nonlinear" else 1.0
        losses = finetune("linear", share)
        state = finish("linear", "linear", calibration_error=calib, linear_loss=losses, ppl_linear_adapted=evaluate("linear cell, adapted"))
    if final_cell == "nonlinear" and not state.get("init"):
        set_cell(model, "linear")
        targets = measure_targets(model, list(batch.split(1)))
        set_cell(model, "nonlinear")
        with progress("initialization algorithm (nonlinear cell)", total=recipe.init_iterations) as advance:
            init = initialize(model, batch, targets, iterations=recipe.init_iterations, tolerance=recipe.init_tolerance,
                              deadline=deadline(), progress=advance)
        state = finish("init", "nonlinear", init_error=init, ppl_hardware_initialized=evaluate("initialization algorithm"))
    if final_cell == "nonlinear" and not state.get("finetune"):
        set_cell(model, "nonlinear")
        state = finish("finetune", "nonlinear", finetune_loss=finetune("finetune", 1.0))
    state = checkpoint.update_state(checkpoint_dir, done=True)
    return _result(state)


def _result(state: dict) -> dict:
    metrics = {k: v for k, v in state.items() if k.startswith("ppl_")}
    histories = ("calibration_error", "linear_loss", "init_error", "finetune_loss")
    metrics["history"] = {k: state[k] for k in histories if state.get(k)}
    return metrics


def load_adapted(model: torch.nn.Module, directory: Path) -> HardwareConfig:
    """Load a finished adaptation's parameters into a model converted with the same preset."""
    hardware = load_preset(Path(directory) / checkpoint.PRESET)
    load_hardware_state(model, checkpoint.load_parameters(directory))
    return hardware


__all__ = ["adapt_model", "calibration_batch", "load_adapted"]
