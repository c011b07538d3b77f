"""Triton kernel of the sparse exact recompute (prune-and-recompute); the launcher is `cimattn.kernels.sparse`.

One program computes BLOCK_M consecutive queries of one (batch, query head).
It visits only the key blocks of BLOCK_N keys listed for its query block
(those where some of its queries keep a key) and runs FlashAttention's
online softmax over them: logits of keys its row does not keep are −inf.
Everything is fp32 in registers; nothing (T, S)-sized is written.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sparse_attention_fwd(
    Q, K, V, Keep, Blocks, Counts, Out,
    sqb, sqh, sqt, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    smb, smh, smt, sms,
    sbb, sbh, sbm, sbn,
    scb, sch, scm,
    sob, soh, sot, sod,
    H, T, S, D, GROUPS, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 offsets: a keep mask of a long calibration call exceeds 2³¹ bytes
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUPS  # the KV head this query head reads, as expand_kv pairs them
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    q = q * scaling  # the torch path scales q before its matmul: the same rounding
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row maximum of the kept logits
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running Σ exp(logit − m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    keep_base = Keep + b * smb + h * smh + offs_m[:, None].to(tl.int64) * smt
    list_base = Blocks + b * sbb + h * sbh + pid_m * sbm
    n_blocks = tl.load(Counts + b * scb + h * sch + pid_m * scm)
    for i in range(n_blocks):  # only key blocks in which some query of this block keeps a key
        j = tl.load(list_base + i * sbn)
        offs_s = j * BLOCK_N + offs_n
        s_ok = offs_s < S
        kv_mask = s_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_s[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + offs_s[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0).to(tl.float32)
        keep = tl.load(keep_base + offs_s[None, :] * sms, mask=m_ok[:, None] & s_ok[None, :], other=0) != 0

        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BM, BN)
        logits = tl.where(keep, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing kept yet: exp(−inf) = 0, not NaN
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(logits - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    kept = l_i > 0.0  # a query that keeps no key (padding) attends to nothing
    out = tl.where(kept[:, None], acc / tl.where(kept, l_i, 1.0)[:, None], 0.0)
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod, out,
             mask=m_ok[:, None] & d_ok[None, :])
