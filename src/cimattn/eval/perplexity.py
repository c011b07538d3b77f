"""Perplexity by the project's convention (DESIGN.md).

Take the first `eval_tokens` token ids, cut them into non-overlapping windows
of `context` tokens from token 0 (the last window may be shorter; one with
fewer than 2 tokens is skipped), score every token but each window's first,
and report exp of the mean NLL over all scored tokens.  Each window starts
with no past, so the first tokens of a window see little context: this is
the simple, stride = context convention, not a sliding window.

The same tokens also give perplexity by position in the window, in
power-of-two bands (positions 1, 2–3, 4–7, …): how quality depends on the
context a token sees, e.g. a hardware model adapted on short windows and
read over long ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from cimattn.errors import CimattnError

DEFAULT_CONTEXT = 1024
MIN_WINDOW = 2  # a window needs one token to condition on and one to score


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_mean: float  # nats per scored token
    scored_tokens: int
    eval_tokens: int  # tokens actually read (fewer than asked if the text is shorter)
    context: int
    windows: int
    tokens_per_s: float  # eval_tokens through the model per second of wall time
    seconds: float
    by_position: tuple[dict, ...] = ()  # {"first", "last" (positions in the window), "tokens", "ppl"} per band


def max_context(model) -> int | None:
    """The longest sequence the model's positions allow, or None if its config names no limit."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for field in ("max_position_embeddings", "n_positions"):  # n_positions: GPT-2 style configs
        limit = getattr(config, field, None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return None


def window_bounds(n_tokens: int, context: int) -> list[tuple[int, int]]:
    """(start, end) of each window over `n_tokens` tokens, windows shorter than MIN_WINDOW dropped."""
    return [(s, min(s + context, n_tokens)) for s in range(0, n_tokens, context) if n_tokens - s >= MIN_WINDOW]


def perplexity(
    model,
    ids: torch.Tensor,
    *,
    context: int = DEFAULT_CONTEXT,
    eval_tokens: int | None = None,
    batch_size: int = 1,
    progress: Callable[[int], object] | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on the token ids `ids` (N,) by the convention above.

    `eval_tokens` larger than the text uses the whole text (the result says
    how many were read).  `progress(advance)` is called after each batch with
    the number of tokens it read; they add up to `result.eval_tokens`.
    """
    ids = _check(model, ids, context, eval_tokens, batch_size)
    bounds = window_bounds(len(ids), context)
    was_training = model.training
    model.eval()
    nll_sum, scored = 0.0, 0
    position_nll = torch.zeros(context, dtype=torch.float64)  # summed over windows, by position in the window
    position_count = torch.zeros(context, dtype=torch.long)
    start_time = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch, start in _batches(ids, bounds, batch_size):
                nll = token_nll(model, batch, start)
                nll_sum += nll.sum(dtype=torch.float64).item()
                scored += nll.numel()
                position_nll[1 : nll.shape[1] + 1] += nll.sum(0, dtype=torch.float64).cpu()
                position_count[1 : nll.shape[1] + 1] += nll.shape[0]
                if progress is not None:
                    progress(batch.numel())
        if progress is not None and len(ids) > bounds[-1][1]:
            progress(len(ids) - bounds[-1][1])  # the lone last token, read but not scored
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start_time
    nll_mean = nll_sum / scored
    return PerplexityResult(
        ppl=math.exp(nll_mean), nll_mean=nll_mean, scored_tokens=scored, eval_tokens=len(ids),
        context=context, windows=len(bounds), tokens_per_s=len(ids) / seconds, seconds=seconds,
        by_position=position_bands(position_nll, position_count),
    )


def position_bands(nll: torch.Tensor, count: torch.Tensor) -> tuple[dict, ...]:
    """Perplexity per power-of-two band of positions [2^i, 2^(i+1)) from NLL sums and token counts by position."""
    bands, first = [], 1
    while first < len(nll):
        last = min(2 * first, len(nll)) - 1
        n = int(count[first : last + 1].sum())
        if n:
            bands.append({"first": first, "last": last, "tokens": n, "ppl": math.exp(float(nll[first : last + 1].sum()) / n)})
        first *= 2
    return tuple(bands)


def _check(model, ids: torch.Tensor, context: int, eval_tokens: int | None, batch_size: int) -> torch.Tensor:
    """The ids to read, flattened and cut to `eval_tokens`, after checking every argument."""
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype != torch.long:
        raise CimattnError(f"token ids must be a 1-D LongTensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    if context < MIN_WINDOW:
        raise CimattnError(f"context {context} is too short: use --context {MIN_WINDOW} or more")
    limit = max_context(model)
    if limit is not None and context > limit:
        raise CimattnError(f"context {context} is longer than the model's {limit} positions: use --context {limit} or less")
    if eval_tokens is not None and eval_tokens < MIN_WINDOW:
        raise CimattnError(f"eval tokens {eval_tokens} is too few: use --eval-tokens {MIN_WINDOW} or more")
    if batch_size < 1:
        raise CimattnError(f"batch size {batch_size} must be at least 1")
    ids = ids[:eval_tokens]
    if len(ids) < MIN_WINDOW:
        raise CimattnError(f"the text has {len(ids)} token(s); perplexity needs at least {MIN_WINDOW}: give a longer text")
    return ids


def _batches(ids: torch.Tensor, bounds: list[tuple[int, int]], batch_size: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(windows stacked as (B, L), first token index): full windows in batches, the short last one alone."""
    full = [b for b in bounds if b[1] - b[0] == bounds[0][1] - bounds[0][0]]
    for i in range(0, len(full), batch_size):
        chunk = full[i:i + batch_size]
        yield torch.stack([ids[s:e] for s, e in chunk]), chunk[0][0]
    for s, e in bounds[len(full):]:
        yield ids[s:e][None], s


def token_nll(model, batch: torch.Tensor, start: int = 0) -> torch.Tensor:
    """NLL (B, L-1) of every token but each window's first, in float32 whatever the model's dtype, on the model's device.

    `start`: where the window begins in the text, for the error a NaN/Inf logit raises.
    """
    logits = model(input_ids=batch.to(_device(model)), use_cache=False).logits
    if not torch.isfinite(logits).all():
        raise CimattnError(
            f"model produced NaN/Inf logits in the window from token {start}: "
            "check the model's dtype and the hardware settings (try float32 or a milder preset)"
        )
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)


def _device(model) -> torch.device:
    return next(model.parameters()).device
