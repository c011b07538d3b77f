"""`cimattn run --preset sprint` end to end on a tiny model, `eval --adapted`, and the prune study (tiny)."""

import json

import pytest

TELEMETRY_KEYS = {"keep_rate", "refetch_fraction", "fetched_bytes_per_query", "context"}  # read by the cost model




def test_run_calibrates_thresholds_and_reports_telemetry(cli, monkeypatch, capsys, tmp_path, tiny_text):
    out = tmp_path / "run"
    args = ["run", "--model", "tiny-llama", "--preset", "sprint", "--out", out, "--text", tiny_text,
            "--eval-tokens", 256, "--context", 64, "--quiet"]
    code, _, err = cli(*args)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]
    assert {"ppl_digital", "ppl_hardware_initial", "ppl_hardware_adapted", "keep_rate", "calib_keep_rate"} <= m.keys()
    assert TELEMETRY_KEYS <= results["telemetry"].keys() and results["telemetry"]["context"] == 64
    assert 0 < m["keep_rate"] < 0.6 and m["keep_rate"] == results["telemetry"]["keep_rate"]
    assert m["ppl_hardware_initial"] == pytest.approx(m["ppl_digital"], rel=1e-4)  # not calibrated yet: nothing pruned
    assert (out / "adapted" / "hardware.safetensors").is_file()

    code, _, err = cli(*args)  # rerun: every stage reused, telemetry kept
    again = json.loads((out / "results.json").read_text())
    assert code == 0 and again["metrics"] == m and again["telemetry"] == results["telemetry"]

    code, _, err = cli("eval", "--model", "tiny-llama", "--adapted", out / "adapted", "--text", tiny_text,
                       "--eval-tokens", 256, "--context", 64, "--out", tmp_path / "eval", "--quiet")
    assert code == 0, err
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert evaluated["ppl_hardware_adapted"] == pytest.approx(m["ppl_hardware_adapted"], rel=1e-6)
    assert evaluated["keep_rate"] == pytest.approx(m["keep_rate"])


def test_prune_study_tiny(cli, monkeypatch, capsys, tmp_path, tiny_text):
    out = tmp_path / "study"
    code, stdout, err = cli("prune-study", "--model", "tiny-llama", "--out", out, "--text", tiny_text,
                            "--context", 64, "--eval-tokens", 128, "--calib-tokens", 128, "--keep-rates", "0.5,0.25",
                            "--methods", "oracle-topk,sprint,random", "--quiet")
    assert code == 0, err
    record = json.loads((out / "prune_study.json").read_text())
    assert {(r["method"], r["target_keep_rate"]) for r in record["rows"]} == {
        (m, r) for m in ("oracle-topk", "sprint", "random") for r in (0.5, 0.25)
    }
    assert all(0 < r["keep_rate"] <= 1 for r in record["rows"])
    assert "| 0.25 | sprint |" in stdout and (out / "prune_study.png").is_file() and (out / "prune_study.md").is_file()


@pytest.mark.parametrize("args, message", [
    (["--keep-rates", "0"], "outside (0, 1]"),
    (["--keep-rates", "x"], "--keep-rates"),
    (["--methods", "oracle,sprint"], "unknown prune-study method 'oracle'"),
])
def test_prune_study_bad_input_is_one_line(cli, monkeypatch, capsys, tmp_path, args, message):
    code, _, err = cli("prune-study", "--model", "tiny-llama", "--out", tmp_path, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
