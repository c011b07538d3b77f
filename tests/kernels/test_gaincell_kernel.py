"""The fused gain-cell Triton forward against the torch reference (`gaincell_attention`), in Triton's interpreter.

Criterion (issue 9, flash-attention's tests): the kernel's error against the
torch reference in fp64 is at most 2× the torch fp32 reference's own error.
Shapes are tiny (interpreter: numpy per program); the read-out ADC's rounding
is switched off for that comparison (a bin edge flips either way at fp32), and
checked separately: mismatches are rare single ADC steps.  On a GPU machine,
`TRITON_INTERPRET=0 pytest tests/kernels` runs the same tests compiled on CUDA.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels then run on CPU tensors
triton = pytest.importorskip("triton")

from cimattn.attention.gaincell import GainCellParams, gaincell_attention
from cimattn.config import load_preset
from cimattn.config.schema import GainCell
from cimattn.errors import CimattnError
from cimattn.kernels import gaincell_prefill, unsupported
from cimattn.physics.quantize import quantize

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1")

B, H, HKV, D = 1, 2, 1, 16  # GQA: two query heads per KV head


def physics(**changes):
    """leroux-gaincell physics shrunk to tiny arrays: 16-token arrays, a 32-token window (2 arrays).

    rate_per_token sets a visible leak at these tiny ages (τ = step time / rate).
    """
    cfg = load_preset("leroux-gaincell").gaincell.model_dump()
    rate = changes.pop("rate_per_token", None)
    cfg.update({"window_tokens": 32, "tokens_per_array": 16, **changes})
    if rate is not None:
        cfg["leakage"]["tau_s"] = cfg["leakage"]["step_time_s"] / rate
    return GainCell.model_validate(cfg)


def inputs(t, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = 0.5 + 0.35 * torch.randn(B, H, t, D, generator=gen, dtype=torch.float64)  # pulses mostly inside [0, 1]
    k = 0.3 * torch.randn(B, HKV, t, D, generator=gen, dtype=torch.float64)  # + the key scaler's 0.45
    v = 0.3 * torch.randn(B, HKV, t, D, generator=gen, dtype=torch.float64)
    return q, k, v


def reference(cfg, q, k, v, dtype, cell=None):
    """gaincell_attention in `dtype` → (B, H, T, D), and the quantised inputs it used (for the kernel)."""
    module = torch.nn.Module()
    module.cim = GainCellParams(cfg, H, HKV, D)
    if cell:
        module.cim.cell = cell
    with torch.no_grad():
        out, _ = gaincell_attention(module, q.to(dtype), k.to(dtype), v.to(dtype), None)
        cim = module.cim
        quantised = [quantize(cim.scale(n, x.to(dtype)), getattr(cfg, n)) for n, x in (("q", q), ("k", k), ("v", v))]
    return out.transpose(1, 2).double(), quantised  # the output scaler is the identity at its preset init


def kernel(cfg, quantised, cell=None, block_m=16):
    with torch.no_grad():
        out = gaincell_prefill(*(x.float().to(DEVICE) for x in quantised), cfg, cell=cell, block_m=block_m)
    return out.double().cpu()


NO_ROUNDING = {"low": -1.0, "high": 1.0, "levels": None}  # the read-out ADC's range without its rounding (module docstring)
CASES = {
    "nonlinear, leak, laps": ({"rate_per_token": 0.02}, None, 56),
    "nonlinear, no leak": ({"leakage": {"tau_s": None}}, None, 32),
    "linear cell, leak": ({"rate_per_token": 0.05}, "linear", 40),
    "score offset, clamp active": ({"score_offset": 0.2, "av_tile_scale": 0.08, "rate_per_token": 0.01}, None, 48),
}


@pytest.mark.parametrize("case", CASES)
def test_error_vs_fp64_at_most_twice_torch_fp32(case):
    changes, cell, t = CASES[case]
    cfg = physics(**changes, av_out=NO_ROUNDING)
    q, k, v = inputs(t)
    ref64, quantised = reference(cfg, q, k, v, torch.float64, cell)
    ref32, _ = reference(cfg, q, k, v, torch.float32, cell)
    out = kernel(cfg, quantised, cell)
    torch_err = (ref32 - ref64).abs().max().item()
    kernel_err = (out - ref64).abs().max().item()
    assert ref64.abs().max() > 0.1  # the outputs are not trivially zero
    assert kernel_err <= 2 * torch_err + 1e-12, (kernel_err, torch_err)


def test_quantised_readout_differs_only_by_rare_single_steps():
    cfg = physics(rate_per_token=0.02)
    q, k, v = inputs(56, seed=1)
    ref64, quantised = reference(cfg, q, k, v, torch.float64)
    out = kernel(cfg, quantised)
    step = cfg.av_out.step
    diff = (out - ref64).abs()
    assert (ref64 / step - (ref64 / step).round()).abs().max() < 1e-6 * 64  # on the ADC grid (sums of tile levels)
    assert diff.max() <= step + 1e-6  # at most one bin-edge flip per output
    assert (diff > 1e-6).float().mean() < 0.01


def test_block_size_does_not_change_the_result():
    cfg = physics(rate_per_token=0.02, av_out=NO_ROUNDING)
    _, quantised = reference(cfg, *inputs(56), torch.float64)
    torch.testing.assert_close(kernel(cfg, quantised, block_m=16), kernel(cfg, quantised, block_m=32), rtol=1e-5, atol=1e-5)


def test_unsupported_configurations_are_named():
    cfg = physics()
    q, k, v = (x.float().to(DEVICE) for x in inputs(32))
    assert unsupported(cfg, q, k, v) is None
    noisy = physics(noise={"read_std": 0.01})
    assert "noise" in unsupported(noisy, q, k, v)
    assert "normalize" in unsupported(physics(normalize=True), q, k, v)
    assert "cache" in unsupported(cfg, q[:, :, -1:], k, v)
    assert "tokens_per_array" in unsupported(physics(tokens_per_array=8), q, k, v)
    padded = torch.ones(1, 1, 32, 32, dtype=torch.bool, device=DEVICE).tril()
    padded[..., 0] = False
    assert "mask" in unsupported(cfg, q, k, v, keep=padded)
    assert unsupported(cfg, q, k, v, keep=torch.ones_like(padded).tril()) is None  # plain causal (window 32 ≥ T)
    assert "position ids" in unsupported(cfg, q, k, v, offsets=torch.tensor([3]))
    with pytest.raises(CimattnError, match="noise"):
        gaincell_prefill(q, k, v, noisy)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (x.float() for x in inputs(16))
    assert "CUDA" in unsupported(physics(), q, k, v)
