"""Design spaces: unit-cube round trips, presets built from points, and one clear error per bad space."""

import pytest

from cimattn.codesign import load_space, parse_space
from cimattn.errors import CimattnError

GOOD = {
    "name": "s", "preset": "leroux-gaincell",
    "parameters": [{"name": "q", "path": "gaincell.q.levels", "type": "int", "low": 4, "high": 32}],
    "objectives": [{"metric": "ppl"}, {"metric": "energy_per_token_j"}],
}


def test_shipped_space_loads_and_builds_presets():
    space = load_space("gaincell")
    params = space.from_unit([0.0] * space.dim)
    hw = space.hardware(params)
    assert hw.gaincell.window_tokens == 64 and hw.gaincell.q.levels == 4 and hw.gaincell.leakage.tau_s == pytest.approx(1e-5)
    assert space.adaptation(params) == {"qkv_spread": pytest.approx(0.1)}
    top = space.hardware(space.from_unit([1.0] * space.dim))
    assert top.gaincell.window_tokens == 256 and top.gaincell.av_out.levels == 64


def test_unit_round_trip_int_log_categorical():
    space = load_space("gaincell")
    params = {"window": 128, "q_levels": 9, "kv_levels_k": 5, "kv_levels_v": 16, "adc_levels": 20, "tau_s": 3e-4, "qkv_spread": 0.3}
    back = space.from_unit(space.to_unit(params))
    assert back["window"] == 128 and back["q_levels"] == 9 and back["adc_levels"] == 20
    assert back["tau_s"] == pytest.approx(3e-4) and back["qkv_spread"] == pytest.approx(0.3)


@pytest.mark.parametrize("change, message", [
    ({"parameters": [{"name": "q", "path": "gaincell.q.levels", "type": "int", "low": 8, "high": 8}]}, "empty range"),
    ({"parameters": [{"name": "q", "path": "gaincell.q.levls", "type": "int", "low": 4, "high": 8}]}, "unknown path 'gaincell.q.levls'"),
    ({"parameters": [{"name": "q", "path": "gaincell.q", "type": "int", "low": 4, "high": 8}]}, "is a section"),
    ({"parameters": [{"name": "q", "path": "gaincell.q.levels", "type": "int", "low": 1, "high": 8}]}, "gaincell.q.levels"),
    ({"parameters": [{"name": "w", "path": "gaincell.window_tokens", "type": "categorical", "choices": [64, 100]}]}, "multiple of tokens_per_array"),
    ({"parameters": [{"name": "s", "path": "adaptation.spred", "type": "float", "low": 0.1, "high": 0.2}]}, "unknown adaptation knob"),
    ({"parameters": [{"name": "w", "path": "gaincell.window_tokens", "type": "categorical", "choices": []}]}, "non-empty 'choices'"),
    ({"parameters": [{"name": "t", "path": "gaincell.leakage.tau_s", "type": "float", "low": 0, "high": 1, "log": True}]}, "low > 0"),
    ({"constraints": ["ppl <= 0.5"]}, "infeasible"),
    ({"constraints": ["ppl <= 0 * ppl_digital"]}, "infeasible"),
    ({"constraints": ["ppl <= 2", "ppl >= 3"]}, "infeasible together"),
    ({"constraints": ["ppl < 2"]}, "write 'METRIC <= NUMBER"),
    ({"constraints": ["bleu <= 2"]}, "unknown metric 'bleu'"),
    ({"constraints": ["ppl <= 1.1 * ppl_teacher"]}, "unknown reference"),
    ({"objectives": [{"metric": "speed"}]}, "objective 'speed'"),
    ({"objectives": []}, "objectives"),
])
def test_bad_space_is_one_clear_error(change, message):
    with pytest.raises(CimattnError, match=message.replace("(", r"\(").replace("*", r"\*")) as e:
        parse_space(GOOD | change)
    assert "\n" not in str(e.value)


def test_missing_space_file_names_the_shipped_ones(tmp_path):
    with pytest.raises(CimattnError, match="gaincell"):
        load_space(tmp_path / "nope.yaml")


def test_constraint_parses_relative_bound():
    space = parse_space(GOOD | {"constraints": ["ppl <= 1.1 * ppl_digital"]})
    c = space.constraints[0]
    assert c.bound({"ppl_digital": 10.0}) == pytest.approx(11.0)
    assert c.violation({"ppl": 12.0}, {"ppl_digital": 10.0}) == pytest.approx(1.0)
