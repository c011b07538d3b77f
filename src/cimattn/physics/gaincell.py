"""Gain-cell array physics of Leroux et al. (shared/PAPERS.md §1) as pure torch functions.

The cell (Eq. 4 folded at V_in): a pulse of width x read against a stored
voltage y gives the charge

    cell(x, y, d) = Σ_i c_i · x · u^i · d^i,     u = y − y_mid,

with c_i = `GainCell.cell_polynomial()` (i = 0..3) and d = exp(−rate · age)
the leakage of the stored deviation u after `age` tokens; the constant term
(i = 0) does not decay.  The *linear* cell is `linear_slope · x · u · d`.
With `cell_gradient: linear` the nonlinear cell forwards the polynomial and
backwards the linear cell's gradient (the authors' surrogate); `exact` uses
the polynomial's own derivative.

Arrays sum cell charges along a line, so attention needs two matrix forms.
Leakage depends on the age t − s of a key read by query t, and
exp(−r·(t − s)) = exp(−r·(t − t0)) · exp(r·(s − t0)) for any reference t0,
so the decay is passed as a `Decay` of a query-side and a key-side factor
and folded into the operands of each product — never a (T, S) pass:

    scores       S[t, s] = Σ_d cell(q[t, d], k[s, d], decay[t, s])
                         = Σ_i c_i · (q ⊙ dq^i) @ (u_k^i ⊙ dk^i)ᵀ
    weighted sum O[t, d] = Σ_s cell(A[t, s], v[s, d], decay[t, s])
                         = Σ_i c_i · dq^i ⊙ (A @ (u_v^i ⊙ dk^i))

An optional `gain` (same shape as the stored k or v, broadcastable) is the
multiplicative per-cell gain error of device-to-device variability: it
multiplies each cell's charge.  Nothing here knows about models or heads;
leading dimensions broadcast like `torch.matmul`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch

from cimattn.config.schema import GainCell
from cimattn.physics.quantize import quantize

CellKind = Literal["linear", "nonlinear"]
# A decay factor stays below e^60 (fp32 holds e^88), so the two factors' product never overflows
MAX_LEAK_EXPONENT = 60.0


class Decay(NamedTuple):
    """decay[t, s] = query[t] · key[s], each factor shaped to broadcast against the operand it scales.

    query: (..., T, 1) against pulses (..., T, D); key: (..., S, 1) against stored (..., S, D).
    """

    query: torch.Tensor
    key: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The (..., T, S) decay matrix (for checks; the matrix forms never build it)."""
        return self.query * self.key.transpose(-1, -2)


def cell(
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: GainCell,
    decay: torch.Tensor | None = None,
    *,
    kind: CellKind | None = None,
    gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """One cell's output charge for pulse width `x` and stored voltage `y` (elementwise, broadcast)."""
    u = y - cfg.y_mid
    ud = u if decay is None else u * decay  # (u·d)^i = u^i·d^i: the i-th term decays as d^i
    g = 1.0 if gain is None else gain

    def linear() -> torch.Tensor:
        return cfg.linear_slope * x * ud * g

    def nonlinear() -> torch.Tensor:
        return x * g * sum(c * ud.pow(i) for i, c in enumerate(cfg.cell_polynomial()))

    return _with_gradient(linear, nonlinear, cfg, kind or cfg.cell)


def cell_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: GainCell,
    decay: Decay | None = None,
    *,
    kind: CellKind | None = None,
    gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Q·Kᵀ on the K array: (..., T, D) pulses × (..., S, D) stored keys → (..., T, S) charges.

    `gain` broadcasts to k's shape (one per stored cell).
    """
    u = k - cfg.y_mid

    def stored(i: int) -> torch.Tensor:
        return _stored(u, i, decay, gain)

    def pulses(i: int) -> torch.Tensor:  # q·dq^i, (..., T, D)
        return q if decay is None or i == 0 else q * decay.query.pow(i)

    def linear() -> torch.Tensor:
        return cfg.linear_slope * torch.matmul(pulses(1), stored(1).transpose(-1, -2))

    def nonlinear() -> torch.Tensor:
        # every term in one matmul over the concatenated (c_i·pulses_i | stored_i) pairs: one pass over (T, S)
        coeffs = cfg.cell_polynomial()
        powers = range(0 if gain is not None else 1, len(coeffs))  # without gain, Σ_d q is the same for every key
        acc = torch.matmul(torch.cat([coeffs[i] * pulses(i) for i in powers], -1),
                           torch.cat([stored(i) for i in powers], -1).transpose(-1, -2))  # (..., T, S)
        return acc if gain is not None else _plus(acc, q.sum(-1, keepdim=True), coeffs[0])

    return _with_gradient(linear, nonlinear, cfg, kind or cfg.cell)


def cell_weighted_sum(
    a: torch.Tensor,
    v: torch.Tensor,
    cfg: GainCell,
    decay: Decay | None = None,
    *,
    kind: CellKind | None = None,
    gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """A·V on the V array: (..., T, S) pulses × (..., S, D) stored values → (..., T, D) charges.

    The i-th term of each cell decays as decay^i (the constant term not at all).
    """
    u = v - cfg.y_mid

    def stored(i: int) -> torch.Tensor:
        return _stored(u, i, decay, gain)

    def linear() -> torch.Tensor:
        t1 = torch.matmul(a, stored(1))
        return cfg.linear_slope * (t1 if decay is None else t1 * decay.query)

    def nonlinear() -> torch.Tensor:
        # every term in one matmul against the concatenated c_i·stored_i: A is read once
        coeffs = cfg.cell_polynomial()
        powers = range(0 if gain is not None else 1, len(coeffs))
        terms = torch.matmul(a, torch.cat([coeffs[i] * stored(i) for i in powers], -1))  # (..., T, n·D)
        terms = terms.unflatten(-1, (len(powers), u.shape[-1]))  # (..., T, n, D)
        if decay is not None:  # the i-th term read by query t decays by dq[t]^i: one pass for all terms
            factors = torch.cat([decay.query.pow(i) for i in powers], -1).unsqueeze(-1)  # (..., T, n, 1)
            terms = terms * factors if terms.requires_grad else terms.mul_(factors)
        acc = terms.sum(-2)
        return acc if gain is not None else _plus(acc, a.sum(-1, keepdim=True), coeffs[0])

    return _with_gradient(linear, nonlinear, cfg, kind or cfg.cell)


def _stored(u: torch.Tensor, i: int, decay: Decay | None, gain: torch.Tensor | None) -> torch.Tensor:
    """The stored operand of the i-th polynomial term: u^i · dk^i (· gain), (..., S, D)."""
    x = u.pow(i) if gain is None else u.pow(i) * gain
    return x if decay is None or i == 0 else x * decay.key.pow(i)


def _plus(acc: torch.Tensor, m: torch.Tensor, c: float) -> torch.Tensor:
    """acc + c·m, in place when no gradient is recorded (this is the bulk of the work) and the shapes allow it."""
    recording = torch.is_grad_enabled() and (acc.requires_grad or m.requires_grad)
    if recording or torch.broadcast_shapes(acc.shape, m.shape) != acc.shape:
        return acc + c * m
    return acc.add_(m, alpha=c)


def _with_gradient(linear: Callable[[], torch.Tensor], nonlinear: Callable[[], torch.Tensor], cfg: GainCell, kind: CellKind):
    """The linear cell, or the polynomial with its own gradient (exact) or the linear one (surrogate)."""
    if kind == "linear":
        return linear()
    if cfg.cell_gradient == "exact" or not torch.is_grad_enabled():
        return nonlinear()
    lin = linear()
    with torch.no_grad():  # the polynomial's value only; its gradient is the linear cell's
        value = nonlinear()
    return lin + (value - lin).detach()


def leakage_decay(
    query_index: torch.Tensor, key_index: torch.Tensor, cfg: GainCell, dtype: torch.dtype = torch.float32
) -> Decay | None:
    """exp(−rate · (t − s)) for queries at cache indices `query_index` (T,) and keys at `key_index` (S,).

    None when the cell does not leak.  The reference is the first query; a
    future key (s > t, masked anyway) gets a factor above 1, so callers keep
    a block's queries within `max_query_block(cfg)` of each other and both
    factors stay finite.
    """
    rate = cfg.leakage.rate_per_token
    if rate == 0.0:
        return None
    t0 = query_index[:1]
    query = torch.exp(-rate * (query_index - t0).to(dtype))
    key = torch.exp(rate * (key_index - t0).to(dtype))
    return Decay(query[:, None], key[:, None])


def max_query_block(cfg: GainCell) -> int | None:
    """The most consecutive queries one `leakage_decay` may cover (None: no limit)."""
    rate = cfg.leakage.rate_per_token
    if rate == 0.0:
        return None
    powers = len(cfg.cell_polynomial()) - 1  # factors are raised to at most this power
    return max(1, int(MAX_LEAK_EXPONENT / (powers * rate)))


def read_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x plus fresh Gaussian noise of standard deviation `std` (same unit as x); x itself when std is 0."""
    if std == 0.0:
        return x
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + std * noise


def variability_gain(
    shape: tuple[int, ...], cfg: GainCell, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor | None:
    """Per-cell multiplicative gain 1 + σ·N(0, 1), drawn once per chip; None when σ (cell_variability_std) is 0."""
    std = cfg.noise.cell_variability_std
    if std == 0.0:
        return None
    return 1.0 + std * torch.randn(shape, generator=generator, dtype=dtype)


def hard_sigmoid(
    scores: torch.Tensor,
    cfg: GainCell,
    keep: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The charge-to-pulse activation A = clamp(score_scale·S + score_offset, 0, 1); masked entries → 0.

    No softmax, no normalisation, no 1/√d.  Read noise (read_std × the
    activation's full scale, 1) is added before the clamp, i.e. on the
    integrated charge, as the authors place their (unused) noise.
    """
    x = cfg.score_scale * scores
    if cfg.score_offset != 0.0:
        x = x + cfg.score_offset
    x = read_noise(x, cfg.noise.read_std, generator)
    if x.requires_grad:
        a = x.clamp(0.0, 1.0)
        return a if keep is None else a.masked_fill(~keep, 0.0)
    a = x.clamp_(0.0, 1.0)  # x is this function's own tensor: in place saves a (T, S) pass each
    return a if keep is None else a.masked_fill_(~keep, 0.0)


def tile_readout(
    partial: torch.Tensor,
    cfg: GainCell,
    generator: torch.Generator | None = None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """One A·V array's read-out: quantize(av_tile_scale · partial + noise, av_out).

    Read noise has std read_std × the ADC's full scale (av_out.high − av_out.low);
    `active` (broadcastable, 0/1) limits it to tiles that hold a visible key.
    """
    x = cfg.av_tile_scale * partial
    std = cfg.noise.read_std * (cfg.av_out.high - cfg.av_out.low)
    if std > 0.0:
        noise = read_noise(torch.zeros_like(x), std, generator)
        x = x + (noise if active is None else noise * active)
    return quantize(x, cfg.av_out)
