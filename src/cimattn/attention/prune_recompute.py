"""Prune-and-recompute attention (SPRINT, HyAtt: shared/PAPERS.md §2–3), registered as `cimattn_prune_recompute`.

For every query:

1. a cheap scorer rates every visible key (`scorer.kind`): the analog
   ReRAM / charge arrays of `cimattn.physics.scoring`, or a digital baseline
   in the same harness — `exact` q·kᵀ (the oracle), `quest` page bounds,
   `h2o` accumulated attention, `random`;
2. a rule keeps some keys (`selection.rule`): a comparator against a
   per-head threshold, a margin below the row maximum, a fixed top-k, or a
   per-query keep rate; the current token, `recent_tokens` before it and
   the first `sink_tokens` are always kept (and count toward the rate);
3. the kept keys are fetched and attention is recomputed exactly: softmax
   over the kept keys only, in fp32, respecting the causal / padding /
   sliding-window mask; GQA as the model does it.

Scores and thresholds are in logits (q·k·scaling).  Hardware parameters live
in `module.cim`, a `PruneRecomputeParams` that `cimattn.models.convert`
attaches: the per-head thresholds (or margins) and the query-DAC and key
ranges.  They are NaN until calibrated (`cimattn.adapt.thresholds`): until
then a threshold rule keeps every key and the ranges are each call's own
maxima.  Because every draw of noise is indexed by position and the keep
decision of a query depends on its own row only, decoding token by token
gives the prefill's outputs (except `h2o`, which needs the whole prefix in
one call, and keep-count rules whose scores tie).

Telemetry (keep rate, fetched tokens under SPRINT's buffer model, bytes
moved) is collected only inside `with collect_telemetry(model) as t:`; the
context object, not the module, holds the counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from cimattn.attention.common import expand_kv, keep_mask, positions, use_kernel
from cimattn.config.schema import ANALOG_SCORERS, PruneRecompute
from cimattn.errors import CimattnError
from cimattn.kernels import sparse as sparse_kernel
from cimattn.physics.scoring import (
    RANDOM_STREAM,
    analog_scores,
    comparator,
    comparator_offsets,
    hashed_uniform,
    soft_comparator,
)

EXACT_SCORERS = ("exact", "h2o")  # scorers that rank keys by the exact logits of every visible key
SCORE_ELEMENTS_PER_BLOCK = 1 << 24  # queries run in blocks whose (B, H, Tb, S) scores stay below this (64 MiB in fp32)
H2O_RECENT_SHARE = 0.5  # H2O (Zhang et al., NeurIPS 2023) splits its budget evenly: heavy hitters and recent tokens
KIB = 1024  # bytes


class PruneRecomputeParams(nn.Module):
    """One attention layer's prune-and-recompute state: per-head thresholds and converter ranges (buffers).

    threshold (H,): comparator reference (rule threshold) or margin below the
    row maximum (rule relative) or log-sum-exp (rule probability), logits; q_full_scale (H,), k_full_scale (Hkv,):
    the query DAC's and the stored keys' full scale.  NaN = not calibrated.
    `calibrate_to`, when set to a keep rate, makes the next forward fit all
    three to its own inputs before selecting (see cimattn.adapt.thresholds).
    `backend` picks where the exact recompute runs (`common.BACKENDS`: the
    sparse Triton kernel on CUDA when `cimattn.kernels.sparse.unsupported`
    allows the call, else torch).  A soft mask (learning thresholds) always
    takes torch.
    """

    def __init__(self, config: PruneRecompute, n_heads: int, n_kv_heads: int, head_dim: int, layer_idx: int = 0):
        super().__init__()
        if n_heads % n_kv_heads:
            raise CimattnError(f"{n_heads} query heads cannot share {n_kv_heads} KV heads evenly")
        self.config = config
        self.n_heads, self.n_kv_heads, self.head_dim, self.layer_idx = n_heads, n_kv_heads, head_dim, layer_idx
        fixed = config.selection.threshold
        self.register_buffer("threshold", torch.full((n_heads,), math.nan if fixed is None else float(fixed)))
        self.register_buffer("q_full_scale", torch.full((n_heads,), math.nan))
        self.register_buffer("k_full_scale", torch.full((n_kv_heads,), math.nan))
        self.calibrate_to: float | None = None
        self.soft_temperature: float | None = None  # set while learning thresholds: the comparator becomes a sigmoid
        self.soft_kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # while learning: (kept pairs, visible pairs) per block
        self.backend = "auto"
        self.telemetry: PruneTelemetry | None = None

    @property
    def bytes_per_token(self) -> float:
        """Bytes fetched per kept token of one KV head: its key and its value."""
        return 2 * self.head_dim * self.config.buffer.bytes_per_element

    @property
    def buffer_tokens(self) -> int:
        """Tokens (K and V of one head) the on-chip buffer holds."""
        return int(self.config.buffer.size_kb * KIB // self.bytes_per_token)

    def extra_repr(self) -> str:
        c = self.config
        return f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, layer={self.layer_idx}, scorer={c.scorer.kind}, rule={c.selection.rule}"


def prune_recompute_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, H, T, D), key/value (B, Hkv, S, D) → ((B, T, H, D), None).

    Queries run in blocks, each over the keys up to its last query only
    (later keys are never visible), so the (B, H, Tb, S) passes stay small
    and causal prefill does half the work.  Dropout is not modelled.
    """
    cim = _params_of(module, query, key)
    dtype = torch.promote_types(query.dtype, torch.float32)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    b, h, t, _ = q.shape
    s, groups = k.shape[-2], h // k.shape[1]
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    if cim.config.scorer.kind == "h2o" and t != s:
        raise CimattnError(
            "the h2o baseline accumulates attention over every earlier query, so it needs the whole sequence in "
            "one call (perplexity); it cannot decode token by token with a cache"
        )
    visible = keep_mask(attention_mask, query, key, sliding_window)  # (B or 1, 1, T, S)
    if cim.calibrate_to is not None:  # thresholds are order statistics over every query: one block
        _calibrate_ranges(cim, q, k)
        block = t
    else:
        block = max(1, min(t, SCORE_ELEMENTS_PER_BLOCK // (b * h * s)))
    ranges = (_range(cim.q_full_scale, q), _range(cim.k_full_scale, k))  # one range per call, whatever the blocks
    # hard masks: the sparse Triton recompute
    kernel = cim.soft_temperature is None and use_kernel(cim.backend, query.is_cuda, lambda: sparse_kernel.unsupported(query, key, value))
    exact_needed = not kernel or cim.config.scorer.kind in EXACT_SCORERS  # else the kernel computes the kept logits only
    k_all = expand_kv(k, groups) if exact_needed else None  # (B, H, S, D)
    v_all = None if kernel else expand_kv(v, groups)
    q_scaled = q * scaling if exact_needed else None  # logits straight from the matmul
    received = torch.zeros(b, h, s, dtype=dtype, device=q.device) if cim.config.scorer.kind == "h2o" else None
    outs = []
    for lo in range(0, t, block):
        hi = min(t, lo + block)
        end = s - t + hi  # keys after the block's last query
        exact = torch.matmul(q_scaled[:, :, lo:hi], k_all[:, :, :end].transpose(-1, -2)) if exact_needed else None  # (B, H, Tb, Sb) logits
        vis = visible[..., lo:hi, :end]
        keep = select_keys(cim, q[:, :, lo:hi], k[:, :, :end], exact, vis, scaling, ranges, received)  # (B, H, Tb, Sb)
        if keep.dtype != torch.bool:  # learning thresholds: the soft mask weighs each key's softmax term
            logits = torch.where(vis, exact + keep.clamp_min(torch.finfo(dtype).tiny).log(), float("-inf"))
            soft = (keep * vis).sum()
            keep = keep > 0.5
            cim.soft_kept.append((soft + ((keep & vis).sum() - soft).detach(), vis.expand_as(keep).sum()))  # hard count, soft gradient
        elif not kernel:
            logits = torch.where(keep, exact, float("-inf"))
        if cim.telemetry is not None:
            cim.telemetry.record(cim, keep, vis)
        if kernel:  # visits only the key blocks that hold kept keys
            outs.append(sparse_kernel.sparse_attention(query[:, :, lo:hi], key[:, :, :end], value[:, :, :end], keep, scaling).to(dtype))
            continue
        probs = torch.softmax(logits, dim=-1)
        if not keep.any(-1).all():  # a query that keeps no key (padding) attends to nothing
            probs = probs.nan_to_num(0.0)
        outs.append(torch.matmul(probs, v_all[:, :, :end]))  # (B, H, Tb, D)
    out = torch.cat(outs, dim=2).to(query.dtype)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def select_keys(
    cim: PruneRecomputeParams,
    q: torch.Tensor,
    k: torch.Tensor,
    exact: torch.Tensor | None,
    visible: torch.Tensor,
    scaling: float,
    ranges: tuple[torch.Tensor, torch.Tensor],
    received: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean (B, H, T, S) mask of the keys each query fetches: scorer, then rule, always-kept tokens included.

    While thresholds are learned (`cim.soft_temperature` set, threshold rules)
    it is instead a soft mask in [0, 1], differentiable in the thresholds.

    q (B, H, T, D) are the last T positions of k (B, Hkv, S, D); exact (B, H, T, S)
    the exact logits (may be None unless the scorer is in EXACT_SCORERS);
    visible (B or 1, 1, T, S); ranges the query-DAC (H,) and
    key (Hkv,) full scales; received (B, H, ≥S), h2o only: the attention each
    key received from the queries before q, updated in place.
    """
    cfg = cim.config
    sel = cfg.selection
    age = _age(q, k)  # (T, S)
    always = (age == 0) & sel.current | (age > 0) & (age <= sel.recent_tokens)
    always = (always | (torch.arange(k.shape[-2], device=k.device) < sel.sink_tokens))[None, None] & visible  # (B or 1, 1, T, S)
    scores, forced, offset = _score(cim, q, k, exact, visible, scaling, ranges, received)
    if sel.rule in ("keep_rate", "top_k") and cfg.scorer.kind == "quest":  # pages ranked by bound, the query's own first
        ranked = torch.where(visible, torch.where(forced, float("inf"), scores), float("-inf"))
        return _top_pages(ranked, always, _budget(sel, visible), cfg.scorer.page_tokens) & visible
    if forced is not None:
        always = always | forced & visible
    if cfg.scorer.kind == "h2o":
        always = always | (age[None, None] < (_budget(sel, visible) * H2O_RECENT_SHARE).long()) & visible
    # one small (B or 1, 1, T, S) bias puts always-kept keys first and hidden keys last in a single pass
    bias = torch.where(visible, torch.where(always, float("inf"), 0.0), float("-inf")).to(scores.dtype)
    if sel.rule in ("keep_rate", "top_k"):
        return _top_budget(scores + bias, always, _budget(sel, visible))
    reference = _reference(scores + bias.clamp_max(0), sel.rule)  # (B, H, T, 1) or None
    seen = scores if offset is None else scores + offset  # what the comparator compares
    if cim.calibrate_to is not None and sel.threshold is None:  # a preset's fixed threshold stays
        _calibrate_threshold(cim, seen, reference, visible, always, cim.calibrate_to)
    threshold = cim.threshold.to(scores)[None, :, None, None]  # (1, H, 1, 1)
    if cim.soft_temperature is not None:  # a differentiable comparator (always-kept: 1, hidden: 0)
        reference = reference - threshold if reference is not None else threshold
        return soft_comparator(seen + bias, reference, cim.soft_temperature)
    if reference is not None:  # not calibrated (NaN): an infinite margin, nothing pruned
        return (seen + bias >= reference - threshold.nan_to_num(math.inf)) & visible
    return comparator(scores + bias, threshold.nan_to_num(-math.inf), offset)  # not calibrated: nothing pruned


def _reference(scores: torch.Tensor, rule: str) -> torch.Tensor | None:
    """The score a margin rule's threshold is measured from, per query: the row maximum (relative) or the row's
    log-sum-exp (probability: score − it is the key's log softmax weight under the scorer); None for other rules.
    `scores` has hidden keys at −inf."""
    if rule == "relative":
        return scores.amax(-1, keepdim=True)
    if rule == "probability":
        return torch.logsumexp(scores, dim=-1, keepdim=True)
    return None


def _budget(sel, visible: torch.Tensor) -> torch.Tensor:
    """(B or 1, 1, T, 1) keys each query may keep under a keep_rate or top_k rule."""
    n_visible = visible.sum(-1, keepdim=True)
    if sel.rule == "keep_rate":
        return torch.ceil(sel.keep_rate * n_visible - 1e-9).long()
    return n_visible.clamp_max(sel.top_k)


def _score(cim: PruneRecomputeParams, q, k, exact, visible, scaling, ranges, received):
    """(scores (B, H, T, S) in logits, keys forced in or None, comparator offsets or None) of the configured scorer."""
    cfg = cim.config.scorer
    groups = q.shape[1] // k.shape[1]
    q_pos, k_pos = positions(q, k)
    if cfg.kind in ANALOG_SCORERS:
        scores, full_scale = analog_scores(q, k, cfg, *ranges, layer_idx=cim.layer_idx, q_pos=q_pos, k_pos=k_pos)
        offset = comparator_offsets(cfg, full_scale * scaling, layer_idx=cim.layer_idx, k_pos=k_pos, kv_groups=groups)
        return scores * scaling, None, offset
    if cfg.kind == "exact":
        return exact, None, None
    if cfg.kind == "quest":
        return quest_bounds(q, k, cfg.page_tokens, scaling)
    if cfg.kind == "h2o":
        s = k.shape[-2]
        probs = torch.softmax(exact.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        scores = received[..., None, :s] + probs.cumsum(dim=-2) - probs  # attention each key got from earlier queries
        received[..., :s] += probs.sum(dim=-2)
        return scores, None, None
    b, h = q.shape[:2]
    index = (torch.arange(b)[:, None, None, None], torch.arange(h)[:, None, None], q_pos[:, None].cpu(), k_pos.cpu())
    return hashed_uniform(cfg.seed, RANDOM_STREAM, cim.layer_idx, *index).to(q.device, q.dtype), None, None


def quest_bounds(q: torch.Tensor, k: torch.Tensor, page: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Quest's criticality: per page of `page` keys, the upper bound Σ_d max(q_d·min_d, q_d·max_d) of q·k.

    Every key gets its page's bound; the query's own page (the one still
    filling while decoding) is always kept, so every bound used covers only
    earlier keys.  Returns (scores (B, H, T, S), forced (1, 1, T, S), None).
    """
    b, hkv, s, d = k.shape
    groups = q.shape[1] // hkv
    pages = -(-s // page)
    pad = pages * page - s
    paged = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, hkv, pages, page, d)  # (B, Hkv, P, page, D)
    filled = (torch.arange(pages * page, device=k.device) < s).view(1, 1, pages, page, 1)
    k_max = expand_kv(paged.masked_fill(~filled, float("-inf")).amax(-2), groups)  # (B, H, P, D)
    k_min = expand_kv(paged.masked_fill(~filled, float("inf")).amin(-2), groups)
    bound = (q.clamp_min(0) @ k_max.transpose(-1, -2) + q.clamp_max(0) @ k_min.transpose(-1, -2)) * scaling  # (B, H, T, P)
    scores = bound.repeat_interleave(page, dim=-1)[..., :s]  # (B, H, T, S)
    q_pos, k_pos = positions(q, k)
    forced = (k_pos[None, :] // page == q_pos[:, None] // page)[None, None]  # (1, 1, T, S)
    return scores, forced, None


def _top_budget(ranked: torch.Tensor, always: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Keep, per query, its `budget` highest keys of `ranked` (always-kept at +inf, hidden at −inf); always-kept stay.

    budget (B or 1, 1, T, 1) never exceeds a row's visible keys, so no hidden key is picked.
    """
    most = max(1, min(int(budget.max()), ranked.shape[-1]))
    top = ranked.topk(most, dim=-1, sorted=True).indices  # (B, H, T, most)
    take = (torch.arange(most, device=ranked.device) < budget).expand_as(top)  # (B, H, T, most)
    keep = torch.zeros(ranked.shape, dtype=torch.bool, device=ranked.device).scatter_(-1, top, take)
    return keep | always


def _top_pages(ranked: torch.Tensor, always: torch.Tensor, budget: torch.Tensor, page: int) -> torch.Tensor:
    """Quest keeps whole pages: the round(budget / page) best pages per query (its own page first, at +inf).

    ranked (B, H, T, S) holds each key's page bound (hidden keys −inf, the
    query's own page +inf); always-kept keys are added, not ranked, so they
    cannot tie with the own page.
    """
    b, h, t, s = ranked.shape
    pages = -(-s // page)
    per_page = torch.nn.functional.pad(ranked, (0, pages * page - s), value=float("-inf")).view(b, h, t, pages, page).amax(-1)
    wanted = torch.round(budget.float() / page).long().clamp_min(1)  # (B or 1, 1, T, 1)
    keep_pages = _top_budget(per_page, torch.zeros((), dtype=torch.bool), wanted.clamp_max(pages))  # (B, H, T, P)
    return keep_pages.repeat_interleave(page, dim=-1)[..., :s] | always


def _age(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    q_pos, k_pos = positions(q, k)
    return q_pos[:, None] - k_pos[None, :]  # (T, S)


def _range(stored: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The calibrated full scale per head, or (not calibrated) this call's own max |x| per head of x (B, heads, L, D)."""
    if not stored.isnan().any():
        return stored
    return x.detach().abs().amax(dim=(0, 2, 3)).clamp_min(torch.finfo(x.dtype).tiny)


@torch.no_grad()
def _calibrate_ranges(cim: PruneRecomputeParams, q: torch.Tensor, k: torch.Tensor) -> None:
    cim.q_full_scale.copy_(q.abs().amax(dim=(0, 2, 3)).clamp_min(torch.finfo(q.dtype).tiny))
    cim.k_full_scale.copy_(k.abs().amax(dim=(0, 2, 3)).clamp_min(torch.finfo(k.dtype).tiny))


@torch.no_grad()
def _calibrate_threshold(cim, seen, reference, visible, always, target: float) -> None:
    """Set each head's threshold (or the layer's, shared by its heads) so that, on these inputs, `target` of the visible keys are kept.

    Always-kept keys count toward the target; the rest of it is filled by the
    highest comparator inputs: the threshold is the matching order statistic.
    """
    candidates = (visible & ~always).expand_as(seen)
    n_visible = visible.expand_as(seen).sum(dim=(0, 2, 3)).double()  # (H,)
    n_always = (always & visible).expand_as(seen).sum(dim=(0, 2, 3)).double()
    if reference is not None:
        seen = reference.expand_as(seen) - seen  # margins below the row's reference (maximum or log-sum-exp)
    groups = [slice(h, h + 1) for h in range(seen.shape[1])]
    if cim.config.selection.calibrate_per == "layer":  # one order statistic over all heads' candidates
        groups = [slice(None)]
    for heads in groups:
        values = seen[:, heads][candidates[:, heads]]
        wanted = round(float(target * n_visible[heads].sum() - n_always[heads].sum()))
        n = values.numel()
        if wanted <= 0 or n == 0:
            cim.threshold[heads] = -math.inf if reference is not None else math.inf
        elif wanted >= n:
            cim.threshold[heads] = math.inf if reference is not None else -math.inf
        elif reference is not None:  # keep margins ≤ the wanted-th smallest
            cim.threshold[heads] = values.kthvalue(wanted).values
        else:  # keep inputs > the (n − wanted)-th smallest
            cim.threshold[heads] = values.kthvalue(n - wanted).values


def _params_of(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> PruneRecomputeParams:
    cim = getattr(module, "cim", None)
    if not isinstance(cim, PruneRecomputeParams):
        raise CimattnError(
            f"{type(module).__name__} has no prune-and-recompute parameters: convert the model with "
            "cimattn.models.convert(model, hw) before using the 'cimattn_prune_recompute' attention"
        )
    h, hkv = query.shape[1], key.shape[1]
    if (h, hkv) != (cim.n_heads, cim.n_kv_heads):
        raise CimattnError(
            f"attention shapes (heads {h}, KV heads {hkv}) do not match the converted layer "
            f"({cim.n_heads}, {cim.n_kv_heads}); convert the model again"
        )
    return cim


# ---------------------------------------------------------------- telemetry
@dataclass
class LayerCounts:
    """Counts of one layer, summed over the calls recorded: per query head (H,) or per KV head (Hkv,)."""

    queries: int = 0  # query tokens with at least one visible key
    visible: torch.Tensor | None = None  # (H,) visible (query, key) pairs
    kept: torch.Tensor | None = None  # (H,) kept pairs
    kv_visible: torch.Tensor | None = None  # (Hkv,) visible pairs
    kv_kept: torch.Tensor | None = None  # (Hkv,) pairs whose key any query head of the group keeps
    fetched: torch.Tensor | None = None  # (Hkv,) tokens fetched from memory (not in the buffer)
    new: torch.Tensor | None = None  # (Hkv,) tokens the previous query did not keep (an unbounded buffer's fetches)
    bytes_per_token: float = 0.0  # K + V bytes of one token of one KV head
    buffer_tokens: int = 0

    def add(self, **counts) -> None:
        for name, value in counts.items():
            old = getattr(self, name)
            setattr(self, name, value if old is None else old + value)


@dataclass
class PruneTelemetry:
    """What prune-and-recompute layers did while it was attached; `summary()` is what the cost model reads.

    Buffer model (SPRINT): each KV head's queries are processed in order; the
    K/V fetched for one query stay in the on-chip buffer, which holds
    `buffer_tokens` tokens (the latest-position ones when more were kept).
    A key the next query keeps and the buffer still holds is not fetched
    again.  With GQA a KV head fetches the union of its query heads' keys.
    """

    layers: dict[int, LayerCounts] = field(default_factory=dict)
    context: int = 0  # longest key sequence seen, tokens
    last_kept: dict[int, torch.Tensor] = field(default_factory=dict)  # decode state: (B, Hkv, S) keys of the last query

    @torch.no_grad()
    def record(self, cim: PruneRecomputeParams, keep: torch.Tensor, visible: torch.Tensor) -> None:
        b, h, t, s = keep.shape
        hkv = cim.n_kv_heads
        visible = visible.expand(b, 1, t, s)
        kv_keep = keep.view(b, hkv, h // hkv, t, s).any(dim=2)  # (B, Hkv, T, S)
        previous = self.last_kept.get(cim.layer_idx) if t < s else None  # a prefill from token 0 starts empty
        if previous is not None and previous.shape != (b, hkv, s - t):
            previous = None
        capacity = cim.buffer_tokens if cim.config.buffer.reuse else 0
        fetched = buffer_fetches(kv_keep, capacity, previous)  # (B, Hkv, T)
        new = buffer_fetches(kv_keep, s, previous)
        self.last_kept[cim.layer_idx] = kv_keep[:, :, -1].clone()
        n_visible = visible.sum(-1)  # (B, 1, T)
        counts = self.layers.setdefault(cim.layer_idx, LayerCounts())
        counts.bytes_per_token, counts.buffer_tokens = cim.bytes_per_token, cim.buffer_tokens
        counts.add(
            queries=int((n_visible > 0).sum()),
            visible=torch.full((h,), float(n_visible.sum()), dtype=torch.float64),
            kept=keep.sum(dim=(0, 2, 3)).double().cpu(),
            kv_visible=torch.full((hkv,), float(n_visible.sum()), dtype=torch.float64),
            kv_kept=kv_keep.sum(dim=(0, 2, 3)).double().cpu(),
            fetched=fetched.sum(dim=(0, 2)).double().cpu(),
            new=new.sum(dim=(0, 2)).double().cpu(),
        )
        self.context = max(self.context, s)

    def summary(self) -> dict:
        """keep_rate, refetch_fraction, fetched_bytes_per_query, context (the cost model's keys), and per layer.

        keep_rate: kept / visible (query, key) pairs over all layers and heads.
        refetch_fraction: tokens fetched per query per KV head / visible keys,
        with the configured buffer; adjacent_new_fraction: the same with an
        unbounded buffer, i.e. keys a query keeps that the previous one did
        not (SPRINT: ~2.1 % of the sequence length between adjacent queries).
        fetched_tokens_per_query, fetched_bytes_per_query: K/V tokens and bytes
        fetched from memory per query token, summed over layers and KV heads.
        """
        if not self.layers:
            return {}
        def total(name: str) -> float:
            return sum(float(getattr(c, name).sum()) for c in self.layers.values())

        tokens = sum(float(c.fetched.sum()) / max(c.queries, 1) for c in self.layers.values())
        bytes_ = sum(float(c.fetched.sum()) * c.bytes_per_token / max(c.queries, 1) for c in self.layers.values())
        return {
            "keep_rate": total("kept") / max(total("visible"), 1.0),
            "refetch_fraction": total("fetched") / max(total("kv_visible"), 1.0),
            "adjacent_new_fraction": total("new") / max(total("kv_visible"), 1.0),
            "fetched_tokens_per_query": tokens,
            "fetched_bytes_per_query": bytes_,
            "context": self.context,
            "buffer_tokens": next(iter(self.layers.values())).buffer_tokens,
            "per_layer": {
                str(layer): {
                    "keep_rate": (c.kept / c.visible.clamp_min(1)).tolist(),
                    "refetch_fraction": (c.fetched / c.kv_visible.clamp_min(1)).tolist(),
                    "fetched_tokens_per_query": (c.fetched / max(c.queries, 1)).tolist(),
                }
                for layer, c in sorted(self.layers.items())
            },
        }


def buffer_fetches(kept: torch.Tensor, capacity: int, previous: torch.Tensor | None = None) -> torch.Tensor:
    """(…, T) tokens each query fetches: kept (…, T, S) in query order; previous (…, S − T'): the last query before.

    The buffer holds the previous query's kept keys, the `capacity` latest
    ones when more were kept; keys it holds are not fetched again.
    """
    s = kept.shape[-1]
    first = torch.zeros_like(kept[..., :1, :]) if previous is None else torch.nn.functional.pad(previous, (0, s - previous.shape[-1]))[..., None, :]
    prev = torch.cat([first, kept[..., :-1, :]], dim=-2)  # (…, T, S) the keys of the query before each
    if capacity >= s:  # room for every key: the previous query's whole set
        return (kept & ~prev).sum(-1)
    rank = prev.cumsum(-1, dtype=torch.int32)  # 1 for the first kept key of a row, …
    buffered = prev & (rank > rank[..., -1:] - capacity)  # the latest `capacity` kept keys
    return (kept & ~buffered).sum(-1)


@contextmanager
def collect_telemetry(model: nn.Module) -> Iterator[PruneTelemetry]:
    """Attach one PruneTelemetry to every prune-and-recompute layer of `model` for the block."""
    layers = [m for m in model.modules() if isinstance(m, PruneRecomputeParams)]
    if not layers:
        raise CimattnError("the model has no prune-and-recompute layers: convert it with a prune_recompute preset first")
    telemetry = PruneTelemetry()
    for cim in layers:
        cim.telemetry = telemetry
    try:
        yield telemetry
    finally:
        for cim in layers:
            cim.telemetry = None


def prune_layers(model: nn.Module) -> list[PruneRecomputeParams]:
    """Every PruneRecomputeParams of `model`, by layer index."""
    return sorted((m for m in model.modules() if isinstance(m, PruneRecomputeParams)), key=lambda c: c.layer_idx)


__all__ = [
    "LayerCounts", "PruneRecomputeParams", "PruneTelemetry", "buffer_fetches", "collect_telemetry",
    "prune_layers", "prune_recompute_attention", "quest_bounds", "select_keys",
]
