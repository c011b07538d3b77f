"""Presets load, validate, carry units and sources, and round-trip through YAML."""

import pytest

from cimattn.config import (
    GainCell,
    HardwareConfig,
    list_presets,
    load_preset,
    preset_yaml,
)
from cimattn.config.schema import LEROUX_CELL_COEFFICIENTS
from cimattn.errors import CimattnError


def test_shipped_presets_listed():
    assert {"digital", "leroux-gaincell"} <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_preset_round_trips(name, tmp_path):
    config = load_preset(name)
    path = tmp_path / "p.yaml"
    path.write_text(preset_yaml(config))
    assert load_preset(path) == config


def test_leroux_preset_holds_the_paper_numbers():
    """Every number of shared/PAPERS.md §1, as the preset states it."""
    g = load_preset("leroux-gaincell").gaincell
    assert (g.window_tokens, g.tokens_per_array, g.head_dim_per_array) == (1024, 64, 64)
    assert (g.q.low, g.q.high, g.q.levels) == (0.0, 1.0, 16)
    assert (g.k.low, g.k.high, g.k.levels) == (0.0, 0.9, 8) == (g.v.low, g.v.high, g.v.levels)
    assert (g.av_out.low, g.av_out.high, g.av_out.levels) == (-1.0, 1.0, 32)
    assert (g.scaler_k.b, g.scaler_v.b, g.scaler_q.b, g.scaler_out.b) == (0.45, 0.45, 0.0, 0.0)
    assert tuple(g.cell_coefficients) == LEROUX_CELL_COEFFICIENTS
    assert g.score_scale == pytest.approx(1 / 80) and g.av_tile_scale == pytest.approx(1 / 40)
    assert g.decay_rate_per_token == pytest.approx(1.6e-4)
    # Eq. 4 folded at V_in = 0.9: f(u) = 0.52136 + 13.6123 u − 2.62045 u² + 46.0548 u³ (PAPERS.md §1)
    assert g.cell_polynomial() == pytest.approx([0.52136, 13.6123, -2.62045, 46.0548], rel=1e-4)


def test_every_numeric_field_has_unit_and_source():
    for name, f in GainCell.model_fields.items():
        if f.annotation in (float, int) and name not in ("tokens_per_array",):
            extra = f.json_schema_extra or {}
            assert "[" in (f.description or ""), f"{name} has no unit"
    for name in ("window_tokens", "v_in", "score_scale", "linear_slope"):
        extra = GainCell.model_fields[name].json_schema_extra
        assert extra["unit"] and extra["source"], name


@pytest.mark.parametrize(
    "yaml_text, field",
    [
        ("attention: gaincell\ngaincell: {q: {low: 0, high: 1, levels: 1}}", "gaincell.q.levels"),
        ("attention: gaincell\ngaincell: {leakage: {tau_s: 0}}", "gaincell.leakage.tau_s"),
        ("attention: gaincell\ngaincell: {leakage: {tau_s: -1.0}}", "gaincell.leakage.tau_s"),
        ("attention: gaincell\ngaincell: {window_tokens: 100}", "gaincell"),
        ("attention: gaincell\ngaincell: {colour: red}", "gaincell.colour"),
        ("attention: gaincell\ngaincell: {v_in: .nan}", "gaincell.v_in"),
        ("attention: gaincell\ngaincell: {av_out: {low: -1, high: 1, levels: 1}}", "gaincell.av_out.levels"),
        ("attention: gaincell\ngaincell: {noise: {read_std: -0.1}}", "gaincell.noise.read_std"),
        ("attention: gaincell\ngaincell: {cell: cubic}", "gaincell.cell"),
        ("attention: gaincell\ngaincell: {offset_per_doubling: -0.1}", "gaincell.offset_per_doubling"),
        ("attention: gaincell\ngaincell: {offset_reference_keys: 0}", "gaincell.offset_reference_keys"),
        ("attention: quantum", "attention"),
    ],
)
def test_bad_values_name_their_field(tmp_path, yaml_text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(CimattnError, match=f"field '{field}"):
        load_preset(path)


def test_malformed_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("attention: gaincell\n  gaincell: [unclosed\n")
    with pytest.raises(CimattnError, match="malformed YAML"):
        load_preset(path)
    with pytest.raises(CimattnError, match="not found"):
        load_preset(tmp_path / "nope.yaml")
    with pytest.raises(CimattnError, match="unknown preset"):
        load_preset("no-such-preset")


def test_gaincell_section_defaults_to_the_paper():
    assert HardwareConfig(name="x", attention="gaincell").gaincell == GainCell()
