"""Fused gain-cell attention for prefill (Triton), forward and backward; the torch reference is `cimattn.attention.gaincell`.

`gaincell_prefill` computes what `_attend_block` of the reference computes
for every query of an unpadded prompt, in one kernel launch: the digital sum
of the per-array A·V read-outs (divided by the ΣA column's with
`normalize`), before the output scaler.  It is differentiable: a
`torch.autograd.Function` whose backward runs two Triton kernels (dq; dk and
dv) and gives the gradients torch autograd gives through the reference.
`unsupported` says, in one line, why a call cannot take the kernel (None
when it can), so the attention function can fall back to the torch path.
"""

from __future__ import annotations

import torch

from cimattn.config.schema import GainCell
from cimattn.errors import CimattnError
from cimattn.kernels.common import MAX_HEAD_DIM, MIN_DOT, call_unsupported
from cimattn.physics.quantize import grid_anchor

BLOCK_M = 64  # queries per program: one array's worth of keys per step, as on the chip
# Warps per program.  Not timed (no GPU yet): sm_90 code compiled ahead of time on a CPU (triton 3.9, 64 × 64 blocks,
# ieee dots) has ~27k local-memory spill instructions in the forward with 4 warps, ~1.2k with 8; the backward kernels
# 13–29k in every block/warp setting tried (2.3–2.7k with tf32x3 dots), so a GPU session should time `precision` and this.
NUM_WARPS = 8


def unsupported(
    cfg: GainCell,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None = None,
    cell: str | None = None,
    offsets: torch.Tensor | None = None,
) -> str | None:
    """Why `gaincell_prefill(q, k, v, cfg)` cannot run (one line naming the field), or None when it can.

    `keep` (B or 1, 1, T, S), when given, must be the plain causal window
    (no padding): the kernel builds the mask from positions itself.
    `offsets` (B,), the reference's ring offsets, must be 0: token s sits in
    ring slot s mod W.  `cell` is accepted for symmetry with the launcher
    (both cells are supported).
    """
    reason = call_unsupported(q, k, v)
    if reason is not None:
        return reason
    b, _, t, d = q.shape
    if k.shape[2] != t:
        return f"{k.shape[2]} keys for {t} queries: the kernel covers prefill without a cache (decode takes the torch path)"
    tpa = cfg.tokens_per_array
    if tpa < MIN_DOT or tpa & (tpa - 1):
        return f"gaincell.tokens_per_array = {tpa}: the kernel needs a power of two ≥ {MIN_DOT}"
    if d > MAX_HEAD_DIM:
        return f"head dim {d}: the kernel holds a head in registers, at most {MAX_HEAD_DIM}"
    if cfg.noise.read_std or cfg.noise.cell_variability_std:
        return "gaincell.noise: read noise and cell variability take the torch path"
    if offsets is not None and bool(offsets.any()):
        return "position ids do not start at 0 (ring offsets): the torch path places the tokens"
    if keep is not None and not torch.equal(keep.expand(b, 1, t, t), _causal_window(t, cfg.window_tokens, keep.device).expand(b, 1, t, t)):
        return "the attention mask is not the plain causal window (padding): the torch path handles it"
    return None


def _causal_window(t: int, window: int, device: torch.device) -> torch.Tensor:
    age = torch.arange(t, device=device)[:, None] - torch.arange(t, device=device)[None, :]  # (T, T)
    return ((age >= 0) & (age < window))[None, None]


def gaincell_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: GainCell,
    cell: str | None = None,
    block_m: int = BLOCK_M,
    precision: str = "ieee",
    head_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gain-cell attention of an unpadded prompt: q (B, H, T, D), k, v (B, Hkv, T, D) → (B, H, T, D) fp32.

    Inputs are the quantised pulses q and stored voltages k, v (after the
    scalers and quantisers, as `gaincell_attention` makes them); the output
    is the digital sum of the A·V arrays' read-outs, before the output
    scaler — the value `_attend_block` returns.  Query t sees keys s with
    0 ≤ t − s < window_tokens; key s sits in array (s mod W) // tokens_per_array.

    Supported (else CimattnError naming the reason, see `unsupported`):
    CUDA tensors (or TRITON_INTERPRET=1); any batch, query/KV head counts
    (GQA), head dim ≤ 256; S = T (no cache) and no padding; prompts longer
    than the window (ring-buffer laps share an array before its read-out);
    `cell` "linear" or "nonlinear" (default cfg.cell), leakage on or off,
    any score scale / offset and `offset_per_doubling`, A·V tile scale and av_out quantiser (levels or
    none), `normalize` on or off; tokens_per_array a power of two ≥ 16; no
    read noise, no cell variability.  `head_offsets` (H,), when given (the
    parameters of `head_offsets: true`), adds each query head's HardSigmoid
    offset; it gets its gradient too.

    Differentiable in q, k, v: the backward gives the reference's autograd
    gradients — HardSigmoid clamp, the read-out ADC's straight-through clamp
    gradient, the ΣA division, and for the nonlinear cell the polynomial's
    own derivative (`cell_gradient: exact`) or the linear cell's (`linear`,
    the surrogate).  Arithmetic is fp32 whatever the input dtype (gradients
    come back in the inputs' dtypes); `precision` is tl.dot's input
    precision: "ieee" (default: exact fp32, the accuracy the tests hold) or,
    on GPUs, "tf32x3" / "tf32" (tensor cores, less accurate; not validated yet).
    """
    reason = unsupported(cfg, q, k, v, cell=cell)
    if reason is not None:
        raise CimattnError(f"gain-cell Triton kernel: {reason}")
    return _GainCellPrefill.apply(q, k, v, head_offsets, _Launch(cfg, cell or cfg.cell, block_m, precision))


class _Launch:
    """What every kernel of one call shares: shapes aside, the physics as kernel arguments."""

    def __init__(self, cfg: GainCell, kind: str, block_m: int, precision: str):
        self.cfg, self.block_m, self.precision = cfg, block_m, precision
        c = cfg.cell_polynomial()
        self.physics = (
            c[0], c[1], c[2], c[3], cfg.linear_slope, cfg.y_mid, cfg.v.high - cfg.y_mid,  # u of the all-ones column
            cfg.score_scale, cfg.score_offset, cfg.offset_per_doubling, float(cfg.offset_reference_keys), cfg.leakage.rate_per_token,
        )
        self.flags = {"NONLINEAR": kind == "nonlinear", "LEAK": cfg.leakage.rate_per_token > 0.0, "NORMALIZE": cfg.normalize}
        self.grad_poly = kind == "nonlinear" and cfg.cell_gradient == "exact"  # else the linear cell's gradient

    def shape(self, q: torch.Tensor, k: torch.Tensor) -> tuple:
        """H, T, D, GROUPS (query heads per KV head), W, N_TILES (arrays per window)."""
        _, h, t, d = q.shape
        return (h, t, d, h // k.shape[1], self.cfg.window_tokens, self.cfg.window_tokens // self.cfg.tokens_per_array)

    def blocks(self, d: int) -> dict:
        block_d = max(MIN_DOT, 1 << (d - 1).bit_length())
        return {"BLOCK_M": self.block_m, "TPA": self.cfg.tokens_per_array, "BLOCK_D": block_d, "DOT_PRECISION": self.precision}


class _GainCellPrefill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor | None, launch: _Launch) -> torch.Tensor:
        from cimattn.kernels.triton_gaincell import gaincell_prefill_fwd

        b, h, t, d = q.shape
        out = torch.empty((b, h, t, d), dtype=torch.float32, device=q.device)
        den = torch.empty((b, h, t) if launch.cfg.normalize else (1,), dtype=torch.float32, device=q.device)  # ΣA read-out
        off = _head_offsets(offsets, h, q.device)
        av = launch.cfg.av_out
        gaincell_prefill_fwd[(-(-t // launch.block_m), b * h)](
            q, k, v, out, den, off,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *launch.shape(q, k), *launch.physics,
            launch.cfg.av_tile_scale, av.low, av.high, av.step if av.levels is not None else 1.0, grid_anchor(av),
            AV_LEVELS=av.levels is not None, HEAD_OFFSETS=offsets is not None, **launch.flags, **launch.blocks(d),
            num_warps=NUM_WARPS,
        )
        ctx.save_for_backward(q, k, v, out, den, off)
        ctx.launch, ctx.offsets_dtype = launch, None if offsets is None else offsets.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from cimattn.kernels.triton_gaincell import gaincell_bwd_dkdv, gaincell_bwd_dq

        q, k, v, out, den, off = ctx.saved_tensors
        launch: _Launch = ctx.launch
        cfg = launch.cfg
        b, h, t, d = q.shape
        hkv = k.shape[1]
        grad = grad.float()
        if cfg.normalize:  # out = num / den where den > 0: the tile sums' gradients, as autograd divides them
            ok = den[..., None] > 0
            scale = torch.where(ok, 1.0 / den.clamp_min(torch.finfo(torch.float32).tiny)[..., None], 0.0)
            g_num = grad * scale  # (B, H, T, D)
            g_den = -(grad * out * scale).sum(-1).contiguous()  # (B, H, T): −Σ_d g·num / den²; the kernels index it flat
        else:
            g_num, g_den = grad, den
        dq = torch.empty((b, h, t, d), dtype=torch.float32, device=q.device)
        dk = torch.empty((b, hkv, t, d), dtype=torch.float32, device=q.device)
        dv = torch.empty_like(dk)
        av = (cfg.av_tile_scale, cfg.av_out.low, cfg.av_out.high)
        common = (*q.stride(), *k.stride(), *v.stride(), *g_num.stride())
        with_offsets = ctx.offsets_dtype is not None
        flags = {**launch.flags, "GRAD_POLY": launch.grad_poly, "HEAD_OFFSETS": with_offsets, **launch.blocks(d), "num_warps": NUM_WARPS}
        shape = launch.shape(q, k)
        blocks = -(-t // launch.block_m)
        d_off = torch.empty((b * h, blocks) if with_offsets else (1,), dtype=torch.float32, device=q.device)  # per query block
        gaincell_bwd_dq[(blocks, b * h)](q, k, v, g_num, g_den, dq, off, d_off, *common, *shape, *launch.physics, *av, **flags)
        gaincell_bwd_dkdv[(-(-t // cfg.tokens_per_array), b * hkv)](
            q, k, v, g_num, g_den, dk, dv, off, *common, *shape, *launch.physics, *av, **flags,
        )
        d_off = d_off.view(b, h, blocks).sum((0, 2)).to(ctx.offsets_dtype) if with_offsets else None  # summed in a fixed order
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_off, None


def _head_offsets(offsets: torch.Tensor | None, heads: int, device: torch.device) -> torch.Tensor:
    """The per-head HardSigmoid offsets as the kernels read them, (H,) fp32 (a placeholder without)."""
    if offsets is None:
        return torch.zeros(1, dtype=torch.float32, device=device)
    if offsets.shape != (heads,):
        raise CimattnError(f"head_offsets of shape {tuple(offsets.shape)} for {heads} query heads: give one per head")
    return offsets.detach().to(device=device, dtype=torch.float32).contiguous()
