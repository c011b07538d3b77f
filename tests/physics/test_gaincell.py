"""Gain-cell physics against hand computations from shared/PAPERS.md §1 (Leroux et al.)."""

import math

import pytest
import torch

from cimattn.config import GainCell, Leakage, Noise, Quantizer
from cimattn.physics import (
    Decay,
    cell,
    cell_scores,
    clamp,
    cell_weighted_sum,
    hard_sigmoid,
    leakage_decay,
    max_query_block,
    quantize,
    read_noise,
    tile_readout,
    variability_gain,
)

# PAPERS.md §1: Eq. 4 folded at V_in = 0.9 V, f(u) = 0.52136 + 13.6123 u − 2.62045 u² + 46.0548 u³
F_COEFFS = (0.52136, 13.6123, -2.62045, 46.0548)
LINEAR_SLOPE = 19.3  # PAPERS.md §1: the linear cell 19.3·x·u


def f(u):
    return sum(c * u**i for i, c in enumerate(F_COEFFS))


def off_edges(q: Quantizer, n: int, seed: int = 0) -> torch.Tensor:
    """Uniform samples over the clamp range and beyond, none within 1e-4 of a rounding edge."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=torch.float64) * 1.4 * (q.high - q.low) + q.low - 0.2 * (q.high - q.low)
    frac = torch.remainder(x / q.step, 1.0)
    return x[(frac - 0.5).abs() > 1e-4]


# ---- quantisation (PAPERS.md §1: scaler → clamp → quantise; straight-through gradient) ----

def test_query_dac_has_16_levels_of_one_fifteenth():
    """Q: clamp [0, 1], 16 levels, step 1/15."""
    q = GainCell().q
    assert q.step == pytest.approx(1 / 15)
    y = quantize(off_edges(q, 4000), q)
    k = y * 15
    assert torch.allclose(k, k.round(), atol=1e-9)
    assert set(k.round().long().tolist()) == set(range(16))


def test_stored_key_levels_around_the_midpoint():
    """K, V: clamp [0, 0.9] V, 8 levels; 0.45 is not a level, K − 0.45 ∈ ±{0.064, 0.193, 0.321, 0.45}."""
    k = GainCell().k
    u = quantize(off_edges(k, 4000), k) - 0.45
    values = sorted(set(round(x, 3) for x in u.tolist()))
    assert values == [-0.45, -0.321, -0.193, -0.064, 0.064, 0.193, 0.321, 0.45]


def test_av_readout_rounds_to_multiples_of_two_over_31():
    """A·V tile read-out: clamp [−1, 1], 32 levels; the authors' code rounds to multiples of 2/31."""
    q = GainCell().av_out
    x = torch.tensor([0.03, -0.03, 0.10, -0.50, 0.99, -0.99], dtype=torch.float64)
    y = quantize(x, q)
    # 0.03 → 0 (a grid from −1 in steps of 2/31 would give ±1/31 instead)
    assert y.tolist() == pytest.approx([0.0, 0.0, 4 / 31, -16 / 31, 30 / 31, -30 / 31])
    k = quantize(off_edges(q, 4000), q) * 31 / 2
    assert torch.allclose(k, k.round(), atol=1e-9)


def test_saturated_av_readout_matches_the_authors_rounding():
    """At exactly ±1, step·round(±1/step) = ±32/31 (round half to even), as in the authors' code."""
    y = quantize(torch.tensor([1.0, -1.0, 3.0]), GainCell().av_out)
    assert y.tolist() == pytest.approx([32 / 31, -32 / 31, 32 / 31])


def test_range_without_zero_uses_a_grid_from_low():
    q = Quantizer(low=0.1, high=0.5, levels=5)  # levels 0.1, 0.2, …, 0.5
    y = quantize(torch.tensor([0.0, 0.13, 0.26, 0.44, 0.9]), q)
    assert y.tolist() == pytest.approx([0.1, 0.1, 0.3, 0.4, 0.5])


def test_unquantised_converter_only_clamps():
    q = Quantizer(low=0.0, high=0.9, levels=None)
    x = torch.tensor([-0.3, 0.123456, 0.5, 1.2])
    assert quantize(x, q).tolist() == pytest.approx([0.0, 0.123456, 0.5, 0.9])


def test_straight_through_gradient_is_one_inside_zero_outside():
    q = GainCell().q
    x = torch.tensor([-0.2, 0.03, 0.51, 0.97, 1.3], requires_grad=True)
    quantize(x, q).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clamp_gradient_is_torch_clamps_bounds_included(dtype):
    """`clamp` computes its gradient with hardtanh's backward (open interval) on the bounds' neighbours: the closed
    interval of torch.clamp's own gradient, at the bounds and one step beside them."""
    low, high = 0.0, 0.9  # 0.9 is not representable: both sides round it the same way
    edges = [torch.nextafter(torch.tensor(b, dtype=dtype), torch.tensor(d, dtype=dtype)).item()
             for b in (low, high) for d in (-1.0, 2.0)]
    values = [low, high, -0.0, *edges, -3.0, 0.45, 7.0]
    x = torch.tensor(values, dtype=dtype, requires_grad=True)
    y = torch.tensor(values, dtype=dtype, requires_grad=True)
    g = torch.arange(1.0, len(values) + 1, dtype=dtype)
    clamp(x, low, high).backward(g)
    y.clamp(low, high).backward(g)
    assert torch.equal(x.grad, y.grad)
    assert x.grad.tolist()[:3] == [1.0, 2.0, 3.0]  # low, high and −0 pass


def test_hard_sigmoid_gradient_is_scale_inside_zero_outside_and_masked():
    """∂A/∂S = 1/80 where 0 ≤ S/80 + offset ≤ 1 and the key is kept, else 0 (masked keys take no gradient)."""
    s = torch.tensor([[-10.0, 0.0, 40.0, 80.0, 90.0, 40.0]], requires_grad=True)
    keep = torch.tensor([[True, True, True, True, True, False]])
    hard_sigmoid(s, GainCell(), keep).sum().backward()
    assert torch.equal(s.grad, torch.tensor([[0.0, 0.0125, 0.0125, 0.0125, 0.0, 0.0]]))


# ---- the cell (Eq. 4) ----

def test_cell_polynomial_at_0v9_is_f():
    cfg = GainCell()
    assert cfg.cell_polynomial() == pytest.approx(list(F_COEFFS), rel=1e-4)
    assert f(0.45) == pytest.approx(10.3, abs=0.05) and f(-0.45) == pytest.approx(-10.3, abs=0.05)


def test_nonlinear_cell_is_x_times_f():
    cfg = GainCell()
    x = torch.tensor([0.2, 0.5, 1.0, 0.7], dtype=torch.float64)
    y = torch.tensor([0.0, 0.9, 0.3, 0.45 + 0.193], dtype=torch.float64)
    expected = [xi * f(yi - 0.45) for xi, yi in zip(x.tolist(), y.tolist())]
    assert cell(x, y, cfg).tolist() == pytest.approx(expected, rel=1e-4)
    assert cell(torch.tensor(1.0), torch.tensor(0.9), cfg).item() == pytest.approx(10.3, abs=0.05)


def test_linear_cell_is_19p3_x_u():
    cfg = GainCell(cell="linear")
    x, y = torch.tensor([0.4, 1.0]), torch.tensor([0.8, 0.1])
    assert cell(x, y, cfg).tolist() == pytest.approx([19.3 * 0.4 * 0.35, 19.3 * 1.0 * -0.35], rel=1e-6)


def test_leakage_multiplies_the_ith_term_by_decay_to_the_i():
    """The stored deviation decays: term i × decay^i, the constant term not at all."""
    cfg, d = GainCell(), 0.8
    x, u = 0.6, 0.3
    expected = x * sum(c * (u * d) ** i for i, c in enumerate(F_COEFFS))
    got = cell(torch.tensor(x, dtype=torch.float64), torch.tensor(0.45 + u, dtype=torch.float64), cfg, torch.tensor(d, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-4)
    lin = cell(torch.tensor(x), torch.tensor(0.45 + u), GainCell(cell="linear"), torch.tensor(d))
    assert lin.item() == pytest.approx(19.3 * x * u * d, rel=1e-6)


def test_leakage_decay_per_token():
    """exp(−1.6e-4 · age) with τ = 5 ms and 0.8 µs per token; no decay without τ."""
    queries, keys = torch.tensor([1000, 1001]), torch.tensor([0, 900, 1000])
    decay = leakage_decay(queries, keys, GainCell())
    expected = [[math.exp(-1.6e-4 * (t - s)) for s in (0, 900, 1000)] for t in (1000, 1001)]
    assert decay.dense().tolist() == [pytest.approx(row, rel=1e-6) for row in expected]
    assert leakage_decay(queries, keys, GainCell(leakage=Leakage(tau_s=None))) is None


def test_fast_leakage_stays_finite_within_a_query_block():
    """τ = 1 µs (silicon-like): the factors of a block of max_query_block queries stay finite; old keys → 0."""
    cfg = GainCell(leakage=Leakage(tau_s=1e-6))  # 0.8 decay-lengths per token
    block = max_query_block(cfg)
    queries, keys = torch.arange(2000, 2000 + block), torch.arange(0, 2000 + block)
    dense = leakage_decay(queries, keys, cfg).dense()
    assert torch.isfinite(dense).all()
    past = keys[None, :] <= queries[:, None]
    age = (queries[:, None] - keys[None, :]).float()
    assert torch.allclose(dense[past], torch.exp(-cfg.leakage.rate_per_token * age)[past], rtol=1e-5, atol=1e-30)


def test_surrogate_gradient_is_the_linear_cells_gradient():
    """cell_gradient: linear → forward the polynomial, backward 19.3·decay·(u, x)."""
    x = torch.tensor([0.3, 0.9], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.2, 0.75], dtype=torch.float64, requires_grad=True)
    d = torch.tensor([1.0, 0.5], dtype=torch.float64)
    out = cell(x, y, GainCell(), d)
    assert out.tolist() == pytest.approx(cell(x, y, GainCell(cell_gradient="exact"), d).tolist())
    out.sum().backward()
    u = y.detach() - 0.45
    assert x.grad.tolist() == pytest.approx((LINEAR_SLOPE * u * d).tolist())
    assert y.grad.tolist() == pytest.approx((LINEAR_SLOPE * x.detach() * d).tolist())


def test_exact_gradient_is_the_polynomials_derivative():
    x = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    cell(x, y, GainCell(cell_gradient="exact")).sum().backward()
    u = 0.2 - 0.45
    assert x.grad.item() == pytest.approx(f(u), rel=1e-4)
    df = F_COEFFS[1] + 2 * F_COEFFS[2] * u + 3 * F_COEFFS[3] * u**2
    assert y.grad.item() == pytest.approx(0.3 * df, rel=1e-4)


@pytest.mark.parametrize("kind", ["nonlinear", "linear"])
def test_matrix_forms_sum_the_elementwise_cell(kind):
    """Scores S[t,s] = Σ_d cell(q, k, decay[t,s]); A·V O[t,d] = Σ_s cell(A, v, decay[t,s]); gains per stored cell."""
    torch.manual_seed(0)
    cfg = GainCell(cell=kind)
    q, k = torch.rand(2, 3, 5, dtype=torch.float64), torch.rand(2, 4, 5, dtype=torch.float64) * 0.9
    decay = Decay(torch.rand(3, 1, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64))
    gain = 1 + 0.1 * torch.randn(2, 4, 5, dtype=torch.float64)
    scores = cell_scores(q, k, cfg, decay, gain=gain)
    dense = decay.dense()  # (T, S)
    ref = (cell(q[:, :, None, :], k[:, None], cfg, dense[None, :, :, None]) * gain[:, None]).sum(-1)  # (2, T, S)
    assert torch.allclose(scores, ref, atol=1e-12)
    a, v = torch.rand(2, 3, 4, dtype=torch.float64), torch.rand(2, 4, 5, dtype=torch.float64) * 0.9
    out = cell_weighted_sum(a, v, cfg, decay, gain=gain)
    ref = (cell(a[..., None], v[:, None], cfg, dense[None, :, :, None]) * gain[:, None]).sum(-2)  # (2, T, D)
    assert torch.allclose(out, ref, atol=1e-12)


# ---- activation, read-out, noise ----

def test_hard_sigmoid_clamps_s_over_80_and_masks():
    """A = clamp(S/80, 0, 1), masked (future) scores → 0; no softmax, no normalisation."""
    s = torch.tensor([[-10.0, 40.0, 80.0, 200.0]])
    keep = torch.tensor([[True, True, True, False]])
    assert hard_sigmoid(s, GainCell()).tolist() == [[0.0, 0.5, 1.0, 1.0]]
    assert hard_sigmoid(s, GainCell(), keep).tolist() == [[0.0, 0.5, 1.0, 0.0]]
    assert hard_sigmoid(s, GainCell(score_offset=0.25), keep).tolist() == [[0.125, 0.75, 1.0, 0.0]]
    rows = torch.stack([s[0], s[0]])  # per-row (e.g. per-head) offsets add to score_offset: 0.25 + 0.25 and 0.25 − 0.25
    both = hard_sigmoid(rows, GainCell(score_offset=0.25), keep.expand(2, -1), offsets=torch.tensor([[0.25], [-0.25]]))
    assert both.tolist() == [[0.375, 1.0, 1.0, 0.0], [0.0, 0.5, 1.0, 0.0]]


def test_hard_sigmoid_offset_falls_per_doubling_of_the_keys_seen():
    """offset_per_doubling 0.25 beyond 1 key: a row seeing 3 of 4 keys is lowered by 0.25·log2(3), one seeing 1 key not at all."""
    s = torch.tensor([[80.0, 40.0, 120.0, 60.0], [40.0, 40.0, 40.0, 40.0]])  # S/80 = 1, 0.5, 1.5, 0.75 and 0.5 …
    keep = torch.tensor([[True, True, True, False], [True, False, False, False]])
    cfg = GainCell(offset_per_doubling=0.25, offset_reference_keys=1)
    low = 0.25 * math.log2(3)  # 0.396
    assert torch.allclose(hard_sigmoid(s, cfg, keep), torch.tensor([[1 - low, 0.5 - low, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))
    paper = hard_sigmoid(s, cfg.model_copy(update={"offset_reference_keys": 4}), keep)  # at most 4 keys: the paper's HardSigmoid
    assert paper.tolist() == [[1.0, 0.5, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="keep"):
        hard_sigmoid(s, cfg)


def test_tile_readout_scales_by_one_fortieth_then_quantises():
    partial = torch.tensor([4.0, -12.0, 50.0])  # × 1/40 → 0.1, −0.3, 1.25 (clamped)
    assert tile_readout(partial, GainCell()).tolist() == pytest.approx([4 / 31, -10 / 31, 32 / 31])


def test_read_noise_is_seeded_and_has_the_asked_std():
    x = torch.zeros(200_000)
    a = read_noise(x, 0.02, torch.Generator().manual_seed(3))
    b = read_noise(x, 0.02, torch.Generator().manual_seed(3))
    c = read_noise(x, 0.02, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std().item() == pytest.approx(0.02, rel=0.02) and abs(a.mean().item()) < 3e-4
    assert read_noise(x, 0.0) is x


def test_tile_readout_noise_is_a_fraction_of_the_adc_full_scale():
    """read_std × (high − low): 0.05 × 2 = 0.1 on the unquantised read-out."""
    cfg = GainCell(noise=Noise(read_std=0.05), av_out=Quantizer(low=-10, high=10, levels=None))
    y = tile_readout(torch.zeros(100_000), cfg, torch.Generator().manual_seed(0))
    assert y.std().item() == pytest.approx(0.05 * 20, rel=0.02)
    active = torch.zeros(100_000)
    assert tile_readout(torch.zeros(100_000), cfg, torch.Generator().manual_seed(0), active).abs().max() == 0


def test_hard_sigmoid_noise_is_a_fraction_of_the_pulse_full_scale():
    cfg = GainCell(noise=Noise(read_std=0.01))
    a = hard_sigmoid(torch.full((100_000,), 40.0), cfg, generator=torch.Generator().manual_seed(1))  # A = 0.5 ± noise
    assert a.mean().item() == pytest.approx(0.5, abs=2e-4) and a.std().item() == pytest.approx(0.01, rel=0.03)


def test_variability_gain_statistics():
    cfg = GainCell(noise=Noise(cell_variability_std=0.05))
    g = variability_gain((100, 1000), cfg, torch.Generator().manual_seed(0))
    assert g.mean().item() == pytest.approx(1.0, abs=1e-3) and g.std().item() == pytest.approx(0.05, rel=0.02)
    assert torch.equal(g, variability_gain((100, 1000), cfg, torch.Generator().manual_seed(0)))
    assert variability_gain((3,), GainCell()) is None


@pytest.mark.parametrize("form", ["scores", "weighted_sum"])
@pytest.mark.parametrize("chip", ["ideal", "leak", "leak and gains, stored operand broadcast"])
def test_matrix_forms_use_the_linear_cells_gradient_and_the_polynomials_value(form, chip):
    """Surrogate (cell_gradient: linear) in the matrix forms: value of Eq. 4, gradient of 19.3·x·u·decay(·gain)."""
    torch.manual_seed(1)
    fn = cell_scores if form == "scores" else cell_weighted_sum
    x = torch.rand(2, 3, 5 if form == "scores" else 4, dtype=torch.float64)  # q (B, T, D) or A (B, T, S)
    y = torch.rand(2, 4, 5, dtype=torch.float64) * 0.9  # stored k or v (B, S, D)
    decay = None if chip == "ideal" else Decay(torch.rand(3, 1, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64))
    gain = None
    if chip.startswith("leak and gains"):  # one stored array read by both rows of the batch
        y, gain = y[:1], 1 + 0.1 * torch.randn(4, 5, dtype=torch.float64)

    def value_and_grads(cfg, grad=True):
        xs, ys = x.clone().requires_grad_(grad), y.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = fn(xs, ys, cfg, decay, gain=gain)
        if grad:
            (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        return out.detach(), xs.grad, ys.grad

    value, gx, gy = value_and_grads(GainCell())
    exact_value, _, _ = value_and_grads(GainCell(cell_gradient="exact"))
    _, lx, ly = value_and_grads(GainCell(cell="linear"))
    inference_value, _, _ = value_and_grads(GainCell(), grad=False)
    assert torch.allclose(value, exact_value, atol=1e-12) and torch.allclose(value, inference_value, atol=1e-12)
    assert torch.allclose(gx, lx, atol=1e-12) and torch.allclose(gy, ly, atol=1e-12)
    assert not torch.allclose(value, value_and_grads(GainCell(cell="linear"))[0])
