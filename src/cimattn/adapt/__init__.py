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
stages go to the later ones).  Every stage reads the calibration text, or with
`Adapt.data: teacher` a sample of the teacher's own distribution
(`distill.teacher_text`, drawn once and kept in the adapted directory).

With a wall-clock budget, how many steps each stage gets depends on the
machine.  Every run records the counts it ran (`adapt_steps`, beside its
metrics in results.json: iterations of the linear calibration and of `init`, steps of the
linear fine-tuning, layer-wise steps per layer, end-to-end steps), and
`adapt_model(steps=...)` runs exactly those counts with no clock: the same
parameters, bit for bit on the same machine, from the same seed.
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
from cimattn.errors import CimattnError
from cimattn.eval import max_context
from cimattn.models.convert import (
    hardware_state_dict,
    load_hardware_state,
    set_cell,
    trainable_parameters,
)

STEP_COUNTS = ("calibration", "linear_finetune", "init", "layerwise", "finetune")  # the stages `adapt_steps` counts
# of the whole budget, at most, for each statistics-matching stage (the training stages' shares are the recipe's)
CALIBRATION_BUDGET_SHARE = 0.15


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
    steps: dict[str, int] | None = None,
) -> dict:
    """Adapt `model` (converted to `hardware`) in place; returns its metrics, a `history` of losses and `adapt_steps`.

    `context`: window length of calibration and training when the recipe's `calib_context` is null.
    `steps`: a run's `adapt_steps` to replay — each stage runs exactly that many iterations or steps
    (a stage it does not name does not train), and `budget_s` must be None.
    """
    if steps is not None and budget_s is not None:
        raise CimattnError("replaying a run's step counts takes no wall-clock budget: drop --budget")
    if steps is not None and set(steps) - set(STEP_COUNTS):
        raise CimattnError(f"unknown adaptation stages {sorted(set(steps) - set(STEP_COUNTS))} in the step counts; known: {STEP_COUNTS}")
    recipe = hardware.adapt.model_copy(update={"calib_context": hardware.adapt.calib_context or context})
    limit = max_context(model)
    for name in ("calib_context", "layerwise_context", "finetune_context"):
        if limit is not None and (getattr(recipe, name) or 0) > limit:
            raise CimattnError(f"adapt.{name} {getattr(recipe, name)} is longer than the model's {limit} positions: lower it in the preset")
    started = time.perf_counter()
    final_cell = hardware.gaincell.cell
    state = checkpoint.read_state(checkpoint_dir)
    if state:  # resume: the parameters of the last finished stage
        load_hardware_state(model, checkpoint.load_parameters(checkpoint_dir))
        set_cell(model, state["cell"])
    if state.get("done"):
        return _result(state)
    if recipe.data == "teacher":  # every stage reads the teacher's own text instead (sampled once, inside the budget)
        rows = max(recipe.calib_context, recipe.layerwise_context or 0, recipe.finetune_context or 0)  # every stage's windows fit in one row
        calib_ids = distill.teacher_text(teacher, calib_ids, recipe.teacher_tokens, rows, seed, checkpoint_dir, progress)
    batch = calibration_batch(calib_ids, recipe.calib_tokens, recipe.calib_context).to(next(model.parameters()).device)

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

    def iterate(stage: str, title: str, targets) -> list[float]:
        iterations = recipe.init_iterations if steps is None else steps.get(stage, 0)
        with progress(title, total=iterations + 1) as advance:
            return initialize(model, batch, targets, iterations=iterations, tolerance=recipe.init_tolerance,
                              deadline=deadline(), progress=advance)

    def finish(stage: str, cell: str, **entries) -> dict:
        checkpoint.save_parameters(checkpoint_dir, hardware_state_dict(model, recipe.train), hardware)
        state = checkpoint.update_state(checkpoint_dir, **{stage: True}, cell=cell, **entries)
        checkpoint.drop_training(checkpoint_dir, stage)
        return state

    def finetune(stage: str, budget: float | None) -> list[float]:
        count = (steps.get(f"{stage}_finetune" if stage == "linear" else stage, 0) if steps is not None
                 else recipe.finetune_steps if budget_s is None else None)
        if count == 0 or budget == 0.0:
            return []
        return distill.distill(model, teacher, calib_ids, recipe, stage=stage, parameters=trainable_parameters(model, recipe.train),
                               steps=count, budget_s=budget, checkpoint_dir=checkpoint_dir, seed=seed, progress=progress)

    if not state.get("linear"):
        set_cell(model, "linear")
        targets = teacher_targets(model, teacher, batch)
        fit_scalers(model, batch, targets)
        calib = iterate("calibration", "calibrate (linear cell)", targets)
        tune = final_cell == "nonlinear" and "linear_finetune" not in recipe.skip
        losses = finetune("linear", remaining(recipe.linear_budget_share)) if tune else []
        state = finish("linear", "linear", calibration_error=calib, linear_loss=losses, ppl_linear_adapted=measured("linear cell, adapted"))
    if final_cell == "nonlinear" and "init" in recipe.skip and not state.get("init"):
        set_cell(model, "nonlinear")
        state = finish("init", "nonlinear", ppl_hardware_initialized=measured("nonlinear cell, linear model's parameters"))
    if final_cell == "nonlinear" and not state.get("init"):
        targets = measure_targets(model, list(batch.split(1)))
        set_cell(model, "nonlinear")
        init = iterate("init", "initialization algorithm (nonlinear cell)", targets)
        state = finish("init", "nonlinear", init_error=init, ppl_hardware_initialized=measured("initialization algorithm"))
    if "layerwise" in recipe.skip and not state.get("layerwise"):
        state = finish("layerwise", final_cell)
    if not state.get("layerwise"):
        text = calibration_batch(calib_ids, recipe.layerwise_text_tokens or recipe.calib_tokens,
                                 recipe.layerwise_context or recipe.calib_context).to(batch.device)  # by default: the batch
        captured = layerwise.capture_teacher(teacher, text)
        per_layer = state.get("layerwise_steps")
        if per_layer is None:  # planned once, so a resumed run trains as many steps
            budget = remaining(recipe.layerwise_budget_share)
            if steps is not None:
                per_layer = steps.get("layerwise", 0)
            elif budget is None:
                per_layer = recipe.layerwise_steps
            else:
                per_layer = int(budget / len(captured.targets) / layerwise.time_one_step(model, captured, recipe)) if budget else 0
            state = checkpoint.update_state(checkpoint_dir, layerwise_steps=per_layer)
        errors = layerwise.train_layers(model, captured, recipe, steps_per_layer=per_layer, progress=progress, seed=seed)
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
    # updates of each statistics-matching stage (its history has one measurement more), steps of each training stage
    ran = {"calibration": len(state.get("calibration_error", [])) - 1, "linear_finetune": len(state.get("linear_loss", [])),
           "init": len(state.get("init_error", [])) - 1, "layerwise": state.get("layerwise_steps", 0) if state.get("layerwise_error") else 0,
           "finetune": len(state.get("finetune_loss", []))}
    metrics["adapt_steps"] = {k: n for k, n in ran.items() if n > 0}
    return metrics


def load_adapted(model: torch.nn.Module, directory: Path) -> HardwareConfig:
    """Load a finished adaptation's parameters into a model converted with the same preset."""
    hardware = load_preset(Path(directory) / checkpoint.PRESET)
    load_hardware_state(model, checkpoint.load_parameters(directory))
    return hardware


__all__ = ["adapt_model", "calibration_batch", "load_adapted"]
