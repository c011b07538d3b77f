"""Token-by-token decode on a persistent model of the gain-cell arrays: the hardware state beside transformers' cache.

The torch path (`gaincell._attend_block`) derives every stored cell's operand
from the K/V it is handed, so one decode query re-quantises and re-expands
the whole window each token: about 25 passes over W·D per layer, which made
decode 30–80× slower than SDPA.  The chip writes a token once, into its ring
slot, and every later query reads it.  `ArrayState` models exactly that, per
layer: for each batch row and ring slot the cache index of the token it
holds, the raw k/v row that was written (so a step can check that
transformers' cache still holds the same token — a cropped, rewound or
edited cache rewrites the slot), and the stored operand of every polynomial
term, c_i · u^i · dk^i (· gain) (`physics.stored_terms`), whose leakage
factor dk = exp(rate · (index − anchor)) is taken against a fixed anchor.  A
step writes only the slots whose token changed (one per generated token),
then reads the slots in use (all W once the ring is full) with the query's
factor exp(−rate · (t − anchor)):
the arithmetic of the torch path — scores, HardSigmoid, per-tile read-out,
digital sum — in another summation order (agreement to rounding, ~1e-6 of
full scale in fp32).  The state is rebuilt when the anchor would let a
factor overflow (`physics.max_query_block`, ~125k tokens at the paper's
leakage) or when anything it was built from changes (the k/v scalers,
chip gains, cell, physics, ring offsets, batch, dtype, device).

Read noise is drawn per slot (all W) here and per visible key on the torch
path: the same distribution and seed stream, other numbers; a decode is
still reproducible from its seed.  Memory: the raw rows (twice) and the
terms, 2 · W · (2 + n_terms) · D values per KV head and batch row — O(window),
~8 MB per layer for SmolLM2 at W = 1,024 in fp32 (5× its KV cache at 1k
tokens); a call that is not a decode step frees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cimattn.attention.common import all_finite
from cimattn.config.schema import GainCell
from cimattn.errors import CimattnError
from cimattn.physics.gaincell import (
    cell_terms,
    divide_by_sum_column,
    hard_sigmoid,
    max_query_block,
    scores_from_terms,
    stored_terms,
    tile_readout,
    weighted_sum_from_terms,
    with_sum_column,
)
from cimattn.physics.quantize import quantize

WRITE_LOOP_MAX = 4  # up to this many slot writes go one by one (see `_write`)
# Below this many cached tokens the torch path is cheaper: it reads only the S tokens, while a step here costs
# ~100 small operations, half of them writing the new token (SmolLM2 shape, 2-core CPU: 2.1–2.6 vs 1.8–2.2 ms
# per call in `generate` at 9–38 tokens; equal at ~64; 2.1 vs 4.9 ms at 256–356).
MIN_CACHED_TOKENS = 128


@dataclass
class ArrayState:
    """What one layer's K and V arrays hold: per (batch row, ring slot), shapes (B, W) and (B, Hkv, W, ·)."""

    signature: tuple  # what the stored operands were derived from (`_signature`)
    config: GainCell  # a copy of the physics they were derived with
    anchor: int  # cache index t0 of the leakage factors
    index: torch.Tensor  # (B, W) cache index of the token in each slot, −1 empty
    raw_k: torch.Tensor  # (B, Hkv, 2W, D) the key row written there, before the scaler, at slot and slot + W
    raw_v: torch.Tensor  # (B, Hkv, 2W, D): so the window in cache order is one contiguous run
    k_terms: torch.Tensor  # (B, Hkv, n·D, W) stored operands of the K array, transposed (the scores' matmul reads it ~1.5× faster cold)
    v_terms: torch.Tensor  # (B, Hkv, W, n·C) of the V array (C = D, + 1 with the ΣA column)
    kv_gain: torch.Tensor  # (2, 1, Hkv, 1) the k and v scalers' gains, then shifts: a step writes both in one pass
    kv_shift: torch.Tensor


def decode_applies(cim, t: int, s: int) -> bool:
    """One query per sequence over at least MIN_CACHED_TOKENS, inference, no statistics asked: the step runs on the stored state."""
    return t == 1 and s >= MIN_CACHED_TOKENS and not torch.is_grad_enabled() and not cim.record_stats and cim.fit_targets is None


def decode_step(cim, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Attention of the last cached token: query (B, H, 1, D), key/value (B, Hkv, S, D) → (B, H, 1, D) before the output scaler.

    attention_mask as transformers passes it (None, or (B or 1, 1, 1, ≥ S),
    bool or additive); offsets (B,) as `gaincell._ring_offsets`; arithmetic in
    `dtype`.  Updates `cim.decode_state`.
    """
    cfg = cim.config
    w, tpa = cfg.window_tokens, cfg.tokens_per_array
    b, h, _, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    t = s - 1  # the query's cache index
    ring_offsets = offsets.tolist()
    state = _state_for(cim, key, ring_offsets, t, dtype)
    slots = torch.arange(w, device=key.device)
    need = t - ((t - offsets)[:, None] - slots[None, :]) % w  # (B, W) the token each slot holds for this query, < 0: none yet
    stale = (need >= 0) & (state.index != need)  # (B, W) slots to write
    if sum(_check_held(state, key, value, row, ring_offsets[row], t, stale[row], need[row]) for row in range(b)):
        _write(cim, state, stale, need, key, value, dtype)

    q = quantize(cim.scale("q", query.to(dtype)), cfg.q).view(b, hkv, h // hkv, d)  # (B, Hkv, G, D): a group drives one array
    rate = cfg.leakage.rate_per_token
    decay = None if rate == 0.0 else torch.full((1, 1), -rate * (t - state.anchor), dtype=dtype, device=q.device).exp_()
    has_k_gain, has_v_gain = cim.k_gain is not None, cim.v_gain is not None
    # until the ring is full only its first slots hold a visible token: read those tiles (L slots), not all W
    n_tiles = min(w // tpa, -(-(t - min(ring_offsets) + 1) // tpa))
    used = n_tiles * tpa
    need = need[:, :used]
    k_terms = state.k_terms[..., :used].transpose(-1, -2)  # (B, Hkv, L, n·D)
    scores = scores_from_terms(q, k_terms, cell_terms(cfg, cim.cell, has_k_gain), decay)  # (B, Hkv, G, L)
    visible = need >= 0  # (B, L): every stored token is in the window; the mask removes padding
    if attention_mask is not None:
        given = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        visible = visible & given[..., -1, -s:].reshape(-1, s).expand(b, -1).gather(-1, need.clamp_min(0))
    gen = cim.generator(q.device)
    offsets = cim.score_offsets(dtype)  # (Hkv, G, 1, 1) → (Hkv, G, 1) against the one query's (B, Hkv, G, L)
    a = hard_sigmoid(scores, cfg, visible[:, None, None], gen, None if offsets is None else offsets[..., 0])  # (B, Hkv, G, L)

    a_tiles = a.view(b, hkv, -1, n_tiles, tpa).transpose(2, 3)  # (B, Hkv, N, G, tpa)
    v_terms = state.v_terms[:, :, :used].view(b, hkv, n_tiles, tpa, -1)  # (B, Hkv, N, tpa, n·C)
    partial = weighted_sum_from_terms(a_tiles, v_terms, cell_terms(cfg, cim.cell, has_v_gain), decay)  # (B, Hkv, N, G, C)
    seen = visible.view(b, 1, n_tiles, 1, tpa).any(-1, keepdim=True).to(dtype)  # (B, 1, N, 1, 1) the tile holds a visible key
    out = tile_readout(partial, cfg, gen, active=seen).mul_(seen).sum(dim=2)  # (B, Hkv, G, C): tiles summed digitally
    if cfg.normalize:
        out = divide_by_sum_column(out)
    return out.reshape(b, h, 1, d)


def _signature(cim, key: torch.Tensor, ring_offsets: list[int], dtype: torch.dtype) -> tuple:
    tensors = [cim.scalers[n].a for n in ("k", "v")] + [cim.scalers[n].b for n in ("k", "v")]
    tensors += [g for g in (cim.k_gain, cim.v_gain) if g is not None]
    return (key.shape[0], key.shape[1], key.shape[3], key.dtype, key.device, dtype, cim.cell, tuple(ring_offsets),
            tuple((x.data_ptr(), x._version) for x in tensors))


def _state_for(cim, key: torch.Tensor, ring_offsets: list[int], t: int, dtype: torch.dtype) -> ArrayState:
    """The layer's state if it still describes this chip and call, else an empty one anchored at `t`."""
    cfg = cim.config
    signature = _signature(cim, key, ring_offsets, dtype)
    state: ArrayState | None = cim.decode_state
    limit = max_query_block(cfg)
    if (state is not None and state.signature == signature and state.config == cfg
            and state.anchor <= t and (limit is None or t - state.anchor <= limit)):
        return state
    b, hkv, _, d = key.shape
    w = cfg.window_tokens
    n_k = len(cell_terms(cfg, cim.cell, cim.k_gain is not None).powers)
    n_v = len(cell_terms(cfg, cim.cell, cim.v_gain is not None).powers)
    c = d + 1 if cfg.normalize else d
    dev = key.device
    state = ArrayState(
        signature=signature, config=cfg.model_copy(deep=True), anchor=t,
        index=torch.full((b, w), -1, dtype=torch.long, device=dev),
        raw_k=torch.zeros(b, hkv, 2 * w, d, dtype=key.dtype, device=dev), raw_v=torch.zeros(b, hkv, 2 * w, d, dtype=key.dtype, device=dev),
        k_terms=torch.zeros(b, hkv, n_k * d, w, dtype=dtype, device=dev), v_terms=torch.zeros(b, hkv, w, n_v * c, dtype=dtype, device=dev),
        kv_gain=torch.stack([cim.scalers[n].gain() for n in ("k", "v")]).to(dtype)[:, None, :, None],
        kv_shift=torch.stack([cim.scalers[n].b for n in ("k", "v")]).to(dtype)[:, None, :, None],
    )
    cim.decode_state = state
    return state


def _check_held(state: ArrayState, key: torch.Tensor, value: torch.Tensor, row: int, offset: int, t: int,
                stale: torch.Tensor, need: torch.Tensor) -> int:
    """Mark in `stale` (W,) every slot of batch row `row` whose stored raw k/v differs from the cache's token (in place).

    Returns how many slots of the row are stale (to write).

    In generation only the newest token's slot can be stale: the older ones
    are compared in one run (the window in cache order is the ring rotated,
    and each row is stored twice, at slot and slot + W) and the newest on its
    own (it may be a new token at the same index: a regenerated or rejected
    one); anything else (a first call, a rewound or edited cache) is compared
    slot by slot.
    """
    w = state.index.shape[1]
    lo = max(0, t - w + 1)
    newest = (t - offset) % w
    n_stale = int(stale.sum())
    if n_stale == 0 or (n_stale == 1 and bool(stale[newest])):
        first = (lo - offset) % w  # the slot of cache index lo
        pairs = ((key, state.raw_k), (value, state.raw_v))
        if all(_equal(x[row, :, lo:t], raw[row, :, first : first + t - lo]) for x, raw in pairs):
            if n_stale == 0 and not all(_equal(x[row, :, t], raw[row, :, newest]) for x, raw in pairs):
                stale[newest] = True
                return 1
            return n_stale
    held = need.clamp_min(0)
    differs = torch.zeros_like(stale)
    for x, raw in ((key, state.raw_k), (value, state.raw_v)):
        differs |= (x[row].index_select(1, held) - raw[row, :, :w]).abs().amax(dim=(0, 2)) != 0  # NaN differs too
    stale |= differs & (need >= 0)
    return int(stale.sum())


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Exact equality (NaN never equal); numpy's comparison runs ~4× faster than torch.equal on the CPU."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.float16):
        return bool(np.array_equal(x.numpy(), y.numpy()))
    return torch.equal(x, y)


def _write(cim, state: ArrayState, stale: torch.Tensor, need: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           dtype: torch.dtype) -> None:
    """Write the cache's tokens into the `stale` (B, W) slots: raw rows, then scaler → quantiser → stored operand of each term."""
    cfg = cim.config
    w = state.index.shape[1]
    rows, slots = stale.nonzero(as_tuple=True)  # (n,) batch row and ring slot of each write
    index = need[rows, slots]  # (n,) cache index of each token written
    k_new, v_new = key[rows, :, index], value[rows, :, index]  # (n, Hkv, D)
    kv = torch.stack([k_new, v_new]).to(dtype)  # (2, n, Hkv, D): both arrays' tokens through the same steps
    if not all_finite(kv):
        name = "key" if not all_finite(k_new) else "value"
        raise CimattnError(f"gain-cell attention (layer {cim.layer_idx}) received a non-finite {name} (NaN or Inf)")
    kv = torch.addcmul(state.kv_shift, kv, state.kv_gain)  # the k and v scalers
    kv = quantize(kv, cfg.k) if cfg.k == cfg.v else torch.stack([quantize(kv[0], cfg.k), quantize(kv[1], cfg.v)])
    rate = cfg.leakage.rate_per_token
    key_decay = None if rate == 0.0 else torch.exp(rate * (index - state.anchor).to(dtype))[:, None, None]  # (n, 1, 1)

    def gain(g: torch.Tensor | None) -> torch.Tensor | None:
        return None if g is None else g[:, slots].transpose(0, 1).to(dtype)  # (n, Hkv, ·): this cell's gain

    terms = cell_terms(cfg, cim.cell, cim.k_gain is not None)  # k and v gains are drawn together (or neither)
    if not cfg.normalize:  # same shapes: one pass for both arrays
        gains = None if cim.k_gain is None else torch.stack([gain(cim.k_gain), gain(cim.v_gain)])
        k_terms, v_terms = stored_terms(kv, cfg, terms, key_decay, gains)
    else:  # V holds the ΣA column too
        k_terms = stored_terms(kv[0], cfg, terms, key_decay, gain(cim.k_gain))
        v_terms = stored_terms(with_sum_column(kv[1], cfg), cfg, terms, key_decay, gain(cim.v_gain))
    if len(rows) <= WRITE_LOOP_MAX:  # a token per sequence (generation): plain slices copy faster than index_put
        for j, (r, sl, i) in enumerate(zip(rows.tolist(), slots.tolist(), index.tolist())):
            state.index[r, sl] = i
            for at in (sl, sl + w):
                state.raw_k[r, :, at], state.raw_v[r, :, at] = k_new[j], v_new[j]
            state.k_terms[r, :, :, sl], state.v_terms[r, :, sl] = k_terms[j], v_terms[j]
        return
    state.index[rows, slots] = index
    for at in (slots, slots + w):
        state.raw_k[rows, :, at], state.raw_v[rows, :, at] = k_new, v_new
    state.k_terms[rows, :, :, slots], state.v_terms[rows, :, slots] = k_terms, v_terms


__all__ = ["ArrayState", "decode_applies", "decode_step"]
