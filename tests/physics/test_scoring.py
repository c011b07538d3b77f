"""ReRAM / charge-CIM scorer physics on hand-computed cases (shared/PAPERS.md §2–3)."""

import pytest
import torch

from cimattn.config import Scorer
from cimattn.physics.scoring import (
    adc,
    analog_scores,
    comparator,
    comparator_offsets,
    hashed_normal,
    hashed_uniform,
    program_levels,
    quantize_symmetric,
    soft_comparator,
    truncate_msb,
)

IDEAL = {"key_bits": None, "key_msb_bits": None, "query_bits": None, "conductance_levels": None}


def test_query_dac_hand_values():
    """4 bits over ±7: step 1, codes −7…7; inputs off the bin edges."""
    x = torch.tensor([2.3, -2.7, 9.0, -9.0, 0.4])
    assert quantize_symmetric(x, torch.tensor(7.0), 4).tolist() == [2.0, -3.0, 7.0, -7.0, 0.0]
    assert torch.equal(quantize_symmetric(x, torch.tensor(7.0), None), x)


def test_msb_truncation_hand_values():
    """8-bit keys over ±127 (step 1), 4 MSBs: code c → (floor(c/16) + ½)·16, the centre of its bin."""
    k = torch.tensor([37.2, -1.3, 127.0, -127.0, 15.6]).view(1, 1, 5, 1)
    stored, k_max = truncate_msb(k, torch.tensor(127.0).view(1, 1, 1, 1), 8, 4)
    # 37 → floor(37/16)=2 → 40; −1 → −1 → −8; 127 → 7 → 120; −127 → −8 → −120; 16 → 1 → 24
    assert stored.flatten().tolist() == [40.0, -8.0, 120.0, -120.0, 24.0]
    assert k_max.item() == 120.0
    full, full_max = truncate_msb(k, torch.tensor(127.0).view(1, 1, 1, 1), 8, 8)  # every bit: plain rounding
    assert full.flatten().tolist() == [37.0, -1.0, 127.0, -127.0, 16.0] and full_max.item() == 127.0


def test_sixteen_conductances_hold_four_msbs_exactly():
    """The 16 symmetric MSB values (c + ½)·16 fit 16 levels exactly; 4 levels over ±1.5 round to ±0.5, ±1.5."""
    values = (torch.arange(-8, 8) + 0.5) * 16.0
    assert torch.allclose(program_levels(values, torch.tensor(120.0), 16), values)
    x = torch.tensor([-1.4, -0.2, 0.3, 1.1])
    assert program_levels(x, torch.tensor(1.5), 4).tolist() == pytest.approx([-1.5, -0.5, 0.5, 1.5])


def test_adc_hand_values():
    """2 bits over ±3: levels −3, −1, 1, 3."""
    x = torch.tensor([0.4, -2.2, 5.0, -0.1])
    assert adc(x, torch.tensor(3.0), 2).tolist() == pytest.approx([1.0, -3.0, 3.0, -1.0])


def test_comparators():
    x = torch.tensor([0.2, 0.6, 1.0])
    assert comparator(x, torch.tensor(0.5)).tolist() == [False, True, True]
    assert comparator(x, torch.tensor(0.5), torch.tensor([0.4, -0.2, 0.0])).tolist() == [True, False, True]
    soft = soft_comparator(x, torch.tensor(0.6), temperature=0.1)
    assert soft[1].item() == pytest.approx(0.5) and soft[0] < 0.05 and soft[2] > 0.95


def test_ideal_scorer_is_exact_dot_product():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    for kind in ("reram", "charge"):
        scores, _ = analog_scores(q, k, Scorer(kind=kind, **IDEAL), torch.ones(4), torch.ones(2))
        ref = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)  # GQA: query heads 0, 1 on KV head 0
        assert torch.allclose(scores, ref, atol=1e-12)


def test_quantized_scorer_matches_hand_chain():
    """One query, one key, D = 2: 4-bit DAC over ±7, 8-bit keys over ±127, 4 MSBs."""
    q = torch.tensor([3.2, -1.6]).view(1, 1, 1, 2)
    k = torch.tensor([37.2, -1.3]).view(1, 1, 1, 2)
    scores, full_scale = analog_scores(q, k, Scorer(kind="reram"), torch.tensor([7.0]), torch.tensor([127.0]))
    assert scores.item() == pytest.approx(3 * 40 + (-2) * (-8))  # q → (3, −2), k → (40, −8)
    assert full_scale.item() == pytest.approx(2 * 7 * 120)  # D · q_max · k_max


def test_charge_adc_quantizes_to_full_scale_levels():
    q = torch.tensor([3.2, -1.6]).view(1, 1, 1, 2)
    k = torch.tensor([37.2, -1.3]).view(1, 1, 1, 2)
    cfg = Scorer(kind="charge", conductance_levels=None, output_bits=3)
    scores, fs = analog_scores(q, k, cfg, torch.tensor([7.0]), torch.tensor([127.0]))
    step = 2 * fs.item() / 7  # 8 levels over ±1680
    assert scores.item() == pytest.approx(-fs.item() + round((136 + fs.item()) / step) * step)


def test_hashed_noise_is_deterministic_standard_normal():
    idx = torch.arange(200_000)
    a, b = hashed_normal(3, 7, idx), hashed_normal(3, 7, idx)
    assert torch.equal(a, b)
    assert abs(a.mean().item()) < 0.01 and a.std().item() == pytest.approx(1.0, abs=0.01)
    assert not torch.equal(a, hashed_normal(4, 7, idx))  # another seed
    u = hashed_uniform(0, idx)
    assert 0 < u.min() and u.max() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.005)
    # a coordinate's draw does not depend on which other coordinates are drawn with it (decode = prefill)
    assert torch.equal(hashed_normal(3, 7, idx[1000:1010]), a[1000:1010])


def test_variation_and_read_noise_statistics():
    """Noise by statistics (STYLE §8): relative score error ≈ the configured spreads, seeded, position-indexed."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 64, 32, generator=g, dtype=torch.float64), torch.randn(1, 1, 64, 32, generator=g, dtype=torch.float64)
    ideal, fs = analog_scores(q, k, Scorer(kind="reram", **IDEAL), torch.ones(1), torch.ones(1))
    noisy, _ = analog_scores(q, k, Scorer(kind="reram", read_noise_std=0.01, **IDEAL), torch.ones(1), torch.ones(1))
    err = (noisy - ideal) / fs
    assert err.std().item() == pytest.approx(0.01, rel=0.05)
    varied, _ = analog_scores(q, k, Scorer(kind="reram", variation_std=0.1, **IDEAL), torch.ones(1), torch.ones(1))
    expected = (q[0, 0, :, None, :] ** 2 * k[0, 0, None, :, :] ** 2).sum(-1).sqrt() * 0.1  # std of Σ q·k·0.1·ε
    ratio = ((varied - ideal)[0, 0] / expected)
    assert ratio.std().item() == pytest.approx(1.0, rel=0.1)
    # the same key read by a later call at the same position carries the same cell errors
    tail, _ = analog_scores(q[:, :, -3:], k, Scorer(kind="reram", variation_std=0.1, read_noise_std=0.01, **IDEAL), torch.ones(1), torch.ones(1))
    full, _ = analog_scores(q, k, Scorer(kind="reram", variation_std=0.1, read_noise_std=0.01, **IDEAL), torch.ones(1), torch.ones(1))
    assert torch.allclose(tail, full[:, :, -3:], atol=1e-12)


def test_comparator_offsets_static_per_column_and_shared_by_gqa_group():
    cfg = Scorer(comparator_offset_std=0.02)
    fs = torch.full((1, 4, 1, 1), 10.0)
    off = comparator_offsets(cfg, fs, layer_idx=0, k_pos=torch.arange(5000), kv_groups=2)
    assert off.shape == (1, 4, 1, 5000)
    assert torch.equal(off[:, 0], off[:, 1]) and not torch.equal(off[:, 0], off[:, 2])
    assert off.std().item() == pytest.approx(0.2, rel=0.05)
    assert comparator_offsets(Scorer(), fs, layer_idx=0, k_pos=torch.arange(5), kv_groups=2) is None


def test_straight_through_gradients():
    x = torch.tensor([0.3, 2.6, 9.0], requires_grad=True)
    quantize_symmetric(x, torch.tensor(7.0), 4).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # clamped input: no gradient
    k = torch.tensor([37.2, 200.0]).view(1, 1, 2, 1).requires_grad_()
    truncate_msb(k, torch.tensor(127.0).view(1, 1, 1, 1), 8, 4)[0].sum().backward()
    assert k.grad.flatten().tolist() == [1.0, 0.0]
