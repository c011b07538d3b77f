"""`cimattn study` on tiny-llama at tiny sizes: each study writes its table, plot and markdown, and its numbers hold up."""

import json
import math
import sys

import pytest

from cimattn.cli import main
from cimattn.pipeline import no_progress
from cimattn.studies import NOISE_LEVELS, RETENTION_TAUS_S, StudySpec, run_study

TINY_PRESET = (
    "attention: gaincell\ngaincell: {window_tokens: 64, tokens_per_array: 16}\n"
    "adapt: {calib_tokens: 128, calib_context: 32, init_iterations: 3, finetune_steps: 1, train: attention}\n"
)


def study(tmp_path, tiny_text, name, **options):
    """A study on tiny-llama with the tiny preset's recipe (step counts, no clock: the same model on any machine)."""
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET)
    out = tmp_path / name
    spec = StudySpec(name=name, model="tiny-llama", preset=str(preset), out=out, text=str(tiny_text), eval_tokens=256, budget_s=None)
    for key, value in options.items():
        setattr(spec, key, value)
    run_study(spec, progress=no_progress)
    for name_ in ("study.json", "study.png", "study.md"):
        assert (out / name_).is_file(), name_
    return json.loads((out / "study.json").read_text())


def test_retention_sweeps_tau_from_oxide_to_silicon(monkeypatch, capsys, tmp_path, tiny_text):
    record = study(tmp_path, tiny_text, "retention", context=64)
    rows = {r["tau_s"]: r for r in record["rows"]}
    assert list(rows) == list(RETENTION_TAUS_S)
    # an hour of retention at 0.8 µs per token is no leakage at all within 64 tokens; 10 µs (decay 8 %/token) is
    assert rows[3600.0]["ppl"] == pytest.approx(rows[None]["ppl"], rel=1e-4)
    assert not math.isclose(rows[1e-5]["ppl"], rows[None]["ppl"], rel_tol=1e-3)
    assert rows[5e-3]["decay_per_token"] == pytest.approx(math.exp(-1.6e-4))  # the paper's rate
    assert record["metrics"]["ppl_no_leakage"] == rows[None]["ppl"]
    assert record["metrics"]["ppl_digital"] != rows[None]["ppl"]  # the digital teacher, scored alongside


def test_context_scores_every_position_up_to_four_windows(monkeypatch, capsys, tmp_path, tiny_text):
    record = study(tmp_path, tiny_text, "context", bin_tokens=32, sequences=2)
    rows, m = record["rows"], record["metrics"]
    assert m["sequence_tokens"] == 4 * 64 and rows[0]["first_position"] == 1 and rows[-1]["last_position"] == 4 * 64 - 1
    assert m["ppl_hardware_beyond_window"] > 1 and m["ppl_digital_beyond_window"] > 1
    # the bins partition the positions: their token-weighted mean NLL is the whole first window's
    first = [r for r in rows if r["last_position"] < 64]
    weights = [r["last_position"] - r["first_position"] + 1 for r in first]
    nll = sum(w * math.log(r["ppl_hardware"]) for w, r in zip(weights, first)) / sum(weights)
    assert math.exp(nll) == pytest.approx(m["ppl_hardware_first_window"], rel=1e-5)


def test_noise_with_and_without_noise_aware_adaptation(monkeypatch, capsys, tmp_path, tiny_text):
    record = study(tmp_path, tiny_text, "noise", context=64)
    rows = {(r["read_std"], r["cell_variability_std"]): r for r in record["rows"]}
    assert list(rows) == list(NOISE_LEVELS)
    assert not math.isclose(rows[(0.05, 0.0)]["ppl_plain"], rows[(0.0, 0.0)]["ppl_plain"], rel_tol=1e-4)
    # noiseless rows are one deterministic computation: any difference shows the variability is applied
    assert not math.isclose(rows[(0.0, 0.2)]["ppl_plain"], rows[(0.0, 0.0)]["ppl_plain"], rel_tol=1e-4)
    # the two fine-tuned copies differ: the noise-aware one trained with the noisy chip in the loop
    assert rows[(0.0, 0.0)]["ppl_noise_aware"] != rows[(0.0, 0.0)]["ppl_plain"]
    for label in ("plain", "noise_aware"):
        assert (tmp_path / "noise" / label / "adapted" / "hardware.safetensors").is_file()


def test_unknown_study_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cimattn", "study", "nope", "--model", "tiny-llama", "--quiet"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown study" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["study"], ["lm-eval"]])
def test_help(monkeypatch, capsys, command):
    monkeypatch.setattr(sys, "argv", ["cimattn", *command, "--help"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0 and "Usage" in capsys.readouterr().out


def test_adapted_parameters_bring_their_own_preset(monkeypatch, capsys, tmp_path, tiny_text):
    """A study of --adapted DIR sweeps the preset DIR was adapted on, whatever --preset says."""
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET + "name: tiny-adapted\n")
    monkeypatch.setattr(sys, "argv", ["cimattn", "run", "--model", "tiny-llama", "--preset", str(preset), "--out", str(tmp_path / "run"),
                                      "--text", str(tiny_text), "--eval-tokens", "128", "--context", "64", "--quiet"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None), capsys.readouterr().err
    record = study(tmp_path, tiny_text, "retention", context=64, adapted=tmp_path / "run" / "adapted", preset="leroux-gaincell")
    assert record["preset"] == "tiny-adapted"
    assert record["config"]["hardware"]["gaincell"]["window_tokens"] == 64


def test_replay_repeats_a_budgeted_study_step_for_step(monkeypatch, capsys, tmp_path, tiny_text):
    """A --budget study records the steps each adaptation ran; --replay runs exactly those, with no clock: the same numbers."""
    first = study(tmp_path, tiny_text, "noise", context=64, budget_s=2.0)
    assert first["steps"]["adapt"] and set(first["steps"]["finetune"]) == {"plain", "noise_aware"}
    monkeypatch.setattr(sys, "argv", ["cimattn", "study", "noise", "--model", "tiny-llama", "--preset", str(tmp_path / "tiny.yaml"),
                                      "--out", str(tmp_path / "again"), "--text", str(tiny_text), "--eval-tokens", "256",
                                      "--context", "64", "--replay", str(tmp_path / "noise"), "--quiet"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None), capsys.readouterr().err
    again = json.loads((tmp_path / "again" / "study.json").read_text())
    assert again["steps"] == first["steps"] and again["rows"] == first["rows"]


@pytest.mark.parametrize("extra, message", [(["--budget", "2"], "takes no --budget"), (["--context", "32"], "context 64"),
                                            ([], "no study.json")])
def test_replay_refuses_what_it_cannot_repeat(monkeypatch, capsys, tmp_path, tiny_text, extra, message):
    source = tmp_path / "source"
    source.mkdir()
    if message != "no study.json":
        (source / "study.json").write_text(json.dumps({"steps": {"adapt": {"finetune": 1}}, "config": {"study": {
            "name": "retention", "model": "tiny-llama", "preset": "leroux-gaincell", "seed": 0, "context": 64}}}))
    monkeypatch.setattr(sys, "argv", ["cimattn", "study", "retention", "--model", "tiny-llama", "--preset", "leroux-gaincell",
                                      "--out", str(tmp_path / "out"), "--text", str(tiny_text), "--replay", str(source),
                                      "--context", "64", "--quiet", *extra])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code != 0 and message in err and len(err.strip().splitlines()) == 1, err
