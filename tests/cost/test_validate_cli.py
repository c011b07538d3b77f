"""`cimattn validate`, `cimattn cost RUN_DIR` and `cimattn roofline` as a user runs them."""

import json

import pytest

from cimattn.config import load_preset


def test_validate_passes_and_prints_every_figure(cli, monkeypatch, capsys):
    code, out, err = cli("validate")
    assert code == 0, out + err
    for needle in ("6.15", "73.8", "65", "344", "9.7e+04", "7520", "4.4e+04", "7.5", "7.4", "7.1", "19.6", "14.8", "1.65",
                   "976.6", "79.4", "predicted", "fitted", "sourced", "H100"):
        assert needle in out, needle
    assert " NO" not in out


def test_validate_fails_when_a_figure_leaves_its_tolerance(cli, monkeypatch, capsys):
    import cimattn.cost.validate as v

    real = v.tables

    def off():
        t = real()
        t["leroux"] = t["leroux"].with_values({"digital.energy_per_op_j": 3e-12})  # digital line now 6.7 nJ
        return t

    monkeypatch.setattr(v, "tables", off)
    monkeypatch.setattr(v, "_TABLES", {})
    code, out, err = cli("validate")
    assert code == 1 and "NO" in out and "out of tolerance" in err


def _run_dir(tmp_path, preset="leroux-gaincell", **extra):
    hardware = load_preset(preset).model_dump(mode="json")
    results = {"model": "tiny-llama", "preset": preset, "seed": 0, "git_commit": None, "versions": {}, "config": {"run": {"context": "512"}, "hardware": hardware},
               "metrics": {"ppl_digital": 10.0}} | extra
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "results.json").write_text(json.dumps(results))
    return tmp_path


def test_cost_command_writes_metrics_and_plots(cli, monkeypatch, capsys, tmp_path):
    run = _run_dir(tmp_path)
    code, _, err = cli("cost", run, "--quiet")
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    m = results["metrics"]
    assert m["energy_per_token_j"] > 0 and m["latency_per_token_s"] > 0 and m["area_mm2"] > 0
    assert set(m["gpu"]) == {"h100-sxm", "a100", "rtx-4090", "jetson-nano"}
    assert all(g["energy_ratio"] > 1 for g in m["gpu"].values())
    assert m["ppl_digital"] == 10.0  # other metrics kept
    assert (run / "cost_breakdown.png").stat().st_size > 0 and (run / "cost_context.png").stat().st_size > 0
    from cimattn.report import write_report

    report = write_report(run, results).read_text()
    assert "## Cost" in report and "H100" in report and "cost_context.png" in report


def test_cost_reads_prune_recompute_telemetry(cli, monkeypatch, capsys, tmp_path):
    low = _run_dir(tmp_path / "a", telemetry={"keep_rate": 0.05, "refetch_fraction": 0.01, "context": 512})
    high = _run_dir(tmp_path / "b", telemetry={"keep_rate": 0.5, "refetch_fraction": 0.01, "context": 512})
    for run in (low, high):
        code, _, err = cli("cost", run, "--table", "sprint", "--quiet")
        assert code == 0, err
    e = [json.loads((r / "results.json").read_text())["metrics"]["energy_per_token_j"] for r in (low, high)]
    assert e[1] > e[0]


def test_cost_bad_run_dir_is_one_line(cli, monkeypatch, capsys, tmp_path):
    code, _, err = cli("cost", tmp_path)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_roofline_on_a_tiny_cpu_grid(cli, monkeypatch, capsys, tmp_path):
    from cimattn.cost import measure

    monkeypatch.setattr(measure, "CI_GRID", {"prefill": [8, 16, 32, 64], "decode": [64, 128, 256, 512]})
    code, _, err = cli("roofline", "--out", tmp_path, "--model", "tiny-llama", "--grid", "ci",
                       "--repeats", 3, "--threads", 1)
    assert code == 0, err
    r = json.loads((tmp_path / "roofline.json").read_text())
    assert len(r["points"]) == 8 and sum(p["held_out"] for p in r["points"]) == 4
    assert 0 <= r["mape_heldout"] < float("inf") and (tmp_path / "roofline.png").stat().st_size > 0
    assert all(p["seconds"] > 0 for p in r["points"])


@pytest.mark.parametrize("command", [["validate"], ["cost"], ["roofline"]])
def test_help(cli, monkeypatch, capsys, command):
    code, out, _ = cli(*command, "--help")
    assert code == 0 and "Usage" in out
