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
                         = Σ_i (q ⊙ dq^i) @ (c_i · u_k^i ⊙ dk^i)ᵀ
    weighted sum O[t, d] = Σ_s cell(A[t, s], v[s, d], decay[t, s])
                         = Σ_i dq^i ⊙ (A @ (c_i · u_v^i ⊙ dk^i))

The stored factor c_i · u^i · dk^i (`stored_terms`) depends only on the
written token and the reference t0, so a model of the chip can keep it from
one query to the next (`cimattn.attention.gaincell_decode`).

An optional `gain` (same shape as the stored k or v, broadcastable) is the
multiplicative per-cell gain error of device-to-device variability: it
multiplies each cell's charge.  Nothing here knows about models or heads;
leading dimensions broadcast like `torch.matmul`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from functools import partial
from typing import Literal, NamedTuple

import torch

from cimattn.config.schema import GainCell
from cimattn.physics.quantize import clamp, quantize

CellKind = Literal["linear", "nonlinear"]
# A decay factor stays below e^60 (fp32 holds e^88), so the two factors' product never overflows
MAX_LEAK_EXPONENT = 60.0
# The precision of the surrogate gradient's products (None: the operands' own).  The registered attentions set it to
# the autocast precision of the digital layers around them (`cimattn.attention.without_autocast`): the simulated
# arrays' values stay fp32, while their training signal, an approximation already, costs what the digital layers' does.
SURROGATE_GRADIENT_DTYPE: ContextVar[torch.dtype | None] = ContextVar("surrogate_gradient_dtype", default=None)


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


class Terms(NamedTuple):
    """The polynomial terms an array product sums: cell = x · Σ_k coeffs[k] · u^powers[k] · d^powers[k] (+ constant · x).

    `constant` is c_0 when its term is left out of the stored operand: without
    per-cell gains Σ_d c_0·x is the same for every stored cell, so it is added
    once, digitally, instead of being a product with a column of ones.
    """

    powers: tuple[int, ...]
    coeffs: tuple[float, ...]
    constant: float = 0.0


def cell_terms(cfg: GainCell, kind: CellKind | None = None, with_gain: bool = False) -> Terms:
    """The terms of the linear cell (slope · x · u · d) or of the Eq. 4 polynomial."""
    if (kind or cfg.cell) == "linear":
        return Terms((1,), (cfg.linear_slope,))
    c = tuple(cfg.cell_polynomial())
    return Terms(tuple(range(len(c))), c) if with_gain else Terms(tuple(range(1, len(c))), c[1:], c[0])


def stored_terms(
    y: torch.Tensor, cfg: GainCell, terms: Terms, key_decay: torch.Tensor | None = None, gain: torch.Tensor | None = None
) -> torch.Tensor:
    """The stored operand of every term, concatenated: (..., S, C) voltages → (..., S, n·C) of coeff · u^i · dk^i (· gain).

    `key_decay` (broadcast against y, e.g. (..., S, 1)) is the key factor of a `Decay`.
    This is what an array holds once its token is written; `scores_from_terms`
    and `weighted_sum_from_terms` read it.
    """
    ud = y - cfg.y_mid if key_decay is None else (y - cfg.y_mid) * key_decay  # u^i · dk^i = (u · dk)^i
    power = {1: ud}
    for i in range(2, max(terms.powers) + 1):
        power[i] = power[i - 1] * ud
    if 0 in terms.powers:
        power[0] = torch.ones_like(ud)
    coeffs = torch.tensor(terms.coeffs, dtype=ud.dtype, device=ud.device)[:, None]  # (n, 1)
    out = torch.stack([power[i] for i in terms.powers], -2) * coeffs  # (..., S, n, C)
    return (out if gain is None else out * gain.unsqueeze(-2)).flatten(-2)


def scores_from_terms(q: torch.Tensor, stored: torch.Tensor, terms: Terms, query_decay: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_d cell(q, k): pulses (..., T, D) against `stored_terms` of the keys (..., S, n·D) → (..., T, S), one matmul.

    `query_decay` (broadcast against q, e.g. (..., T, 1)) is the query factor of a `Decay`.
    """
    n = len(terms.powers)
    if query_decay is None:
        pulses = q.repeat((1,) * (q.dim() - 1) + (n,))  # (..., T, n·D): q once per term
    else:
        exponents = torch.tensor(terms.powers, dtype=q.dtype, device=q.device)[:, None]  # (n, 1)
        pulses = (q.unsqueeze(-2) * query_decay.unsqueeze(-2).pow(exponents)).flatten(-2)  # (..., T, n·D): q · dq^i per term
    acc = torch.matmul(pulses, stored.transpose(-1, -2))  # (..., T, S)
    return _plus(acc, q.sum(-1, keepdim=True), terms.constant) if terms.constant else acc


def weighted_sum_from_terms(a: torch.Tensor, stored: torch.Tensor, terms: Terms, query_decay: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_s cell(A, v): pulses (..., T, S) against `stored_terms` of the values (..., S, n·C) → (..., T, C); A is read once."""
    out = torch.matmul(a, stored).unflatten(-1, (len(terms.powers), -1))  # (..., T, n, C)
    if query_decay is None:
        acc = out.sum(-2)
    else:  # Σ_i dq[t]^i · term_i, accumulated term by term (2.4× faster than a product and a sum over the n axis, 2 threads)
        acc = out[..., 0, :] * query_decay.pow(terms.powers[0])
        for k, i in enumerate(terms.powers[1:], 1):
            add = acc.addcmul if acc.requires_grad else acc.addcmul_
            acc = add(out[..., k, :], query_decay.pow(i))
    return _plus(acc, a.sum(-1, keepdim=True), terms.constant) if terms.constant else acc


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
    return _array_product(scores_from_terms, _scores_linear_grads, q, k, cfg, decay, kind, gain)


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
    return _array_product(weighted_sum_from_terms, _weighted_sum_linear_grads, a, v, cfg, decay, kind, gain)


def _array_product(read: Callable, linear_grads: Callable, x: torch.Tensor, y: torch.Tensor, cfg: GainCell, decay: Decay | None,
                   kind: CellKind | None, gain: torch.Tensor | None) -> torch.Tensor:
    """`read` (scores or weighted sum) of pulses x against the stored y's terms, with the cell's value and gradient.

    `linear_grads(grad, x, w, dq)` is the linear product's backward, (grad of x, grad of its stored operand w).
    """

    def product(cell_kind: CellKind) -> torch.Tensor:
        terms = cell_terms(cfg, cell_kind, gain is not None)
        stored = stored_terms(y, cfg, terms, None if decay is None else decay.key, gain)
        return read(x, stored, terms, None if decay is None else decay.query)

    kind = kind or cfg.cell
    surrogate = kind == "nonlinear" and cfg.cell_gradient == "linear" and torch.is_grad_enabled()
    if surrogate and (x.requires_grad or y.requires_grad):
        dq, dk = (None, None) if decay is None else decay
        return _SurrogateProduct.apply(x, y, dq, dk, gain, partial(product, "nonlinear"), linear_grads, cfg)
    return _with_gradient(partial(product, "linear"), partial(product, "nonlinear"), cfg, kind)


class _SurrogateProduct(torch.autograd.Function):
    """An array product's polynomial value with the linear cell's gradient, without computing the linear product.

    The linear product reads w = slope · (y − y_mid) · dk (· gain); its gradient needs only x, w and the query
    decay, so its forward (a quarter of the surrogate's matmul work in `_with_gradient`) is never run.  The decay
    factors and gains are constants of the chip: they get no gradient.  The backward's products run at
    SURROGATE_GRADIENT_DTYPE when it is set.
    """

    @staticmethod
    def forward(ctx, x, y, dq, dk, gain, nonlinear: Callable[[], torch.Tensor], linear_grads: Callable, cfg: GainCell):
        ctx.save_for_backward(x, y, dq, dk, gain)
        ctx.linear_grads, ctx.slope, ctx.y_mid = linear_grads, cfg.linear_slope, cfg.y_mid
        ctx.dtype = SURROGATE_GRADIENT_DTYPE.get() or x.dtype
        return nonlinear()

    @staticmethod
    def backward(ctx, grad):
        x, y, dq, dk, gain = ctx.saved_tensors
        dw_dy = ctx.slope if dk is None else ctx.slope * dk  # ∂w/∂y, broadcast against y
        dw_dy = dw_dy if gain is None else dw_dy * gain
        w = (y - ctx.y_mid) * dw_dy
        low = (t if t is None else t.to(ctx.dtype) for t in (grad, x, w, dq))
        gx, gw = (g.to(x.dtype) for g in ctx.linear_grads(*low))
        gx = gx.sum_to_size(x.shape) if ctx.needs_input_grad[0] else None
        gy = (gw * dw_dy).sum_to_size(y.shape) if ctx.needs_input_grad[1] else None
        return gx, gy, None, None, None, None, None, None


def _scores_linear_grads(grad, q, w, dq):
    """S = (q · dq) @ wᵀ: the gradients of q and of w."""
    gq = torch.matmul(grad, w)
    return (gq if dq is None else gq * dq), torch.matmul(grad.transpose(-1, -2), q if dq is None else q * dq)


def _weighted_sum_linear_grads(grad, a, w, dq):
    """O = dq · (A @ w): the gradients of A and of w."""
    g = grad if dq is None else grad * dq
    return torch.matmul(g, w.transpose(-1, -2)), torch.matmul(a.transpose(-1, -2), g)


def _plus(acc: torch.Tensor, m: torch.Tensor, c: float) -> torch.Tensor:
    """acc + c·m, in place when no gradient is recorded (this is the bulk of the work) and the shapes allow it."""
    recording = torch.is_grad_enabled() and (acc.requires_grad or m.requires_grad)
    fits = m.dim() <= acc.dim() and all(x in (1, y) for x, y in zip(reversed(m.shape), reversed(acc.shape)))  # m broadcasts into acc
    if recording or not fits:
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
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The charge-to-pulse activation A = clamp(score_scale·S + score_offset, 0, 1); masked entries → 0.

    No softmax, no normalisation, no 1/√d.  Read noise (read_std × the
    activation's full scale, 1) is added before the clamp, i.e. on the
    integrated charge, as the authors place their (unused) noise.
    With `offset_per_doubling` β (ours), a query that sees n unmasked keys
    (counted in `keep`, which must then be given) has its offset lowered by
    β·log2(n / offset_reference_keys) when n exceeds the reference.
    `offsets` (broadcast against scores, e.g. one per head: `head_offsets`) are added to the offset.
    """
    bias = torch.tensor(cfg.score_offset, dtype=scores.dtype, device=scores.device)  # what is added to score_scale·S
    if cfg.offset_per_doubling:
        if keep is None:
            raise ValueError("offset_per_doubling counts the keys a query sees: pass `keep`")
        seen = keep.sum(-1, keepdim=True).to(scores.dtype)
        bias = bias - cfg.offset_per_doubling * torch.log2((seen / cfg.offset_reference_keys).clamp_min(1.0))
    if keep is not None:  # a masked key's input is −∞: its A is 0 and so is its gradient, with no masked_fill pass
        bias = torch.where(keep, bias, -torch.inf)  # keep's size, the heads of a group not yet broadcast
    x = torch.add(bias, scores, alpha=cfg.score_scale)
    if offsets is not None:
        x = x + offsets if offsets.requires_grad else x.add_(offsets)
    x = read_noise(x, cfg.noise.read_std, generator)
    return clamp(x, 0.0, 1.0) if x.requires_grad else x.clamp_(0.0, 1.0)  # x is this function's own tensor: in place


def with_sum_column(v: torch.Tensor, cfg: GainCell) -> torch.Tensor:
    """(..., S, D) stored values + the all-ones column of `normalize`, stored at v.high (the top level): (..., S, D+1).

    Read out through the same cells, scale, clamp and quantiser, its tiles sum to ≈ f(0.45)·ΣA.
    """
    return torch.cat([v, torch.full_like(v[..., :1], cfg.v.high)], dim=-1)


def divide_by_sum_column(out: torch.Tensor) -> torch.Tensor:
    """(..., D+1) digital sums of the tile read-outs → (..., D): the value columns ÷ the ΣA column, 0 where it reads 0."""
    den = out[..., -1:]
    ratio = out[..., :-1] / den.clamp_min(torch.finfo(out.dtype).tiny)
    return torch.where(den > 0, ratio, torch.zeros_like(ratio))  # no key seen (ΣA read as 0): output 0


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
