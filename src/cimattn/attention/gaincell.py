"""Gain-cell in-memory attention (Leroux et al., shared/PAPERS.md §1), registered as `cimattn_gaincell`.

Per layer and KV head the hardware holds a K and a V array of
`window_tokens` (W) stored tokens, split into tiles of `tokens_per_array`
tokens.  A token at position p lives in ring-buffer slot p mod W, tile
(p mod W) // tokens_per_array.  p is the model's position id (so a
left-padded sequence, whose position ids start at its first real token as
transformers' `generate` counts them, fills its arrays from slot 0 like the
unpadded one); without position ids, the cache index.  Leakage ages are
index differences, so they need no position ids.  For each query:

1. q, k, v pass their per-head scaler a·x + b (a kept positive), the clamp and
   the quantiser (the order of the paper: scaler → clamp → quantise);
2. the K array gives S[t, s] = Σ_d cell(q, k, decay) for the keys in the
   window (age = query position − key position < W; decay = exp(−rate·age));
3. the HardSigmoid gives A = clamp(score_scale·S + score_offset, 0, 1),
   masked keys 0 — no softmax, no 1/√d (the model's `scaling` is ignored);
   with `offset_per_doubling` (ours) the offset falls with the number of
   keys the query sees beyond `offset_reference_keys`; with `head_offsets`
   (ours) each query head adds a trainable offset of its own;
4. each V tile integrates Σ_s cell(A, v, decay) over its own keys and is read
   out *per tile*: × av_tile_scale, clamp, quantise (av_out); the tiles are
   then summed digitally and pass the output scaler.

Beyond the window a slot's token is overwritten, so keys of several laps can
share a tile; a query sees at most one of them per slot, and the per-tile
read-out groups keys by tile index, exactly.  A head dimension above
`head_dim_per_array` spans ceil(head_dim / head_dim_per_array) arrays whose
outputs are summed digitally: the score is then still the full dot product
(A is not quantised), and A·V columns are independent, so the arithmetic
does not change.  Dropout is not modelled (the hardware has none; the
paper trains with dropout 0).

Decoding one token over at least `gaincell_decode.MIN_CACHED_TOKENS`
cached tokens, without gradients, runs on `module.cim.decode_state`, a
model of what the arrays hold (`cimattn.attention.gaincell_decode`): the
new token is written into its ring slot and the stored operands are read,
instead of re-deriving the whole window from the cache every token.

Hardware parameters live in `module.cim`, a `GainCellParams` that
`cimattn.models.convert` attaches to each attention module.

Statistics for the initialization algorithm
-------------------------------------------
Set `module.cim.record_stats = True`; every forward then overwrites
`module.cim.stats`, a dict with keys "q", "k", "v", "out", each a
`Moments(mean, std)` of 1-D tensors over heads (query heads for q and out,
KV heads for k and v): the mean and (unbiased) std of a·x + b right after
that scaler, before the clamp, over batch, tokens and head dims (padding
tokens included; during decoding k and v cover the whole cache).  The
tensors are detached float32.  `cimattn.models.convert.recorded_stats`
and `hardware_stats` do the same for a whole model.

Non-idealities
--------------
Read noise (`noise.read_std`, a fraction of each read-out's full scale) is
fresh Gaussian noise per read: on the integrated score before the
HardSigmoid (full scale 1, the pulse range) and on each A·V tile read-out
before its ADC (full scale av_out.high − av_out.low), only for tiles that
hold a key the query sees.  It draws from `module.cim`'s own generator,
seeded from `noise.seed` and the layer index; `module.cim.reset_noise()`
restarts it.  Device variability (`noise.cell_variability_std`) is a
multiplicative gain 1 + σ·N(0, 1) per stored cell — KV head × ring slot ×
head dim, for the K and the V array — drawn once from `noise.seed` when the
parameters are built, and applied to that cell's charge.

`normalize: true` adds an all-ones V column (stored at v.high, the top
level): its per-tile read-outs, through the same cell, scale, clamp and
quantiser, sum to ≈ f(0.45)·ΣA, and the output is divided by that sum
digitally (0 where it reads 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cimattn import kernels
from cimattn.attention.common import all_finite, keep_mask, use_kernel
from cimattn.attention.gaincell_decode import ArrayState, decode_applies, decode_step
from cimattn.config.schema import GainCell, Scaler
from cimattn.errors import CimattnError
from cimattn.physics.gaincell import (
    Decay,
    cell_scores,
    cell_weighted_sum,
    divide_by_sum_column,
    hard_sigmoid,
    leakage_decay,
    max_query_block,
    tile_readout,
    variability_gain,
    with_sum_column,
)
from cimattn.physics.quantize import quantize

SCALERS = ("q", "k", "v", "out")
MIN_GAIN = 1e-6  # a is clamped to at least this: the scalers' gain stays positive (PAPERS.md §1)
SCORE_ELEMENTS_PER_BLOCK = 1 << 24  # queries are processed in blocks whose (B, H, T, S) scores stay below this
QUERY_BLOCK = 128  # and of at most this many queries: a block reads only the keys up to its last query (causal work ≈ half)
_VARIABILITY_STREAM, _READ_STREAM = 1, 2  # seed streams, so the chip and its reads draw independent numbers


class Moments(NamedTuple):
    """Per-head mean and std of a scaler's output (1-D tensors over heads)."""

    mean: torch.Tensor
    std: torch.Tensor


class HeadScaler(nn.Module):
    """Trainable per-head affine map x' = a·x + b on (B, heads, T, D) tensors, a kept ≥ MIN_GAIN."""

    def __init__(self, heads: int, init: Scaler):
        super().__init__()
        self.a = nn.Parameter(torch.full((heads,), float(init.a)))
        self.b = nn.Parameter(torch.full((heads,), float(init.b)))

    def gain(self) -> torch.Tensor:
        """The gain applied, a clamped to ≥ MIN_GAIN, (heads,)."""
        return self.a.clamp_min(MIN_GAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain().to(x.dtype)[:, None, None] * x + self.b.to(x.dtype)[:, None, None]


def derive_seed(seed: int, layer_idx: int, stream: int) -> int:
    """A per-layer, per-purpose seed from the preset's `noise.seed` (deterministic, no hashing)."""
    return (seed * 1_000_003 + layer_idx * 4_099 + stream) % (1 << 63)


class HeadOffset(nn.Module):
    """Trainable per-head HardSigmoid offsets b (`head_offsets`), (heads,), starting at 0."""

    def __init__(self, heads: int):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(heads))


class GainCellParams(nn.Module):
    """The hardware state of one attention layer: scalers, the chip's cell gains, the read-noise generator.

    config: the GainCell physics (shared by all layers of a model); `cell`
    starts as `config.cell` and can be switched per module ("linear" /
    "nonlinear") without touching the config.
    """

    def __init__(self, config: GainCell, n_heads: int, n_kv_heads: int, head_dim: int, layer_idx: int = 0):
        super().__init__()
        if n_heads % n_kv_heads:
            raise CimattnError(f"{n_heads} query heads cannot share {n_kv_heads} KV heads evenly")
        self.config = config
        self.n_heads, self.n_kv_heads, self.head_dim, self.layer_idx = n_heads, n_kv_heads, head_dim, layer_idx
        self.cell = config.cell
        heads = {"q": n_heads, "k": n_kv_heads, "v": n_kv_heads, "out": n_heads}
        inits = {"q": config.scaler_q, "k": config.scaler_k, "v": config.scaler_v, "out": config.scaler_out}
        self.scalers = nn.ModuleDict({name: HeadScaler(heads[name], inits[name]) for name in SCALERS})
        if config.head_offsets:  # trains, is saved and loaded with the scalers (`cim.scalers.score.b`)
            self.scalers["score"] = HeadOffset(n_heads)
        # device-to-device variability: one gain per stored cell (KV head, ring slot, head dim), drawn once
        chip = torch.Generator().manual_seed(derive_seed(config.noise.seed, layer_idx, _VARIABILITY_STREAM))
        v_columns = head_dim + 1 if config.normalize else head_dim  # + the all-ones ΣA column
        self.register_buffer("k_gain", variability_gain((n_kv_heads, config.window_tokens, head_dim), config, chip), persistent=False)
        self.register_buffer("v_gain", variability_gain((n_kv_heads, config.window_tokens, v_columns), config, chip), persistent=False)
        self.backend = "auto"  # where the arrays are simulated: common.BACKENDS (the fused Triton kernels or the torch path)
        # the kernels' tl.dot input precision: "ieee" (exact fp32, what the tests hold) or, on GPUs, "tf32x3" / "tf32"
        # (tensor cores; `cimattn bench` times tf32x3 beside ieee on CUDA, its accuracy is not validated yet)
        self.dot_precision = "ieee"
        self.record_stats = False
        self.fit_targets: dict[str, Moments] | None = None
        self.stats: dict[str, Moments] = {}
        self.decode_state: ArrayState | None = None  # what the arrays hold between decode steps (gaincell_decode)
        self._generators: dict[str, torch.Generator] = {}

    def scale(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Apply scaler `name` to (B, heads, T, D) `x`, recording its moments when asked.

        With `fit_targets` set ({scaler: Moments}), first solve a, b so that
        a·x + b has exactly the target mean and std per head.  Scalers run in
        the order q, k, v, out inside a layer and layers in model order, so
        one forward fits every scaler to inputs already shaped by the fitted
        scalers before it.
        """
        if self.fit_targets is not None and name in self.fit_targets:
            self._fit(name, x, self.fit_targets[name])
        y = self.scalers[name](x)
        if self.record_stats:
            with torch.no_grad():
                flat = y.detach().float().transpose(0, 1).reshape(y.shape[1], -1)  # (heads, B·T·D)
                self.stats[name] = Moments(flat.mean(dim=1), flat.std(dim=1))
        return y

    @torch.no_grad()
    def _fit(self, name: str, x: torch.Tensor, target: Moments) -> None:
        flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)  # (heads, B·T·D)
        mean, std = flat.mean(dim=1), flat.std(dim=1)
        scaler = self.scalers[name]
        a = (target.std.to(std) / std.clamp_min(1e-12)).clamp_min(MIN_GAIN)
        scaler.a.copy_(torch.where(std > 0, a, scaler.a))  # a constant input keeps its gain
        scaler.b.copy_(target.mean.to(mean) - scaler.a.clamp_min(MIN_GAIN) * mean)

    def head_offsets(self) -> torch.Tensor | None:
        """The per-head HardSigmoid offsets of `head_offsets`, (heads,); None without."""
        return self.scalers["score"].b if "score" in self.scalers else None

    def score_offsets(self, dtype: torch.dtype) -> torch.Tensor | None:
        """`head_offsets()` as (Hkv, G, 1, 1), against scores grouped (…, Hkv, G, T, S); None without."""
        offsets = self.head_offsets()
        return None if offsets is None else offsets.to(dtype).view(self.n_kv_heads, -1, 1, 1)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The read-noise generator on `device` (None when there is no read noise)."""
        if self.config.noise.read_std == 0.0:
            return None
        key = str(device)
        if key not in self._generators:
            seed = derive_seed(self.config.noise.seed, self.layer_idx, _READ_STREAM)
            self._generators[key] = torch.Generator(device=device).manual_seed(seed)
        return self._generators[key]

    def reset_noise(self) -> None:
        """Restart the read-noise sequence from the seed (same seed, same inputs → same outputs)."""
        self._generators.clear()

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, layer={self.layer_idx}, cell={self.cell}"


def gaincell_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, H, T, D), key/value (B, Hkv, S, D) → ((B, T, H, D), None).

    `scaling` and `dropout` are accepted and ignored (see the module docstring);
    `position_ids` (1 or B, T), when given, place each sequence in its ring buffer.
    """
    cim = _params_of(module)
    cfg = cim.config
    b, t, s = query.shape[0], query.shape[-2], key.shape[-2]
    stepping = decode_applies(cim, t, s)  # one new token: the arrays' stored state is read, only changed slots are written
    _check_inputs(query, key, value, cim, finite_kv=not stepping)  # the step checks the rows it writes
    offsets = _ring_offsets(position_ids, b, s, t, query.device)  # (B,) cache index − ring position
    if cfg.context_policy == "error" and s - int(offsets.min()) > cfg.window_tokens:
        raise CimattnError(
            f"context of {s - int(offsets.min())} tokens exceeds the gain-cell window of {cfg.window_tokens} tokens "
            "(context_policy: error); shorten the context or set gaincell.context_policy: sliding"
        )
    dtype = torch.promote_types(query.dtype, torch.float32)  # fp32 at least, fp64 when given
    if stepping:
        summed = decode_step(cim, query, key, value, attention_mask, offsets, dtype)
    else:
        cim.decode_state = None  # a new prompt (or training): what the arrays held is not read again, free it
        keep = keep_mask(attention_mask, query, key, cfg.window_tokens)  # (B or 1, 1, T, S)
        q = quantize(cim.scale("q", query.to(dtype)), cfg.q)  # (B, H, T, D) pulse widths
        k = quantize(cim.scale("k", key.to(dtype)), cfg.k)  # (B, Hkv, S, D) stored voltages
        v = quantize(cim.scale("v", value.to(dtype)), cfg.v)
        if use_kernel(cim.backend, q.is_cuda, lambda: kernels.unsupported(cfg, q, k, v, keep, cell=cim.cell, offsets=offsets)):
            summed = kernels.gaincell_prefill(q, k, v, cfg, cell=cim.cell, precision=cim.dot_precision,
                                              head_offsets=cim.head_offsets()).to(dtype)  # fused, fwd and bwd
        else:
            summed = _attend_blocks(cim, q, k, v, keep, offsets)
    out = cim.scale("out", summed)  # (B, H, T, D)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _attend_blocks(cim: GainCellParams, q, k, v, keep, offsets) -> torch.Tensor:
    """The torch path: queries in blocks (causal work only, bounded memory) → (B, H, T, D) before the output scaler."""
    cfg = cim.config
    b, h, t, _ = q.shape
    s = k.shape[-2]
    span = min(s, cfg.window_tokens + cfg.tokens_per_array + t)  # most keys a block of queries can see
    block = min(t, QUERY_BLOCK, max_query_block(cfg) or t, max(1, SCORE_ELEMENTS_PER_BLOCK // (b * h * span)))
    outs = [
        _attend_block(cim, q[:, :, lo : lo + block], k, v, keep[:, :, lo : lo + block], s - t + lo, offsets)
        for lo in range(0, t, block)
    ]
    return torch.cat(outs, dim=2)


def _params_of(module: nn.Module) -> GainCellParams:
    cim = getattr(module, "cim", None)
    if not isinstance(cim, GainCellParams):
        raise CimattnError(
            f"{type(module).__name__} has no gain-cell parameters: convert the model with "
            "cimattn.models.convert(model, hw) before using the 'cimattn_gaincell' attention"
        )
    return cim


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cim: GainCellParams, finite_kv: bool = True) -> None:
    for name, x in (("query", query), ("key", key), ("value", value))[: 3 if finite_kv else 1]:
        if not all_finite(x):
            raise CimattnError(f"gain-cell attention (layer {cim.layer_idx}) received a non-finite {name} (NaN or Inf)")
    h, hkv, d = query.shape[1], key.shape[1], query.shape[-1]
    if (h, hkv, d) != (cim.n_heads, cim.n_kv_heads, cim.head_dim):
        raise CimattnError(
            f"attention shapes (heads {h}, KV heads {hkv}, head dim {d}) do not match the converted layer "
            f"({cim.n_heads}, {cim.n_kv_heads}, {cim.head_dim}); convert the model again"
        )


def _ring_offsets(position_ids: torch.Tensor | None, b: int, s: int, t: int, device: torch.device) -> torch.Tensor:
    """(B,) offset o with ring position = cache index − o, from the model's position ids.

    A left-padded sequence's first real token has position 0 (as transformers'
    generate counts), so it lands in slot 0 like the unpadded sequence.  Without
    usable 2-D position ids the ring position is the cache index.
    """
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != t:
        return torch.zeros(b, dtype=torch.long, device=device)
    last = position_ids[:, -1].to(device=device, dtype=torch.long)  # (1 or B,): the last query is never padding
    return ((s - 1) - last).expand(b)


def _attend_block(
    cim: GainCellParams,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    q_start: int,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """Analog attention of a block of consecutive queries whose first one sits at cache index `q_start`.

    q (B, H, Tb, D) quantised pulses; k, v (B, Hkv, S, D) quantised stored
    voltages at cache indices 0..S−1; keep (B or 1, 1, Tb, S); offsets (B,)
    as from `_ring_offsets`.  Returns the digital sum of the tile read-outs,
    (B, H, Tb, D), before the output scaler.
    """
    cfg = cim.config
    w = cfg.window_tokens
    b, h, tb, d = q.shape
    hkv, groups = k.shape[1], h // k.shape[1]
    k_lo, k_hi = max(0, q_start - w + 1), q_start + tb  # only these keys are in some query's window
    k, v, keep = k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi], keep[..., k_lo:k_hi]
    q_idx = torch.arange(q_start, q_start + tb, device=q.device)
    k_idx = torch.arange(k_lo, k_hi, device=q.device)
    decay = leakage_decay(q_idx, k_idx, cfg, q.dtype)  # factors (Tb, 1), (Sb, 1) or None: age = index difference
    ring = k_idx[None, :] - offsets[:, None]  # (B, Sb) ring position of each stored token
    k_gain = None if cim.k_gain is None else cim.k_gain[:, ring % w].transpose(0, 1).to(q.dtype)  # (B, Hkv, Sb, D)
    v_gain = None if cim.v_gain is None else cim.v_gain[:, ring % w].transpose(0, 1).to(q.dtype)  # (B, Hkv, Sb, C)

    # the query heads of a group drive the same K array: fold them into the token axis
    qg = q.reshape(b, hkv, groups * tb, d)  # (B, Hkv, G·Tb, D)
    decay_g = None if decay is None else Decay(decay.query.repeat(groups, 1), decay.key)  # (G·Tb, 1), (Sb, 1)
    gen = cim.generator(q.device)
    scores = cell_scores(qg, k, cfg, decay_g, kind=cim.cell, gain=k_gain)  # (B, Hkv, G·Tb, Sb)
    sb = scores.shape[-1]
    a = hard_sigmoid(scores.view(b, hkv, groups, tb, sb), cfg, keep[:, :, None], gen, cim.score_offsets(q.dtype))  # (B, Hkv, G, Tb, Sb)
    a = a.reshape(b, hkv, groups * tb, sb)  # (B, Hkv, G·Tb, Sb)

    if cfg.normalize:
        v = with_sum_column(v, cfg)  # (B, Hkv, Sb, D+1)
    out = _tile_readouts(cim, a, v, decay_g, v_gain, keep, ring, gen)  # (B, Hkv, G·Tb, C), tiles summed
    if cfg.normalize:
        out = divide_by_sum_column(out)
    return out.reshape(b, h, tb, d)  # (B, H, Tb, D)


def _tile_readouts(
    cim: GainCellParams,
    a: torch.Tensor,
    v: torch.Tensor,
    decay: Decay | None,
    v_gain: torch.Tensor | None,
    keep: torch.Tensor,
    ring: torch.Tensor,
    gen: torch.Generator | None,
) -> torch.Tensor:
    """Σ over tiles of each tile's A·V read-out: a (B, Hkv, G·Tb, Sb), v (B, Hkv, Sb, C) → (B, Hkv, G·Tb, C).

    Keys are regrouped in rows of tokens_per_array consecutive ring positions
    starting at a multiple of it (per sequence: padding may shift them); row
    r holds tile (ring position mod W) // tokens_per_array.  Rows of the same
    tile (window laps) are summed *before* the read-out, which clamps and
    quantises each tile separately; tiles holding no key a query sees are not
    read for it (an empty array).
    """
    cfg = cim.config
    tpa, w = cfg.tokens_per_array, cfg.window_tokens
    b, hkv, gt, sb = a.shape
    tb, c = keep.shape[-2], v.shape[-1]
    lead = ring[:, 0] % tpa  # (B,) keys to prepend so each sequence's rows start on a tile row
    rows = -(-(sb + int(lead.max())) // tpa)
    key_decay = None if decay is None else decay.key[:, 0]  # (Sb,)
    if bool((lead == lead[0]).all()):  # one alignment for the whole batch: pad (a view when already aligned)
        a, v, keep, key_decay, v_gain = _shift_keys_uniform(a, v, keep, key_decay, v_gain, int(lead[0]), rows * tpa)
    else:
        a, v, keep, key_decay, v_gain = _shift_keys_per_sequence(a, v, keep, key_decay, v_gain, lead, rows * tpa)
    a_rows = a.view(b, hkv, gt, rows, tpa).transpose(2, 3).contiguous()  # (B, Hkv, R, G·Tb, tpa): one copy, not one per term
    v_rows = v.reshape(b, hkv, rows, tpa, c)  # (B, Hkv, R, tpa, C)
    d_rows = None if decay is None else Decay(decay.query, key_decay.view(-1, 1, rows, tpa, 1))  # (G·Tb, 1), (B or 1, 1, R, tpa, 1)
    g_rows = None if v_gain is None else v_gain.view(b, hkv, rows, tpa, c)  # (B, Hkv, R, tpa, C)
    partial = cell_weighted_sum(a_rows, v_rows, cfg, d_rows, kind=cim.cell, gain=g_rows)  # (B, Hkv, R, G·Tb, C)

    seen = keep.reshape(-1, 1, tb, rows, tpa).any(-1)  # (B or 1, 1, Tb, R): the row holds a key the query sees
    if rows <= w // tpa:  # consecutive rows are distinct tiles (no lap): each row is read out as it is, in any order
        per_tile, seen = partial, seen.transpose(2, 3).expand(b, -1, -1, -1)  # (B, 1, R, Tb)
    else:  # rows of the same tile (window laps) are summed before the read-out
        row_start = ring[:, :1] - lead[:, None] + tpa * torch.arange(rows, device=a.device)  # (B, R) ring position
        used, index = torch.unique((row_start % w) // tpa, return_inverse=True)  # tiles present, each row's tile
        onehot = F.one_hot(index, len(used)).to(a.dtype)  # (B, R, n)
        per_tile = torch.einsum("bhrtc,brn->bhntc", partial, onehot)  # (B, Hkv, n, G·Tb, C)
        seen = torch.einsum("bqtr,brn->bqnt", seen.to(a.dtype), onehot) > 0  # (B, 1, n, Tb)
    n = per_tile.shape[2]
    seen = seen[:, :, :, None].expand(-1, -1, -1, gt // tb, -1).reshape(b, 1, n, gt, 1).to(a.dtype)  # (B, 1, n, G·Tb, 1)
    readout = tile_readout(per_tile, cfg, gen, active=seen)  # (B, Hkv, n, G·Tb, C), a fresh tensor
    readout = readout * seen if readout.requires_grad else readout.mul_(seen)
    return readout.sum(dim=2)


def _shift_keys_uniform(a, v, keep, key_decay, v_gain, lead: int, length: int):
    """Prepend `lead` empty keys and append empty ones up to `length` (A = 0 there: no charge)."""
    tail = length - lead - a.shape[-1]
    if lead == 0 and tail == 0:
        return a, v, keep, key_decay, v_gain
    a = F.pad(a, (lead, tail))  # (B, Hkv, G·Tb, L)
    v = F.pad(v, (0, 0, lead, tail))  # (B, Hkv, L, C)
    keep = F.pad(keep, (lead, tail))  # (B or 1, 1, Tb, L)
    key_decay = None if key_decay is None else F.pad(key_decay, (lead, tail), value=1.0)  # (L,)
    v_gain = None if v_gain is None else F.pad(v_gain, (0, 0, lead, tail), value=1.0)
    return a, v, keep, key_decay, v_gain


def _shift_keys_per_sequence(a, v, keep, key_decay, v_gain, lead: torch.Tensor, length: int):
    """As `_shift_keys_uniform`, with one `lead` per sequence (left padding of different lengths)."""
    b, hkv, gt, sb = a.shape
    tb, c = keep.shape[-2], v.shape[-1]
    src = torch.arange(length, device=a.device)[None, :] - lead[:, None]  # (B, L) source key of each new slot
    valid = (src >= 0) & (src < sb)
    src = src.clamp(0, sb - 1)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    a = torch.where(valid[:, None, None], a.gather(-1, src[:, None, None].expand(b, hkv, gt, -1)), zero)  # (B, Hkv, G·Tb, L)
    v = v.gather(-2, src[:, None, :, None].expand(b, hkv, -1, c))  # (B, Hkv, L, C); A = 0 where not valid
    keep = keep.expand(b, -1, -1, -1).gather(-1, src[:, None, None].expand(b, 1, tb, -1)) & valid[:, None, None]
    key_decay = None if key_decay is None else key_decay[src]  # (B, L)
    v_gain = None if v_gain is None else v_gain.gather(-2, src[:, None, :, None].expand(b, hkv, -1, c))
    return a, v, keep, key_decay, v_gain


__all__ = ["SCALERS", "GainCellParams", "HeadOffset", "HeadScaler", "Moments", "derive_seed", "gaincell_attention"]
