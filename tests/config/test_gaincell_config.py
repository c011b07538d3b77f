"""Bad gain-cell configurations fail at load, naming their field; the realistic preset differs only in noise."""

import pytest
from pydantic import ValidationError

from cimattn.config import GainCell, Leakage, Quantizer, load_preset


@pytest.mark.parametrize("levels", [0, 1, -3])
def test_fewer_than_two_levels_is_refused(levels):
    with pytest.raises(ValidationError, match="levels"):
        Quantizer(low=0.0, high=1.0, levels=levels)


@pytest.mark.parametrize("tau_s", [0.0, -5e-3])
def test_non_positive_retention_is_refused(tau_s):
    with pytest.raises(ValidationError, match="tau_s"):
        Leakage(tau_s=tau_s)


def test_window_must_hold_whole_arrays():
    with pytest.raises(ValidationError, match="multiple of tokens_per_array"):
        GainCell(window_tokens=100, tokens_per_array=64)
    assert GainCell(window_tokens=128, tokens_per_array=64).window_tokens == 128


def test_quantizer_range_must_be_ordered():
    with pytest.raises(ValidationError, match="must exceed low"):
        Quantizer(low=0.9, high=0.0, levels=8)


def test_leroux_rate_per_token():
    """τ = 5 ms and 0.8 µs per token: exp(−1.6e-4 · age) (PAPERS.md §1); τ null: no leakage."""
    assert load_preset("leroux-gaincell").gaincell.leakage.rate_per_token == pytest.approx(1.6e-4)
    assert Leakage(tau_s=None).rate_per_token == 0.0


def test_realistic_preset_is_leroux_plus_noise():
    realistic, paper = load_preset("gaincell-realistic"), load_preset("leroux-gaincell")
    assert realistic.gaincell.model_dump(exclude={"noise"}) == paper.gaincell.model_dump(exclude={"noise"})
    assert realistic.adapt == paper.adapt
    assert realistic.gaincell.noise.read_std > 0 and realistic.gaincell.noise.cell_variability_std > 0
    assert paper.gaincell.noise.read_std == 0 and paper.gaincell.noise.cell_variability_std == 0
