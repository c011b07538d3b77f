"""Triton kernels of the fused gain-cell attention (prefill): forward, dq and dk/dv; the launcher is `cimattn.kernels.gaincell`.

The forward program computes BLOCK_M consecutive queries of one (batch,
query head) against the key rows of TPA (= tokens_per_array) tokens that
hold a key in any of their windows.  Rows of the same array (window laps:
row r and r + N_TILES) are accumulated together before the array's read-out,
which scales, clamps and quantises it — as `_tile_readouts` of the torch
reference.  With NORMALIZE an all-ones column stored at v.high (charge
deviation U_ONE) is read out the same way; its tile sum ΣA divides the output.

The backward follows FlashAttention-2: nothing (T, S)-sized is stored; each
kernel recomputes scores, A and the arrays' charges it needs.

* `gaincell_bwd_dq`: per query block, like the forward; for each array a
  first pass over its rows gives its charge, hence the read-out's gradient
  dP (the ADC clamp's straight-through gradient), a second pass gives dA,
  dS and dq.
* `gaincell_bwd_dkdv`: per key row (TPA tokens of one KV head), over the
  query heads of its group and the query blocks that see the row; dP of the
  row's array needs that array's charge from all its rows the query block
  sees (the laps), then dv and dk of the row follow.

The gradient cell is the polynomial (GRAD_POLY: cell nonlinear, cell_gradient
exact) or the linear cell `slope · x · u · d` (the linear cell itself, or the
surrogate of the nonlinear one).  Everything is fp32 in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny: the reference's clamp_min of the ΣA divisor


@triton.jit
def _round_half_even(x):
    """torch.round: nearest integer, ties to even (x − floor(x) is exact, so no x + 0.5 rounding trap)."""
    r = tl.floor(x)
    f = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


@triton.jit
def _stored(base, offs_s, offs_d, st, sd, T, D, y_mid):
    """Deviations u = y − y_mid of TPA stored tokens (TPA, BLOCK_D); padding cells hold no charge (0)."""
    mask = (offs_s < T)[:, None] & (offs_d < D)[None, :]
    y = tl.load(base + offs_s[:, None] * st + offs_d[None, :] * sd, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, y - y_mid, 0.0)


@triton.jit
def _activation(q, q_sum, u_k, offs_m, offs_s, m_ok, T, W,
                c0, c1, c2, c3, slope, score_scale, row_offset, rate,
                NONLINEAR: tl.constexpr, LEAK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key row against a query block → (HardSigmoid input x, A, decay d, keep), each (BLOCK_M, TPA).

    row_offset (BLOCK_M,): each query's HardSigmoid offset (`_row_offset`).
    """
    age = offs_m[:, None] - offs_s[None, :]  # tokens since the key was written
    keep = (age >= 0) & (age < W) & (offs_s < T)[None, :] & m_ok[:, None]
    d1 = tl.exp(-rate * tl.maximum(age, 0).to(tl.float32))  # future keys are masked; rate 0 gives exactly 1
    m1 = tl.dot(q, tl.trans(u_k), input_precision=DOT_PRECISION)  # Σ_d q·u
    if NONLINEAR:
        u_k2 = u_k * u_k
        m2 = tl.dot(q, tl.trans(u_k2), input_precision=DOT_PRECISION)
        m3 = tl.dot(q, tl.trans(u_k2 * u_k), input_precision=DOT_PRECISION)
        if LEAK:
            d2 = d1 * d1
            score = c1 * (d1 * m1) + c0 * q_sum[:, None] + c2 * (d2 * m2) + c3 * (d2 * d1 * m3)
        else:
            score = c1 * m1 + c0 * q_sum[:, None] + c2 * m2 + c3 * m3
    else:
        score = slope * (d1 * m1) if LEAK else slope * m1
    x = score_scale * score + row_offset[:, None]
    a = tl.where(keep, tl.minimum(tl.maximum(x, 0.0), 1.0), 0.0)  # HardSigmoid, masked keys 0
    return x, a, d1, keep


@triton.jit
def _row_offset(offs_m, W, score_offset, offset_slope, offset_ref):
    """The HardSigmoid offset of each query of a block (BLOCK_M,): score_offset (plus the head's own, `head_offsets`)
    lowered by offset_slope per doubling of the keys the query sees beyond offset_ref (`offset_per_doubling`); with the
    plain causal window (no padding: the launcher's condition) a query at t sees min(t + 1, W) keys."""
    seen = tl.minimum(offs_m + 1, W).to(tl.float32)
    return score_offset - offset_slope * tl.log2(tl.maximum(seen / offset_ref, 1.0))


@triton.jit
def _charge(a, d1, u_v, u_one, c0, c1, c2, c3, slope,
            NONLINEAR: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A·V charges of one key row: (BLOCK_M, BLOCK_D) columns and (BLOCK_M,) the all-ones column (0 without NORMALIZE)."""
    p1 = a * d1
    if NONLINEAR:
        p2 = p1 * d1
        p3 = p2 * d1
        u_v2 = u_v * u_v
        a_sum = tl.sum(a, 1)
        cols = c1 * tl.dot(p1, u_v, input_precision=DOT_PRECISION) + c0 * a_sum[:, None]
        cols += c2 * tl.dot(p2, u_v2, input_precision=DOT_PRECISION)
        cols += c3 * tl.dot(p3, u_v2 * u_v, input_precision=DOT_PRECISION)
        if NORMALIZE:
            ones = c0 * a_sum + c1 * u_one * tl.sum(p1, 1) + c2 * (u_one * u_one) * tl.sum(p2, 1) + c3 * (u_one * u_one * u_one) * tl.sum(p3, 1)
        else:
            ones = a_sum * 0.0
    else:
        cols = slope * tl.dot(p1, u_v, input_precision=DOT_PRECISION)
        ones = slope * u_one * tl.sum(p1, 1) if NORMALIZE else tl.sum(p1, 1) * 0.0
    return cols, ones


@triton.jit
def _array_charge(q, q_sum, k_base, v_base, r0, r_last, offs_m, m_ok, offs_n, offs_d,
                  skt, skd, svt, svd, T, D, W, N_TILES, y_mid, u_one,
                  c0, c1, c2, c3, slope, score_scale, row_offset, rate,
                  NONLINEAR: tl.constexpr, LEAK: tl.constexpr, NORMALIZE: tl.constexpr,
                  TPA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One array's charge before its read-out: the sum over its rows r0, r0 + N_TILES, … ≤ r_last (window laps).

    Returns the columns (BLOCK_M, BLOCK_D), the all-ones column (BLOCK_M,)
    and how many keys of the array each query sees (BLOCK_M,).
    """
    cols = tl.zeros((q.shape[0], q.shape[1]), dtype=tl.float32)
    ones = tl.zeros((q.shape[0],), dtype=tl.float32)
    seen = tl.zeros((q.shape[0],), dtype=tl.int32)
    for rr in range(r0, r_last + 1, N_TILES):
        offs_s = rr * TPA + offs_n
        u_k = _stored(k_base, offs_s, offs_d, skt, skd, T, D, y_mid)
        u_v = _stored(v_base, offs_s, offs_d, svt, svd, T, D, y_mid)
        _, a, d1, keep = _activation(q, q_sum, u_k, offs_m, offs_s, m_ok, T, W, c0, c1, c2, c3, slope,
                                     score_scale, row_offset, rate, NONLINEAR, LEAK, DOT_PRECISION)
        seen += tl.sum(keep.to(tl.int32), 1)
        c, o = _charge(a, d1, u_v, u_one, c0, c1, c2, c3, slope, NONLINEAR, NORMALIZE, DOT_PRECISION)
        cols += c
        ones += o
    return cols, ones, seen


@triton.jit
def _readout(charge, av_scale, av_low, av_high, av_step, av_anchor, AV_LEVELS: tl.constexpr):
    """An array's read-out: scale, clamp, quantise (ADC)."""
    x = tl.minimum(tl.maximum(av_scale * charge, av_low), av_high)
    if AV_LEVELS:
        x = _round_half_even((x - av_anchor) / av_step) * av_step + av_anchor
    return x


@triton.jit
def _readout_grad(charge, g, av_scale, av_low, av_high):
    """∂L/∂charge from ∂L/∂read-out `g`: straight through the rounding, zero where the clamp is active."""
    x = av_scale * charge
    return tl.where((x >= av_low) & (x <= av_high), av_scale * g, 0.0)


@triton.jit
def _array_grad(q, q_sum, k_base, v_base, r0, r_last, offs_m, m_ok, offs_n, offs_d,
                skt, skd, svt, svd, T, D, W, N_TILES, y_mid, u_one,
                c0, c1, c2, c3, slope, score_scale, row_offset, rate, av_scale, av_low, av_high,
                gn, gd,
                NONLINEAR: tl.constexpr, LEAK: tl.constexpr, NORMALIZE: tl.constexpr,
                TPA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """∂L/∂charge of one array (rows r0, r0 + N_TILES, … ≤ r_last) for a query block: columns and all-ones column.

    gn (BLOCK_M, BLOCK_D), gd (BLOCK_M,): the gradients of the tile sums'
    columns and all-ones column; an array holding no key a query sees is not
    read for it (gradient 0).
    """
    cols, ones, seen = _array_charge(q, q_sum, k_base, v_base, r0, r_last, offs_m, m_ok, offs_n, offs_d,
                                     skt, skd, svt, svd, T, D, W, N_TILES, y_mid, u_one,
                                     c0, c1, c2, c3, slope, score_scale, row_offset, rate,
                                     NONLINEAR, LEAK, NORMALIZE, TPA, DOT_PRECISION)
    read = seen > 0
    dp = _readout_grad(cols, tl.where(read[:, None], gn, 0.0), av_scale, av_low, av_high)
    if NORMALIZE:
        dp_one = _readout_grad(ones, tl.where(read, gd, 0.0), av_scale, av_low, av_high)
    else:
        dp_one = gd * 0.0
    return dp, dp_one


@triton.jit
def _grad_a(dp, dp_one, u_v, u_one, d1, c0, c1, c2, c3, slope,
            GRAD_POLY: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """∂L/∂A (BLOCK_M, TPA) of one key row from its array's charge gradients dp (BLOCK_M, BLOCK_D), dp_one (BLOCK_M,)."""
    g1 = tl.dot(dp, tl.trans(u_v), input_precision=DOT_PRECISION)
    if NORMALIZE:
        g1 += u_one * dp_one[:, None]
    if GRAD_POLY:
        u_v2 = u_v * u_v
        g2 = tl.dot(dp, tl.trans(u_v2), input_precision=DOT_PRECISION)
        g3 = tl.dot(dp, tl.trans(u_v2 * u_v), input_precision=DOT_PRECISION)
        g0 = tl.sum(dp, 1)
        if NORMALIZE:
            g0 += dp_one
            g2 += (u_one * u_one) * dp_one[:, None]
            g3 += (u_one * u_one * u_one) * dp_one[:, None]
        d2 = d1 * d1
        return c0 * g0[:, None] + c1 * (d1 * g1) + c2 * (d2 * g2) + c3 * (d2 * d1 * g3)
    return slope * (d1 * g1)


@triton.jit
def _grad_score(da, x, keep, score_scale):
    """∂L/∂S from ∂L/∂A through the HardSigmoid clamp (its gradient: 1 on [0, 1]) and the mask."""
    return tl.where(keep & (x >= 0.0) & (x <= 1.0), score_scale * da, 0.0)


@triton.jit
def _grad_q(ds, d1, u_k, c0, c1, c2, c3, slope, GRAD_POLY: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq (BLOCK_M, BLOCK_D) of one key row from ∂L/∂S (BLOCK_M, TPA)."""
    e1 = ds * d1
    if GRAD_POLY:
        e2 = e1 * d1
        u_k2 = u_k * u_k
        g = c1 * tl.dot(e1, u_k, input_precision=DOT_PRECISION) + c0 * tl.sum(ds, 1)[:, None]
        g += c2 * tl.dot(e2, u_k2, input_precision=DOT_PRECISION)
        g += c3 * tl.dot(e2 * d1, u_k2 * u_k, input_precision=DOT_PRECISION)
        return g
    return slope * tl.dot(e1, u_k, input_precision=DOT_PRECISION)


@triton.jit
def _grad_stored(w, d1, x, u, c1, c2, c3, slope, GRAD_POLY: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """∂L/∂u (TPA, BLOCK_D) of a stored row: Σ_t w[t, s]·x[t, :]·∂cell/∂u, for K (w = dS, x = q) and V (w = A, x = dP)."""
    e1 = w * d1
    g1 = tl.dot(tl.trans(e1), x, input_precision=DOT_PRECISION)
    if GRAD_POLY:
        e2 = e1 * d1
        g2 = tl.dot(tl.trans(e2), x, input_precision=DOT_PRECISION)
        g3 = tl.dot(tl.trans(e2 * d1), x, input_precision=DOT_PRECISION)
        return c1 * g1 + u * (2.0 * c2 * g2 + 3.0 * c3 * (u * g3))
    return slope * g1


@triton.jit
def gaincell_prefill_fwd(
    Q, K, V, Out, Den, Off,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sob, soh, sot, sod,
    H, T, D, GROUPS, W, N_TILES,
    c0, c1, c2, c3, slope, y_mid, u_one, score_scale, score_offset, offset_slope, offset_ref, rate,
    av_scale, av_low, av_high, av_step, av_anchor,
    NONLINEAR: tl.constexpr, LEAK: tl.constexpr, AV_LEVELS: tl.constexpr, NORMALIZE: tl.constexpr,
    HEAD_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, TPA: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if HEAD_OFFSETS:  # this query head's own HardSigmoid offset
        score_offset += tl.load(Off + h)
    hk = h // GROUPS  # the KV head (array pair) this query head drives
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_offset = _row_offset(offs_m, W, score_offset, offset_slope, offset_ref)
    offs_n = tl.arange(0, TPA)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BM, BD) pulse widths
    q_sum = tl.sum(q, 1)  # the polynomial's constant term: the same for every key
    out = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)

    m_last = tl.minimum(m0 + BLOCK_M, T) - 1
    r_first = tl.maximum(m0 - W + 1, 0) // TPA  # first key row inside some query's window
    r_last = m_last // TPA
    r_stop = tl.minimum(r_last + 1, r_first + N_TILES)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for r in range(r_first, r_stop):  # one array (tile) per iteration
        cols, ones, seen = _array_charge(q, q_sum, k_base, v_base, r, r_last, offs_m, m_ok, offs_n, offs_d,
                                         skt, skd, svt, svd, T, D, W, N_TILES, y_mid, u_one,
                                         c0, c1, c2, c3, slope, score_scale, row_offset, rate,
                                         NONLINEAR, LEAK, NORMALIZE, TPA, DOT_PRECISION)
        read = seen > 0  # an array holding no visible key is not read
        out += tl.where(read[:, None], _readout(cols, av_scale, av_low, av_high, av_step, av_anchor, AV_LEVELS), 0.0)
        if NORMALIZE:
            den += tl.where(read, _readout(ones, av_scale, av_low, av_high, av_step, av_anchor, AV_LEVELS), 0.0)

    if NORMALIZE:  # output ÷ ΣA read-out, 0 where it reads ≤ 0 (no key seen)
        out = tl.where(den[:, None] > 0.0, out / tl.maximum(den, TINY)[:, None], 0.0)
        tl.store(Den + pid_bh * T + offs_m, den, mask=m_ok)
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod, out,
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _query_block(Q, GN, GD, b, h, H, T, offs_m, offs_d, m_ok, md_ok,
                 sqb, sqh, sqt, sqd, sgb, sgh, sgt, sgd, BLOCK_M: tl.constexpr, NORMALIZE: tl.constexpr):
    """A block of queries (and Σ_d q) with the gradients of their tile sums and, normalised, of their ΣA read-outs; fp32."""
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=md_ok, other=0.0).to(tl.float32)
    gn = tl.load(GN + b * sgb + h * sgh + offs_m[:, None] * sgt + offs_d[None, :] * sgd, mask=md_ok, other=0.0).to(tl.float32)
    if NORMALIZE:
        gd = tl.load(GD + (b * H + h) * T + offs_m, mask=m_ok, other=0.0).to(tl.float32)
    else:
        gd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return q, tl.sum(q, 1), gn, gd


@triton.jit
def gaincell_bwd_dq(
    Q, K, V, GN, GD, DQ, Off, DOff,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sgb, sgh, sgt, sgd,
    H, T, D, GROUPS, W, N_TILES,
    c0, c1, c2, c3, slope, y_mid, u_one, score_scale, score_offset, offset_slope, offset_ref, rate,
    av_scale, av_low, av_high,
    NONLINEAR: tl.constexpr, GRAD_POLY: tl.constexpr, LEAK: tl.constexpr, NORMALIZE: tl.constexpr,
    HEAD_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, TPA: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq of BLOCK_M queries of one (batch, query head); GN/GD are the gradients of the tile sums, DQ (B, H, T, D) contiguous.

    With HEAD_OFFSETS, DOff (B·H, query blocks) gets this block's share of ∂L/∂(the head's offset): Σ ∂L/∂x.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if HEAD_OFFSETS:
        score_offset += tl.load(Off + h)
    hk = h // GROUPS
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_offset = _row_offset(offs_m, W, score_offset, offset_slope, offset_ref)
    offs_n = tl.arange(0, TPA)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]

    q, q_sum, gn, gd = _query_block(Q, GN, GD, b, h, H, T, offs_m, offs_d, m_ok, md_ok,
                                    sqb, sqh, sqt, sqd, sgb, sgh, sgt, sgd, BLOCK_M, NORMALIZE)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dx = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ over keys of ∂L/∂x, the HardSigmoid input

    m_last = tl.minimum(m0 + BLOCK_M, T) - 1
    r_first = tl.maximum(m0 - W + 1, 0) // TPA
    r_last = m_last // TPA
    r_stop = tl.minimum(r_last + 1, r_first + N_TILES)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for r in range(r_first, r_stop):
        dp, dp_one = _array_grad(q, q_sum, k_base, v_base, r, r_last, offs_m, m_ok, offs_n, offs_d,
                                 skt, skd, svt, svd, T, D, W, N_TILES, y_mid, u_one,
                                 c0, c1, c2, c3, slope, score_scale, row_offset, rate, av_scale, av_low, av_high,
                                 gn, gd, NONLINEAR, LEAK, NORMALIZE, TPA, DOT_PRECISION)
        for rr in range(r, r_last + 1, N_TILES):  # second pass over the array's rows: A and scores again
            offs_s = rr * TPA + offs_n
            u_k = _stored(k_base, offs_s, offs_d, skt, skd, T, D, y_mid)
            u_v = _stored(v_base, offs_s, offs_d, svt, svd, T, D, y_mid)
            x, _, d1, keep = _activation(q, q_sum, u_k, offs_m, offs_s, m_ok, T, W, c0, c1, c2, c3, slope,
                                         score_scale, row_offset, rate, NONLINEAR, LEAK, DOT_PRECISION)
            da = _grad_a(dp, dp_one, u_v, u_one, d1, c0, c1, c2, c3, slope, GRAD_POLY, NORMALIZE, DOT_PRECISION)
            ds = _grad_score(da, x, keep, score_scale)
            dq += _grad_q(ds, d1, u_k, c0, c1, c2, c3, slope, GRAD_POLY, DOT_PRECISION)
            if HEAD_OFFSETS:
                dx += tl.sum(ds, 1)

    tl.store(DQ + pid_bh * T * D + offs_m[:, None] * D + offs_d[None, :], dq, mask=md_ok)
    if HEAD_OFFSETS:  # ds = score_scale · ∂L/∂x
        tl.store(DOff + pid_bh * tl.num_programs(0) + pid_m, tl.sum(dx, 0) / score_scale)


@triton.jit
def gaincell_bwd_dkdv(
    Q, K, V, GN, GD, DK, DV, Off,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sgb, sgh, sgt, sgd,
    H, T, D, GROUPS, W, N_TILES,
    c0, c1, c2, c3, slope, y_mid, u_one, score_scale, score_offset, offset_slope, offset_ref, rate,
    av_scale, av_low, av_high,
    NONLINEAR: tl.constexpr, GRAD_POLY: tl.constexpr, LEAK: tl.constexpr, NORMALIZE: tl.constexpr,
    HEAD_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, TPA: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dk, dv of one key row (TPA tokens) of one (batch, KV head), summed over its query heads; DK, DV (B, Hkv, T, D) contiguous."""
    r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // (H // GROUPS)
    hk = pid_bh % (H // GROUPS)
    offs_n = tl.arange(0, TPA)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = r * TPA + offs_n
    d_ok = offs_d < D
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    u_k = _stored(k_base, offs_s, offs_d, skt, skd, T, D, y_mid)  # (TPA, BD) this row
    u_v = _stored(v_base, offs_s, offs_d, svt, svd, T, D, y_mid)
    dk = tl.zeros((TPA, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((TPA, BLOCK_D), dtype=tl.float32)

    m_start = r * TPA  # the row's first key is seen first by itself
    m_stop = tl.minimum(T, r * TPA + TPA - 1 + W)  # … and its last key last by the query W − 1 tokens later
    for g in range(GROUPS):
        h = hk * GROUPS + g
        off_h = score_offset
        if HEAD_OFFSETS:
            off_h += tl.load(Off + h)
        for m0 in range(m_start, m_stop, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_offset = _row_offset(offs_m, W, off_h, offset_slope, offset_ref)
            m_ok = offs_m < T
            md_ok = m_ok[:, None] & d_ok[None, :]
            q, q_sum, gn, gd = _query_block(Q, GN, GD, b, h, H, T, offs_m, offs_d, m_ok, md_ok,
                                            sqb, sqh, sqt, sqd, sgb, sgh, sgt, sgd, BLOCK_M, NORMALIZE)
            m_last = tl.minimum(m0 + BLOCK_M, T) - 1
            r_first = tl.maximum(m0 - W + 1, 0) // TPA
            r_last = m_last // TPA
            r0 = r - N_TILES * ((r - r_first) // N_TILES)  # the array's first row this block sees (r itself or a lap before)
            dp, dp_one = _array_grad(q, q_sum, k_base, v_base, r0, r_last, offs_m, m_ok, offs_n, offs_d,
                                     skt, skd, svt, svd, T, D, W, N_TILES, y_mid, u_one,
                                     c0, c1, c2, c3, slope, score_scale, row_offset, rate, av_scale, av_low, av_high,
                                     gn, gd, NONLINEAR, LEAK, NORMALIZE, TPA, DOT_PRECISION)
            x, a, d1, keep = _activation(q, q_sum, u_k, offs_m, offs_s, m_ok, T, W, c0, c1, c2, c3, slope,
                                         score_scale, row_offset, rate, NONLINEAR, LEAK, DOT_PRECISION)
            dv += _grad_stored(a, d1, dp, u_v, c1, c2, c3, slope, GRAD_POLY, DOT_PRECISION)
            da = _grad_a(dp, dp_one, u_v, u_one, d1, c0, c1, c2, c3, slope, GRAD_POLY, NORMALIZE, DOT_PRECISION)
            ds = _grad_score(da, x, keep, score_scale)
            dk += _grad_stored(ds, d1, q, u_k, c1, c2, c3, slope, GRAD_POLY, DOT_PRECISION)

    sd_ok = (offs_s < T)[:, None] & d_ok[None, :]
    tl.store(DK + pid_bh * T * D + offs_s[:, None] * D + offs_d[None, :], dk, mask=sd_ok)
    tl.store(DV + pid_bh * T * D + offs_s[:, None] * D + offs_d[None, :], dv, mask=sd_ok)
