"""Distillation fine-tuning: the hardware model learns the digital teacher's next-token distribution.

Hardware in the loop: the student runs its simulated attention forward and
backward (straight-through quantisers, surrogate cell gradient).  Accelerate
places the work, so the same code runs on the CPU, one GPU or several.

Reproducible and resumable: the windows of step i depend only on (seed, i),
and parameters, optimizer state and step are checkpointed together in one
atomic write, so a run killed at any point and restarted ends with the same
parameters as one that was never killed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cimattn.adapt import checkpoint
from cimattn.config import Adapt
from cimattn.models.convert import gradients_only_for

CHECKPOINT_EVERY_S = 30.0  # wall-clock between checkpoints: bounds the work a kill loses
PLAN_AFTER_STEPS = 3  # a budget becomes a step count from the steps after the first (which pays one-off set-up costs)


def sample_windows(ids: torch.Tensor, batch: int, context: int, seed: int, step: int) -> torch.Tensor:
    """(batch, context) random windows of the token stream, a function of (seed, step) only."""
    context = min(context, ids.numel() - 1)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - context, (batch,), generator=g)
    return torch.stack([ids[s : s + context] for s in starts.tolist()])


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student), in fp32."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    ids: torch.Tensor,
    recipe: Adapt,
    *,
    stage: str,
    parameters: dict[str, torch.nn.Parameter],
    steps: int | None,
    budget_s: float | None,
    checkpoint_dir: Path,
    seed: int,
    progress,
) -> list[float]:
    """Fine-tune `parameters` (name → parameter of `student`) for `steps`, or as many as `budget_s` allows.

    Returns the loss of every step.  With a budget, the step count is planned
    once, after PLAN_AFTER_STEPS steps, from their pace, and checkpointed, so
    a resumed run does the same number of steps.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=next(student.parameters()).device.type == "cpu")  # where the caller put the model
    optimizer = torch.optim.AdamW(parameters.values(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    prepared, optimizer = accelerator.prepare(student, optimizer)
    teacher.to(accelerator.device)

    step, losses, planned = 0, [], steps
    resumed = checkpoint.load_training(checkpoint_dir, stage, optimizer)
    if resumed:
        saved, done = resumed
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(saved[name])
        step, losses, planned = done["step"], done["losses"], done["planned_steps"]

    student.train()
    last_save = started = time.perf_counter()
    first_step_s = 0.0
    with progress(f"fine-tune: {stage}", total=planned) as advance, gradients_only_for(student, parameters.values()):
        advance(step)
        while planned is None or step < planned:
            t0 = time.perf_counter()
            batch = sample_windows(ids, recipe.batch_size, recipe.calib_context, seed, step).to(accelerator.device)
            with torch.no_grad():
                target = teacher(batch).logits
            loss = kl_loss(prepared(batch).logits, target)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(list(parameters.values()), recipe.grad_clip)
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * min(1.0, (step + 1) / recipe.warmup_steps) if recipe.warmup_steps else recipe.lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            advance(1)
            if step == 1:
                first_step_s = time.perf_counter() - t0
            if planned is None and (step == PLAN_AFTER_STEPS or time.perf_counter() - started >= (budget_s or 0.0)):
                # once: the budget left at the planned pace of the steps after the first (the first alone if it used the budget)
                pace = (time.perf_counter() - started - first_step_s) / (step - 1) if step > 1 else first_step_s
                planned = step + max(0, int(((budget_s or 0.0) - (time.perf_counter() - started)) / max(pace, 1e-6)))
            if (planned is not None and step >= planned) or time.perf_counter() - last_save > CHECKPOINT_EVERY_S:
                params = {k: p.detach() for k, p in parameters.items()}
                done = {"step": step, "planned_steps": planned, "losses": losses}
                checkpoint.save_training(checkpoint_dir, stage, params, optimizer, done)
                last_save = time.perf_counter()
    student.eval()
    return losses
