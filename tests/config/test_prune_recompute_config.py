"""SPRINT / HyAtt presets hold the papers' numbers; bad prune-and-recompute values fail at load with the field's name."""

import pytest

from cimattn.config import load_preset
from cimattn.config.schema import Scorer
from cimattn.errors import CimattnError


def test_sprint_preset_holds_the_paper_numbers():
    """shared/PAPERS.md §2: 4 key MSBs in 4-bit (16-level) cells, a comparator (no ADC), 16 KB buffer, reuse."""
    p = load_preset("sprint").prune_recompute
    assert (p.scorer.kind, p.scorer.key_msb_bits, p.scorer.conductance_levels, p.scorer.output_bits) == ("reram", 4, 16, None)
    assert (p.buffer.size_kb, p.buffer.reuse) == (16.0, True)
    assert p.selection.rule == "threshold" and p.selection.threshold is None  # calibrated in the adapt stage


def test_hyatt_preset_holds_the_paper_numbers():
    """shared/PAPERS.md §3: charge-domain bit cells (no conductance levels), ~75 % pruned."""
    p = load_preset("hyatt").prune_recompute
    assert (p.scorer.kind, p.scorer.conductance_levels) == ("charge", None)
    assert p.selection.keep_rate == 0.25


def test_scorer_fields_carry_unit_and_source():
    for name in ("key_bits", "key_msb_bits", "query_bits", "conductance_levels", "variation_std", "read_noise_std", "comparator_offset_std"):
        extra = Scorer.model_fields[name].json_schema_extra
        assert extra["unit"] and extra["source"], name


@pytest.mark.parametrize(
    "section, field",
    [
        ("{selection: {keep_rate: 0}}", "prune_recompute.selection.keep_rate"),
        ("{selection: {keep_rate: 1.5}}", "prune_recompute.selection.keep_rate"),
        ("{selection: {keep_rate: -0.1}}", "prune_recompute.selection.keep_rate"),
        ("{scorer: {key_bits: 4, key_msb_bits: 6}}", "prune_recompute.scorer"),
        ("{scorer: {key_bits: null, key_msb_bits: 4}}", "prune_recompute.scorer"),
        ("{buffer: {size_kb: 0}}", "prune_recompute.buffer.size_kb"),
        ("{buffer: {size_kb: -16}}", "prune_recompute.buffer.size_kb"),
        ("{buffer: {bytes_per_element: 0}}", "prune_recompute.buffer.bytes_per_element"),
        ("{scorer: {kind: charge, conductance_levels: 16}}", "prune_recompute.scorer"),
        ("{selection: {rule: top_k}}", "prune_recompute.selection"),
        ("{selection: {rule: relative, threshold: -1}}", "prune_recompute.selection"),
        ("{selection: {rule: probability, threshold: -0.5}}", "prune_recompute.selection"),
        ("{scorer: {kind: h2o}, selection: {rule: threshold}}", "prune_recompute"),
        ("{scorer: {kind: memristor}}", "prune_recompute.scorer.kind"),
        ("{scorer: {read_noise_std: -0.1}}", "prune_recompute.scorer.read_noise_std"),
    ],
)
def test_bad_values_fail_at_load_with_the_field(tmp_path, section, field):
    path = tmp_path / "bad.yaml"
    path.write_text(f"attention: prune_recompute\nprune_recompute: {section}\n")
    with pytest.raises(CimattnError) as e:
        load_preset(path)
    assert f"field '{field}'" in str(e.value)
    assert "\n" not in str(e.value)


def test_msb_error_names_the_fix(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("attention: prune_recompute\nprune_recompute: {scorer: {key_bits: 4, key_msb_bits: 6}}\n")
    with pytest.raises(CimattnError, match=r"key_msb_bits \(6\) exceeds key_bits \(4\)"):
        load_preset(path)


def test_family_section_required_and_exclusive(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("attention: prune_recompute\n")
    with pytest.raises(CimattnError, match="needs a 'prune_recompute' section"):
        load_preset(path)
    path.write_text("attention: digital\nprune_recompute: {}\n")
    with pytest.raises(CimattnError, match="takes no 'prune_recompute' section"):
        load_preset(path)
