"""Triton kernel of the fused gain-cell attention forward (prefill); the launcher is `cimattn.kernels.gaincell`.

One program computes BLOCK_M consecutive queries of one (batch, query head)
against the key rows of TPA (= tokens_per_array) tokens that hold a key in
any of their windows.  Rows of the same array (window laps: row r and
r + N_TILES) are accumulated together before the array's read-out, which
scales, clamps and quantises it — as `_tile_readouts` of the torch
reference.  Everything is fp32 in registers; nothing (T, S)-sized is stored.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(x):
    """torch.round: nearest integer, ties to even (x − floor(x) is exact, so no x + 0.5 rounding trap)."""
    r = tl.floor(x)
    f = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


@triton.jit
def gaincell_prefill_fwd(
    Q, K, V, Out,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sob, soh, sot, sod,
    H, T, D, GROUPS, W, N_TILES,
    c0, c1, c2, c3, slope, y_mid, score_scale, score_offset, rate,
    av_scale, av_low, av_high, av_step, av_anchor,
    NONLINEAR: tl.constexpr, LEAK: tl.constexpr, AV_LEVELS: tl.constexpr,
    BLOCK_M: tl.constexpr, TPA: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUPS  # the KV head (array pair) this query head drives
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, TPA)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BM, BD) pulse widths
    q_sum = tl.sum(q, 1)  # the polynomial's constant term: the same for every key
    out = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    m_last = tl.minimum(m0 + BLOCK_M, T) - 1
    r_first = tl.maximum(m0 - W + 1, 0) // TPA  # first key row inside some query's window
    r_last = m_last // TPA
    r_stop = tl.minimum(r_last + 1, r_first + N_TILES)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for r in range(r_first, r_stop):  # one array (tile) per iteration
        tile = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        seen = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for rr in range(r, r_last + 1, N_TILES):  # the rows this array holds over window laps
            offs_s = rr * TPA + offs_n
            s_ok = offs_s < T
            age = offs_m[:, None] - offs_s[None, :]  # (BM, TPA) tokens since the key was written
            keep = (age >= 0) & (age < W) & s_ok[None, :] & m_ok[:, None]
            kv_mask = s_ok[:, None] & d_ok[None, :]
            u_k = tl.load(k_base + offs_s[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0).to(tl.float32) - y_mid
            u_v = tl.load(v_base + offs_s[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0).to(tl.float32) - y_mid
            u_k = tl.where(kv_mask, u_k, 0.0)  # padding cells hold no charge
            u_v = tl.where(kv_mask, u_v, 0.0)
            if LEAK:
                d1 = tl.exp(-rate * tl.maximum(age, 0).to(tl.float32))  # exp(−rate·age); future keys are masked
            else:
                d1 = tl.full((BLOCK_M, TPA), 1.0, tl.float32)

            m1 = tl.dot(q, tl.trans(u_k), input_precision=DOT_PRECISION)  # (BM, TPA) Σ_d q·u
            if NONLINEAR:
                u_k2 = u_k * u_k
                m2 = tl.dot(q, tl.trans(u_k2), input_precision=DOT_PRECISION)
                m3 = tl.dot(q, tl.trans(u_k2 * u_k), input_precision=DOT_PRECISION)
                d2 = d1 * d1
                score = c1 * (d1 * m1) + c0 * q_sum[:, None] + c2 * (d2 * m2) + c3 * (d2 * d1 * m3)
            else:
                score = slope * (d1 * m1)
            a = tl.minimum(tl.maximum(score_scale * score + score_offset, 0.0), 1.0)  # HardSigmoid
            a = tl.where(keep, a, 0.0)
            seen += tl.sum(keep.to(tl.int32), 1)

            p1 = a * d1
            if NONLINEAR:
                u_v2 = u_v * u_v
                p2 = p1 * d1
                partial = c1 * tl.dot(p1, u_v, input_precision=DOT_PRECISION) + c0 * tl.sum(a, 1)[:, None]
                partial += c2 * tl.dot(p2, u_v2, input_precision=DOT_PRECISION)
                partial += c3 * tl.dot(p2 * d1, u_v2 * u_v, input_precision=DOT_PRECISION)
            else:
                partial = slope * tl.dot(p1, u_v, input_precision=DOT_PRECISION)
            tile += partial

        x = tl.minimum(tl.maximum(av_scale * tile, av_low), av_high)  # the array's read-out: scale, clamp,
        if AV_LEVELS:  # quantise (ADC)
            x = _round_half_even((x - av_anchor) / av_step) * av_step + av_anchor
        out += tl.where(seen[:, None] > 0, x, 0.0)  # an array holding no visible key is not read

    tl.store(Out + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod, out,
             mask=m_ok[:, None] & d_ok[None, :])
