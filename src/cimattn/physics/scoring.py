"""Approximate Q·Kᵀ scorers of prune-and-recompute attention: SPRINT's ReRAM MSB crossbar, HyAtt's charge CIM.

Both compute, per query and stored key, an analog dot product of a
low-precision query with the key's most significant bits, and a comparator
(or an ADC) decides from it which keys are fetched and recomputed exactly
(shared/PAPERS.md §2–3).  The chain, each step ideal when its field is null
or zero:

1. query DAC: q → signed symmetric grid of 2^(query_bits−1) − 1 levels per
   sign over ±q_full_scale;
2. keys: k → key_bits signed fixed point over ±k_full_scale, then only the
   top key_msb_bits are kept: code c → floor(c / 2^(key_bits − msb)) + ½, the
   centre of the truncated bin (a symmetric set of 2^msb values: 16
   conductances for 4 MSBs, SPRINT's 4-bit multi-level cell);
3. ReRAM only: the stored value is programmed onto `conductance_levels`
   evenly spaced conductances over its range;
4. every stored cell carries a static multiplicative gain error
   1 + variation_std·N(0, 1) (conductance spread, capacitor mismatch);
5. the column sums Σ_d q_d·k_d·gain (a crossbar current, or charge shared on
   a line: the same up to a constant), plus read noise of read_noise_std ×
   the column's full scale D·q_max·k_max;
6. an optional ADC (output_bits) over ±full scale, then a comparator whose
   static input offset is comparator_offset_std × full scale.

Scores are returned in q·k units (multiply by the model's `scaling` for
logits), so the ideal scorer returns q·kᵀ exactly.

Randomness is counter-based: each draw is a hash (splitmix64) of the seed
and the draw's coordinates (layer, head, position, …), not a generator
stream.  A stored key's cells then keep their errors however the sequence
is cut into calls, and decoding token by token sees the very numbers a
prefill sees — no per-position state to store.  Rounding uses straight-
through gradients, so the chain is differentiable where it is not flat.
"""

from __future__ import annotations

import math

import torch

from cimattn.config.schema import Scorer

# splitmix64 constants (Steele, Lea & Flood 2014), as signed int64
_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15
_MIX1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
_MIX2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB
_TWO_53 = float(1 << 53)
_FOLD = 0x100000001B3  # the 64-bit FNV prime: odd, so folding a coordinate in is a bijection of the counter

# independent draws from one seed
VARIATION_STREAM, READ_STREAM, OFFSET_STREAM, RANDOM_STREAM = 11, 12, 13, 14


def _srl(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def _splitmix(z: torch.Tensor) -> torch.Tensor:
    z = z + _GOLDEN  # int64 arithmetic wraps, as the hash wants
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def hashed_uniform(seed: int, *indices: torch.Tensor | int) -> torch.Tensor:
    """Uniform (0, 1) float64, a pure function of the seed and the broadcast integer coordinates.

    The coordinates are folded into one 64-bit counter (a polynomial in an odd
    multiplier, 2 integer ops each) and the counter goes through splitmix64
    once: cheap enough for one draw per (query, key) pair.
    """
    z = torch.tensor(_splitmix(torch.tensor(seed, dtype=torch.int64)).item(), dtype=torch.int64)
    for index in indices:
        index = torch.as_tensor(index, dtype=torch.int64)
        z = z.to(index.device) * _FOLD + index
    return (_srl(_splitmix(z), 11).double() + 0.5) / _TWO_53


def hashed_normal(seed: int, *indices: torch.Tensor | int) -> torch.Tensor:
    """Standard normal float64 per coordinate (Box–Muller on two hashed uniforms)."""
    u1 = hashed_uniform(seed, *indices, 0)
    u2 = hashed_uniform(seed, *indices, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach() if x.requires_grad else x.round()


def _floor_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.floor() - x).detach() if x.requires_grad else x.floor()


def quantize_symmetric(x: torch.Tensor, full_scale: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Clamp to ±full_scale and round to the signed grid of 2^(bits−1) − 1 steps per sign; bits None = identity."""
    if bits is None:
        return x
    top = (1 << (bits - 1)) - 1
    step = full_scale / top
    return _round_ste(torch.maximum(torch.minimum(x, full_scale), -full_scale) / step) * step


def truncate_msb(
    k: torch.Tensor, full_scale: torch.Tensor, key_bits: int | None, msb_bits: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored value, largest stored magnitude) of keys held as key_bits fixed point of which msb_bits are read.

    key_bits None: the keys as they are, their range `full_scale`.

    The truncated value is the centre of its bin, so the stored set is
    symmetric: 4 MSBs of an 8-bit key give (c + ½)·16·step, c ∈ −8…7.
    """
    if key_bits is None:
        return k, full_scale.expand_as(k[..., :1, :1])
    top = (1 << (key_bits - 1)) - 1
    step = full_scale / top
    codes = _round_ste(torch.maximum(torch.minimum(k, full_scale), -full_scale) / step)  # −top … top
    if msb_bits is None or msb_bits == key_bits:
        return codes * step, full_scale.expand_as(k[..., :1, :1])
    shift = float(1 << (key_bits - msb_bits))
    stored = (_floor_ste(codes / shift) + 0.5) * shift * step
    return stored, ((1 << (msb_bits - 1)) - 0.5) * shift * step.expand_as(k[..., :1, :1])


def program_levels(x: torch.Tensor, x_max: torch.Tensor, levels: int | None) -> torch.Tensor:
    """Program values in [−x_max, x_max] onto `levels` evenly spaced conductances spanning that range."""
    if levels is None:
        return x
    span = 2 * x_max.clamp_min(torch.finfo(x.dtype).tiny)
    return _round_ste((x + x_max) / span * (levels - 1)) / (levels - 1) * span - x_max


def adc(x: torch.Tensor, full_scale: torch.Tensor, bits: int | None) -> torch.Tensor:
    """A `bits`-bit converter over ±full_scale: 2^bits levels from −full_scale to +full_scale."""
    if bits is None:
        return x
    return program_levels(torch.maximum(torch.minimum(x, full_scale), -full_scale), full_scale, 1 << bits)


def comparator(x: torch.Tensor, reference: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """1-bit comparator: True where x (+ the comparator's input offset) exceeds the reference."""
    return (x if offset is None else x + offset) > reference


def soft_comparator(x: torch.Tensor, reference: torch.Tensor, temperature: float) -> torch.Tensor:
    """A differentiable comparator, sigmoid((x − reference) / temperature): the soft mask of learned thresholds."""
    return torch.sigmoid((x - reference) / temperature)


def analog_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: Scorer,
    q_full_scale: torch.Tensor,
    k_full_scale: torch.Tensor,
    *,
    layer_idx: int = 0,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, full scale) of the analog scorer `cfg` (reram or charge): q·kᵀ as the array reads it.

    q (B, H, T, D); k (B, Hkv, S, D); q_full_scale (H,), k_full_scale (Hkv,)
    the DAC and key ranges; q_pos (T,), k_pos (S,) the absolute positions
    that index the noise (default 0…).  Returns scores (B, H, T, S) and each
    head's column full scale D·q_max·k_max, shaped (1, H, 1, 1), in q·k units.
    """
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    groups = h // hkv
    q_pos = torch.arange(s - t, s, device=q.device) if q_pos is None else q_pos
    k_pos = torch.arange(s, device=q.device) if k_pos is None else k_pos
    q_fs = q_full_scale.to(q)[None, :, None, None]  # (1, H, 1, 1)
    k_fs = k_full_scale.to(k)[None, :, None, None]  # (1, Hkv, 1, 1)
    q_hat = quantize_symmetric(q, q_fs, cfg.query_bits)
    k_hat, k_max = truncate_msb(k, k_fs, cfg.key_bits, cfg.key_msb_bits)
    if cfg.kind == "reram":
        k_hat = program_levels(k_hat, k_max, cfg.conductance_levels)
    if cfg.variation_std:
        heads = torch.arange(hkv, device=k.device)[:, None, None]
        cells = hashed_normal(cfg.seed, VARIATION_STREAM, layer_idx, heads, k_pos[None, :, None], torch.arange(d, device=k.device))
        k_hat = k_hat * (1 + cfg.variation_std * cells.to(k.dtype))  # (B, Hkv, S, D): the key's cells, wherever it is read
    qg = q_hat.reshape(b, hkv, groups * t, d)  # (B, Hkv, G·T, D): a group's query heads drive the same array
    scores = torch.matmul(qg, k_hat.transpose(-1, -2)).reshape(b, h, t, s)  # (B, H, T, S)
    full_scale = d * q_fs * expand_heads(k_max.amax(dim=0, keepdim=True), groups)  # (1, H, 1, 1): the ranges, not the data
    if cfg.read_noise_std:
        idx = (
            torch.arange(b, device=q.device)[:, None, None, None], torch.arange(h, device=q.device)[:, None, None],
            q_pos[:, None], k_pos,
        )
        scores = scores + cfg.read_noise_std * full_scale * hashed_normal(cfg.seed, READ_STREAM, layer_idx, *idx).to(scores.dtype)
    return adc(scores, full_scale, cfg.output_bits), full_scale


def comparator_offsets(cfg: Scorer, full_scale: torch.Tensor, *, layer_idx: int, k_pos: torch.Tensor, kv_groups: int) -> torch.Tensor | None:
    """(1, H, 1, S) static input offsets of the comparators, one per key column (shared by a KV group's queries)."""
    if not cfg.comparator_offset_std:
        return None
    hkv = full_scale.shape[1] // kv_groups
    heads = torch.arange(hkv, device=k_pos.device)[:, None]
    offsets = hashed_normal(cfg.seed, OFFSET_STREAM, layer_idx, heads, k_pos).to(full_scale.dtype)  # (Hkv, S)
    return cfg.comparator_offset_std * full_scale * expand_heads(offsets[None, :, None], kv_groups)


def expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(…, Hkv, …) at dim 1 → (…, Hkv·groups, …): each KV head's value for its query heads."""
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


__all__ = [
    "adc", "analog_scores", "comparator", "comparator_offsets", "expand_heads", "hashed_normal", "hashed_uniform",
    "program_levels", "quantize_symmetric", "soft_comparator", "truncate_msb",
]
