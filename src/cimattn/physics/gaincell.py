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

Arrays sum cell charges along a line, so attention needs two matrix forms:

    scores       S[t, s] = Σ_d cell(q[t, d], k[s, d], decay[t, s])
                         = Σ_i c_i · decay^i ⊙ (q @ (u_k^i)ᵀ)
    weighted sum O[t, d] = Σ_s cell(A[t, s], v[s, d], decay[t, s])
                         = Σ_i c_i · (A ⊙ decay^i) @ u_v^i

An optional `gain` (same shape as the stored k or v, broadcastable) is the
multiplicative per-cell gain error of device-to-device variability: it
multiplies each cell's charge.  Nothing here knows about models or heads;
leading dimensions broadcast like `torch.matmul`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from cimattn.config.schema import GainCell
from cimattn.physics.quantize import quantize

CellKind = Literal["linear", "nonlinear"]


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
    decay: torch.Tensor | None = None,
    *,
    kind: CellKind | None = None,
    gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Q·Kᵀ on the K array: (..., T, D) pulses × (..., S, D) stored keys → (..., T, S) charges.

    `decay` broadcasts to (..., T, S); `gain` to k's shape (one per stored cell).
    """
    u = k - cfg.y_mid

    def m(i: int) -> torch.Tensor:  # Σ_d q · u^i (· gain)
        if i == 0 and gain is None:
            return q.sum(-1, keepdim=True)  # (..., T, 1): the same for every key
        stored = u.pow(i) if gain is None else u.pow(i) * gain  # (..., S, D)
        return torch.matmul(q, stored.transpose(-1, -2))  # (..., T, S)

    m1 = m(1)

    def linear() -> torch.Tensor:
        return cfg.linear_slope * (m1 if decay is None else m1 * decay)

    def nonlinear() -> torch.Tensor:
        # Horner in the decay: Σ_i c_i d^i m_i = c_0 m_0 + d(c_1 m_1 + d(c_2 m_2 + d c_3 m_3))
        coeffs = cfg.cell_polynomial()
        acc = coeffs[-1] * m(len(coeffs) - 1)
        for i in range(len(coeffs) - 2, -1, -1):
            acc = _times_plus(acc, decay, m1 if i == 1 else m(i), coeffs[i])
        return acc

    return _with_gradient(linear, nonlinear, cfg, kind or cfg.cell)


def cell_weighted_sum(
    a: torch.Tensor,
    v: torch.Tensor,
    cfg: GainCell,
    decay: torch.Tensor | None = None,
    *,
    kind: CellKind | None = None,
    gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """A·V on the V array: (..., T, S) pulses × (..., S, D) stored values → (..., T, D) charges.

    `decay` broadcasts to (..., T, S) and multiplies the pulse (the i-th term by decay^i).
    """
    u = v - cfg.y_mid

    def term(i: int, pulses: torch.Tensor, c: float = 1.0) -> torch.Tensor:  # c · (pulses ⊙ decay^i) @ (u^i · gain)
        if i == 0 and gain is None:
            return c * pulses.sum(-1, keepdim=True)  # (..., T, 1): the same for every column
        stored = c * u.pow(i) if gain is None else c * u.pow(i) * gain  # (..., S, D): scaling here is cheap
        return torch.matmul(pulses, stored)  # (..., T, D)

    a1 = a if decay is None else a * decay  # (..., T, S)
    t1 = term(1, a1)

    def linear() -> torch.Tensor:
        return cfg.linear_slope * t1

    def nonlinear() -> torch.Tensor:
        coeffs = cfg.cell_polynomial()
        acc = term(0, a, coeffs[0]) + coeffs[1] * t1
        # pure inference: the pulses may decay in place (a1 is a fresh tensor nobody keeps)
        in_place = decay is not None and a1 is not a and not torch.is_grad_enabled() and not a1.requires_grad
        pulses = a1
        for i in range(2, len(coeffs)):
            if decay is not None:
                pulses = pulses.mul_(decay) if in_place else pulses * decay
            t = term(i, pulses, coeffs[i])
            acc = acc.add_(t) if in_place else acc + t
        return acc

    return _with_gradient(linear, nonlinear, cfg, kind or cfg.cell)


def _times_plus(acc: torch.Tensor, d: torch.Tensor | None, m: torch.Tensor, c: float) -> torch.Tensor:
    """acc · d + c · m, in place when no gradient is being recorded (this is the bulk of the work)."""
    if torch.is_grad_enabled() and (acc.requires_grad or m.requires_grad):
        return (acc if d is None else acc * d) + c * m
    if d is not None:
        acc.mul_(d)
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


def leakage_decay(age_tokens: torch.Tensor, cfg: GainCell, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """exp(−rate · age) of the stored deviation after `age_tokens` tokens; None when the cell does not leak.

    Negative ages (future keys, masked anyway) are treated as age 0.
    """
    rate = cfg.leakage.rate_per_token
    if rate == 0.0:
        return None
    return torch.exp(-rate * age_tokens.clamp_min(0).to(dtype))


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
    a = read_noise(x, cfg.noise.read_std, generator).clamp(0.0, 1.0)
    return a if keep is None else a.masked_fill(~keep, 0.0)


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
