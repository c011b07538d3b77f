"""Distillation fine-tuning: the hardware model learns the digital teacher's next-token distribution.

Hardware in the loop: the student runs its simulated attention forward and
backward (straight-through quantisers, surrogate cell gradient).  Accelerate
places the work, so the same code runs on the CPU, one GPU or several.  The
loss is the KL on logits (recipe `kl_tokens`: at a seeded draw of positions
only, so the vocabulary-wide head and softmax run on those), plus (recipe
`hidden_weight`) the relative error of every decoder layer's hidden state.
The rate can fall linearly to `lr_final_fraction` of itself by the last step.
With `mixed_precision: bf16` the digital layers of both models run under
bf16 autocast (the paper's training does); the simulated arrays do not
(only their surrogate gradient's products).
The text is the corpus or, with recipe `data: teacher`, a sample of the
teacher's own distribution (`teacher_text`).

Reproducible and resumable: the windows of step i depend only on (seed, i),
and parameters, optimizer state and step are checkpointed together in one
atomic write, so a run killed at any point and restarted ends with the same
parameters as one that was never killed.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from cimattn.adapt import checkpoint
from cimattn.config import Adapt
from cimattn.errors import CimattnError
from cimattn.models.convert import gradients_only_for
from cimattn.storage import atomic_write_bytes

CHECKPOINT_EVERY_S = 30.0  # wall-clock between checkpoints: bounds the work a kill loses
TEACHER_TEXT = "teacher-text.safetensors"  # the sampled text of `data: teacher`, in the adapted directory
PROMPT_TOKENS = 16  # corpus tokens that start each teacher-sampled sequence
TEACHER_ROWS_PER_CALL = 32  # sequences sampled together (one batched generate)
PLAN_AFTER_STEPS = 3  # a budget becomes a step count from the steps after the first (which pays one-off set-up costs)
POSITION_STREAM = 1 << 40  # seeds the positions of `kl_tokens` apart from the windows'


def sample_windows(ids: torch.Tensor, batch: int, context: int, seed: int, step: int) -> torch.Tensor:
    """(batch, context) random windows of the token stream, a function of (seed, step) only."""
    context = min(context, ids.numel() - 1)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - context, (batch,), generator=g)
    return torch.stack([ids[s : s + context] for s in starts.tolist()])


def sample_positions(context: int, count: int | None, seed: int, step: int) -> torch.Tensor | None:
    """The sorted positions of a window whose logits enter the KL at `step` (`Adapt.kl_tokens`), a function of
    (seed, step) only; None = all of them."""
    if count is None or count >= context:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + POSITION_STREAM)
    return torch.randperm(context, generator=g)[:count].sort().values


def lr_factor(step: int, planned: int | None, recipe: Adapt) -> float:
    """The learning rate of `step` as a fraction of `recipe.lr`: the warm-up, then, once the step count is known,
    a linear fall to `lr_final_fraction` at the last step.

    The first PLAN_AFTER_STEPS steps keep the full rate whether or not the count is known from the start, so a
    budgeted run and its replay at the same counts take the same steps.
    """
    warm = min(1.0, (step + 1) / recipe.warmup_steps) if recipe.warmup_steps else 1.0
    if planned is None or step < PLAN_AFTER_STEPS or planned <= PLAN_AFTER_STEPS:
        return warm
    done = (step - PLAN_AFTER_STEPS + 1) / (planned - PLAN_AFTER_STEPS)
    return warm * (1.0 - (1.0 - recipe.lr_final_fraction) * done)


def digital_autocast(recipe: Adapt, device: torch.device) -> torch.autocast:
    """bf16 autocast for a training step's digital layers when the recipe asks (`mixed_precision`); the registered
    hardware attentions switch it off for the simulated arrays (`cimattn.attention.without_autocast`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.mixed_precision == "bf16")


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student), in fp32."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def distill_loss(student, teacher, batch: torch.Tensor, hidden_weight: float = 0.0, positions: torch.Tensor | None = None) -> torch.Tensor:
    """KL on the logits of `batch` (only at `positions` of each row when given), plus `hidden_weight` × the mean over
    decoder layers of `relative_error` of their hidden states (the embeddings, identical in both models, left out)."""
    hidden = hidden_weight > 0
    keep = {} if positions is None else {"logits_to_keep": positions.to(batch.device)}  # the LM head and softmax only where the KL reads
    with torch.no_grad():
        target = teacher(batch, output_hidden_states=hidden, **keep)
    out = student(batch, output_hidden_states=hidden, **keep)
    loss = kl_loss(out.logits, target.logits)
    if hidden:
        pairs = list(zip(out.hidden_states[1:], target.hidden_states[1:]))
        loss = loss + hidden_weight * sum(relative_error(s, t) for s, t in pairs) / len(pairs)
    return loss


def relative_error(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖hidden − target‖² / ‖target‖², in fp32.

    Per token, because a pre-trained LM's residual stream carries massive activations on a few tokens (SmolLM2: one
    dimension at ~24,000 on the first token of a window from layer 12 on, ~100 elsewhere): normalised by the whole
    tensor's variance, the error of that one token would be the whole loss.
    """
    err = (hidden.float() - target.float()).pow(2).sum(-1)
    return (err / target.float().pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)).mean()


def teacher_text(teacher: torch.nn.Module, prompts_from: torch.Tensor, tokens: int, context: int, seed: int,
                 checkpoint_dir: Path, progress, prompt_tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """(≥ tokens,) a token stream sampled from `teacher` at temperature 1: rows of `context` tokens, each the
    continuation of `prompt_tokens` taken from evenly spaced places of `prompts_from` (prompts included).

    A function of (teacher, prompts, seed); saved in `checkpoint_dir`, so a resumed run reads it back.
    """
    from transformers import GenerationConfig

    path = Path(checkpoint_dir) / TEACHER_TEXT
    if path.is_file():
        return load(path.read_bytes())["ids"]
    context = min(context, prompts_from.numel())
    prompt_tokens = min(prompt_tokens, context - 1)
    rows = -(-tokens // context)
    starts = torch.linspace(0, prompts_from.numel() - prompt_tokens, rows).long().tolist()
    prompts = torch.stack([prompts_from[s : s + prompt_tokens] for s in starts])
    device = next(teacher.parameters()).device
    new = context - prompt_tokens
    eos = teacher.config.eos_token_id  # an id, a list of ids or None; suppressed by min_new_tokens: rows of equal length
    pad = eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else 0
    # the teacher's own distribution: none of a hub model's generation defaults (repetition penalty, top-k, …)
    sampling = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                                pad_token_id=pad, eos_token_id=eos)
    chunks = []
    with progress("sample text from the teacher", total=rows) as advance, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for chunk in prompts.split(TEACHER_ROWS_PER_CALL):
            ids = chunk.to(device)
            out = teacher.generate(ids, attention_mask=torch.ones_like(ids), generation_config=sampling)
            chunks.append(out.cpu())
            advance(len(chunk))
    stream = torch.cat(chunks).reshape(-1).contiguous()
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({"ids": stream}))
    return stream


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

    if recipe.kl_tokens is not None and "logits_to_keep" not in inspect.signature(student.forward).parameters:
        raise CimattnError(f"adapt.kl_tokens needs a model whose forward takes logits_to_keep, which {type(student).__name__} "
                           "does not: set kl_tokens: null")
    accelerator = Accelerator(cpu=next(student.parameters()).device.type == "cpu")  # where the caller put the model
    optimizer = torch.optim.AdamW(parameters.values(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    prepared, optimizer = accelerator.prepare(student, optimizer)
    teacher.to(accelerator.device)

    step, losses, planned = 0, [], steps
    context = recipe.finetune_context if stage == "finetune" and recipe.finetune_context else recipe.calib_context
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
            batch = sample_windows(ids, recipe.batch_size, context, seed, step).to(accelerator.device)
            positions = sample_positions(batch.shape[1], recipe.kl_tokens, seed, step)
            with digital_autocast(recipe, accelerator.device):  # student and teacher
                loss = distill_loss(prepared, teacher, batch, recipe.hidden_weight, positions)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(list(parameters.values()), recipe.grad_clip)
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * lr_factor(step, planned, recipe)
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
