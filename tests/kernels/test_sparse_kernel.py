"""The sparse recompute Triton kernel against the torch path of prune-and-recompute, in Triton's interpreter.

Criterion (issues 6 and 9, flash-attention's tests): the kernel's error
against the torch reference in fp64 is at most 2× the torch fp32 reference's
own error, plus FLOOR (1e-12) for cases where that error is exactly 0 (a
query keeping a single key returns its value exactly).  The reference is
the torch path's own arithmetic (`torch_recompute`, and
`prune_recompute_attention` with backend="torch").  Shapes are tiny
(interpreter: numpy per program).  On a GPU machine,
`TRITON_INTERPRET=0 pytest tests/kernels` runs the same tests compiled on CUDA.
"""

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels then run on CPU tensors
triton = pytest.importorskip("triton")

from torch import nn

from cimattn.attention.common import expand_kv, keep_mask
from cimattn.attention.prune_recompute import (
    PruneRecomputeParams,
    collect_telemetry,
    prune_recompute_attention,
)
from cimattn.config import PruneRecompute, Scorer, Selection, load_preset
from cimattn.errors import CimattnError
from cimattn.kernels.sparse import kept_blocks, sparse_attention, unsupported

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1")

FLOOR = 1e-12
SCALING = 0.3


def inputs(b=2, h=4, hkv=2, t=40, s=40, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, m, d, generator=gen, dtype=torch.float64) for n, m in ((h, t), (hkv, s), (hkv, s)))


def torch_recompute(q, k, v, keep, scaling, dtype):
    """The torch path's recompute (prune_recompute_attention) in `dtype`: softmax over the kept logits, then · v."""
    q, k, v = (x.to(dtype) for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    logits = torch.where(keep, torch.matmul(q * scaling, expand_kv(k, groups).transpose(-1, -2)), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, expand_kv(v, groups)).double()


def kernel(q, k, v, keep, scaling=SCALING, dtype=torch.float32, **kw):
    with torch.no_grad():
        out = sparse_attention(*(x.to(DEVICE, dtype) for x in (q, k, v)), keep.to(DEVICE), scaling, **kw)
    return out.double().cpu()


def visible(b, t, s, pad=0, window=None):
    """(B, 1, T, S) causal mask (the last T positions of S); sequence 1 left-padded by `pad` tokens."""
    mask = keep_mask(None, torch.empty(1, 1, t, 1), torch.empty(1, 1, s, 1), window).repeat(b, 1, 1, 1)
    mask[1:, :, :, :pad] = False
    mask[1:, :, : max(0, pad - (s - t)), :] = False  # padded queries see nothing
    return mask


def random_keep(vis, h, rate, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(vis.shape[0], h, *vis.shape[2:], generator=gen) < rate) & vis


CASES = {  # name: (shape, keep rate (1 = keep all), padding, sliding window, block_n)
    "keep all, causal": ({}, 1.0, 0, None, 16),
    "random sparse": ({}, 0.3, 0, None, 16),
    "random sparse, GQA 4:1, padding": ({"h": 4, "hkv": 1}, 0.3, 7, None, 16),
    "very sparse, sliding window, MHA": ({"h": 2, "hkv": 2, "t": 48, "s": 48}, 0.1, 0, 20, 16),
    "decode over a cache, padding": ({"t": 1, "s": 50}, 0.4, 5, None, 16),
    "chunk over a cache, wide blocks": ({"t": 20, "s": 52, "d": 24}, 0.5, 3, None, 32),
}


@pytest.mark.parametrize("case", CASES)
def test_error_vs_fp64_at_most_twice_torch_fp32(case):
    shape, rate, pad, window, block_n = CASES[case]
    q, k, v = inputs(**shape)
    b, h, t, _ = q.shape
    keep = random_keep(visible(b, t, k.shape[2], pad, window), h, rate)
    ref64 = torch_recompute(q, k, v, keep, SCALING, torch.float64)
    ref32 = torch_recompute(q, k, v, keep, SCALING, torch.float32)
    out = kernel(q, k, v, keep, block_n=block_n)
    torch_err = (ref32 - ref64).abs().max().item()
    kernel_err = (out - ref64).abs().max().item()
    assert ref64.abs().max() > 0.1  # not trivially zero
    assert kernel_err <= 2 * torch_err + FLOOR, (kernel_err, torch_err)
    if pad:
        assert (out[1, :, ~keep[1].any(-1).any(0)] == 0).all()  # queries that keep nothing attend to nothing


def test_keep_all_is_full_softmax_attention():
    q, k, v = inputs(h=4, hkv=2)
    causal = visible(2, 40, 40)
    ref = F.scaled_dot_product_attention(q, expand_kv(k, 2), expand_kv(v, 2), attn_mask=causal, scale=SCALING)
    torch.testing.assert_close(kernel(q, k, v, causal), ref, rtol=0, atol=1e-5)


def test_skipped_blocks_are_never_read():
    """Keys of blocks no query of a query block keeps hold NaN: a block read by mistake would poison the output."""
    q, k, v = inputs(b=1, h=2, hkv=1, t=32, s=64)
    keep = torch.zeros(1, 2, 32, 64, dtype=torch.bool)
    keep[:, :, :16, 0:10] = True  # query block 0 keeps keys in block 0 only,
    keep[:, 1, 16:, 40:44] = True  # query block 1 in block 2 (head 1) or nothing (head 0)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[..., 16:32, :] = float("nan")  # blocks 1 and 3 (16 keys each) are never kept
    poisoned_v[..., 16:32, :] = float("nan")
    poisoned_k[..., 48:, :] = float("nan")
    poisoned_v[..., 48:, :] = float("nan")
    counts, blocks = kept_blocks(keep, 16, 16)
    assert counts.tolist() == [[[1, 0], [1, 1]]]
    assert blocks[0, 1, 1, 0] == 2
    out = kernel(q, poisoned_k, poisoned_v, keep, block_n=16, block_m=16)
    assert torch.isfinite(out).all()
    ref = torch_recompute(q, k, v, keep, SCALING, torch.float64)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (out[0, 0, 16:] == 0).all()


def test_block_size_and_broadcast_mask_do_not_change_the_result():
    q, k, v = inputs(t=40, s=40)
    keep = random_keep(visible(2, 40, 40, pad=4), 1, 0.4)  # (B, 1, T, S): one mask for every head
    a = kernel(q, k, v, keep, block_m=16, block_n=16)
    c = kernel(q, k, v, keep.expand(2, 4, 40, 40).contiguous(), block_m=64, block_n=32)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_half_precision_inputs_are_computed_in_fp32():
    """bf16 inputs (as on a GPU): the kernel loads them as stored and computes in fp32, as the torch path promotes them."""
    q, k, v = (x.to(torch.bfloat16).double() for x in inputs())  # values representable in bf16
    keep = random_keep(visible(2, 40, 40, pad=3), 4, 0.3)
    ref64 = torch_recompute(q, k, v, keep, SCALING, torch.float64)
    ref32 = torch_recompute(q, k, v, keep, SCALING, torch.float32)
    out = kernel(q, k, v, keep, dtype=torch.bfloat16, block_n=16)
    assert (out - ref64).abs().max() <= 2 * (ref32 - ref64).abs().max() + FLOOR


# ---------------------------------------------------------------- through prune_recompute_attention


def attend(selection, q, k, v, mask, recompute, dtype, **kw):
    module = nn.Module()
    module.cim = PruneRecomputeParams(PruneRecompute(scorer=Scorer(kind="random"), selection=selection), q.shape[1], k.shape[1], q.shape[-1]).to(DEVICE)
    module.cim.backend = recompute
    with torch.no_grad():
        out, _ = prune_recompute_attention(module, *(x.to(DEVICE, dtype) for x in (q, k, v)), mask if mask is None else mask.to(DEVICE),
                                           scaling=SCALING, **kw)
    return out.double().cpu()


@pytest.mark.parametrize("window", [None, 12])
def test_prune_recompute_attention_with_the_kernel(window):
    """The dispatch: GQA, left padding, a sliding window; random selection (the same keys in fp32 and fp64)."""
    q, k, v = inputs(h=4, hkv=2, t=40, s=40)
    mask = visible(2, 40, 40, pad=5)
    selection = Selection(rule="keep_rate", keep_rate=0.3, recent_tokens=1)
    ref64 = attend(selection, q, k, v, mask, "torch", torch.float64, sliding_window=window)
    ref32 = attend(selection, q, k, v, mask, "torch", torch.float32, sliding_window=window)
    out = attend(selection, q, k, v, mask, "triton", torch.float32, sliding_window=window)
    assert out.shape == (2, 40, 4, 16)
    assert (out - ref64).abs().max() <= 2 * (ref32 - ref64).abs().max() + FLOOR
    assert (out[1, :4] == 0).all()  # padded queries see no key


@pytest.mark.parametrize("preset", ["sprint", "hyatt", "exact oracle"])
def test_kernel_and_torch_recompute_agree_on_the_presets(preset):
    """Analog scorers (the kernel path then skips the dense exact logits) and the exact oracle, calibrated to 25 %."""
    cfg = load_preset("sprint" if preset == "exact oracle" else preset).prune_recompute
    if preset == "exact oracle":
        cfg = cfg.model_copy(update={"scorer": Scorer(kind="exact")})
    q, k, v = (x.float().to(DEVICE) for x in inputs(h=4, hkv=2, t=80, s=80))  # 2 × 2 blocks of 64: the causal corner is skipped
    module = nn.Module()
    module.cim = PruneRecomputeParams(cfg, 4, 2, 16).to(DEVICE)
    module.cim.calibrate_to = 0.25
    with torch.no_grad():
        prune_recompute_attention(module, q, k, v, None)
        module.cim.calibrate_to = None
        outs = {}
        for recompute in ("torch", "triton"):
            module.cim.backend = recompute
            with collect_telemetry(module) as telemetry:
                outs[recompute] = prune_recompute_attention(module, q, k, v, None)[0].cpu()
    assert telemetry.summary()["keep_rate"] < 0.6  # pruned
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=0, atol=1e-5)


def test_unsupported_calls_are_named(monkeypatch):
    q, k, v = (x.float().to(DEVICE) for x in inputs())
    keep = visible(2, 40, 40).expand(2, 4, 40, 40).to(DEVICE)
    assert unsupported(q, k, v, keep) is None
    assert "float64" in unsupported(q.double(), k.double(), v.double(), keep)
    assert "boolean" in unsupported(q, k, v, keep.float())
    assert "broadcastable" in unsupported(q, k, v, keep[..., :30])
    assert "heads" in unsupported(q[:, :3], k, v, keep[:, :3])
    assert "grad" in unsupported(q.requires_grad_(), k, v, keep)
    with pytest.raises(CimattnError, match="power of two"):
        sparse_attention(q.detach(), k, v, keep, SCALING, block_n=24)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in unsupported(q.detach().cpu(), k.cpu(), v.cpu(), keep.cpu())
    if not torch.cuda.is_available():  # forcing the kernel on CPU names the reason; "auto" falls back to torch
        selection = Selection(rule="keep_rate", keep_rate=0.5)
        with pytest.raises(CimattnError, match="CUDA"):
            attend(selection, q, k, v, None, "triton", torch.float32)
        attend(selection, q, k, v, None, "auto", torch.float32)
    with pytest.raises(CimattnError, match="attention backend"):
        attend(Selection(), q, k, v, None, "cuda", torch.float32)
