"""The CLI as a new user meets it: --help everywhere, one-line errors with exit code 2, runs that write results."""

import json
import sys

import pytest
import torch

from cimattn.cli import main


@pytest.mark.parametrize("command", [
    [], ["run"], ["adapt"], ["eval"], ["generate"], ["presets"], ["presets", "show"], ["fetch"], ["validate"], ["cost"],
    ["roofline"], ["bench"], ["lm-eval"], ["study"], ["prune-study"], ["explore"],
])
def test_help(cli, monkeypatch, capsys, command):
    code, out, _ = cli(*command, "--help")
    assert code == 0 and "Usage" in out


def test_presets_show_round_trips(cli, monkeypatch, capsys, tmp_path):
    code, out, _ = cli("presets", "show", "leroux-gaincell")
    assert code == 0
    path = tmp_path / "mine.yaml"
    path.write_text(out)
    code, again, _ = cli("presets", "show", path)
    assert code == 0 and again == out
    code, listing, _ = cli("presets", "list")
    assert "leroux-gaincell" in listing and "digital" in listing


def _bad_inputs(tmp_path):
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("attention: gaincell\ngaincell: {window_tokens: [1,\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("attention: gaincell\ngaincell: {windw_tokens: 512}\n")
    out_of_range = tmp_path / "range.yaml"
    out_of_range.write_text("attention: gaincell\ngaincell: {k: {low: 0, high: 0.9, levels: 1}}\n")
    strict_window = tmp_path / "strict.yaml"
    strict_window.write_text("attention: gaincell\ngaincell: {window_tokens: 64, context_policy: error}\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    common = ["--model", "tiny-llama", "--out", tmp_path / "run", "--eval-tokens", 64, "--context", 32]
    return {
        "missing text file": (["eval", *common, "--text", tmp_path / "nope.txt"], "nope.txt"),
        "malformed yaml": (["run", *common, "--preset", malformed], "malformed YAML"),
        "unknown preset key": (["run", *common, "--preset", unknown_key], "windw_tokens"),
        "value out of range": (["run", *common, "--preset", out_of_range], "gaincell.k.levels"),
        "unknown preset": (["run", *common, "--preset", "no-such-preset"], "unknown preset"),
        "unknown model": (["eval", "--model", "no-such-model", "--out", tmp_path / "r"], "unknown model"),
        "empty text": (["eval", *common, "--text", empty], "empty"),
        "context above the model's": (["eval", "--model", "tiny-llama", "--out", tmp_path / "r", "--context", 100000], "context"),
        "context above the window": (["run", *common[:-2], "--context", 128, "--preset", strict_window], "window"),
        "unknown device": (["eval", *common, "--device", "tpu"], "--device"),
        "unknown bench device": (["bench", "--model", "tiny-llama", "--out", tmp_path / "b", "--device", "tpu"], "--device"),
    }


@pytest.mark.parametrize("case", [
    "missing text file", "malformed yaml", "unknown preset key", "value out of range", "unknown preset",
    "unknown model", "empty text", "context above the model's", "context above the window", "unknown device",
    "unknown bench device",
])
def test_bad_input_is_one_line_and_exit_2(cli, monkeypatch, capsys, tmp_path, case):
    args, needle = _bad_inputs(tmp_path)[case]
    code, _, err = cli(*args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.lower() in lines[0].lower()
    assert "Traceback" not in err


def test_debug_shows_the_traceback(cli, monkeypatch, capsys):
    from cimattn.errors import CimattnError

    monkeypatch.setattr(sys, "argv", ["cimattn", "presets", "show", "no-such-preset", "--debug"])
    with pytest.raises(CimattnError):
        main()


def test_run_digital_tiny_writes_results(cli, monkeypatch, capsys, tmp_path, tiny_text):
    out = tmp_path / "run"
    code, _, err = cli("run", "--model", "tiny-llama", "--preset", "digital", "--out", out,
                       "--text", tiny_text, "--eval-tokens", 256, "--context", 64, "--quiet")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    for key in ("model", "preset", "seed", "git_commit", "versions", "config", "timings", "metrics"):
        assert key in results
    m = results["metrics"]
    assert m["eval_tokens"] == 256 and m["scored_tokens"] == 256 - 4
    # the digital preset runs cimattn's digital attention: it must equal the model's own
    assert m["ppl_hardware_initial"] == pytest.approx(m["ppl_digital"], rel=1e-5)
    assert (out / "report.md").is_file()
    assert not list(out.glob(".*.tmp")), "no temporary files left behind"


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_gaincell_run_then_eval_and_generate_the_adapted_model(cli, monkeypatch, capsys, tmp_path, tiny_text, model):
    preset = tmp_path / "tiny-gaincell.yaml"
    preset.write_text(
        "attention: gaincell\ngaincell: {window_tokens: 64, tokens_per_array: 16}\n"
        "adapt: {calib_tokens: 128, calib_context: 32, init_iterations: 5, layerwise_steps: 2, finetune_steps: 2, train: attention}\n"
    )
    out = tmp_path / "run"
    common = ["--model", model, "--text", tiny_text, "--eval-tokens", 256, "--context", 64, "--quiet"]
    code, _, err = cli("run", *common, "--preset", preset, "--out", out)
    assert code == 0, err
    m = json.loads((out / "results.json").read_text())["metrics"]
    for key in ("ppl_digital", "ppl_hardware_initial", "ppl_linear_adapted", "ppl_hardware_initialized",
                "ppl_hardware_layerwise", "ppl_hardware_adapted"):
        assert m[key] > 1, key
    assert (out / "adapted" / "hardware.safetensors").is_file() and (out / "adaptation.png").is_file()
    by_position = json.loads((out / "results.json").read_text())["ppl_by_position"]  # the same tokens, banded by position
    assert set(by_position) == {"digital", "hardware_adapted"}
    assert [sum(b["tokens"] for b in bands) for bands in by_position.values()] == [m["scored_tokens"]] * 2
    assert "By position in the window" in (out / "report.md").read_text() and (out / "ppl_by_position.png").is_file()

    # the saved parameters reproduce the run's adapted perplexity
    code, _, err = cli("eval", *common, "--adapted", out / "adapted", "--out", tmp_path / "eval")
    assert code == 0, err
    again = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert again["ppl_hardware_adapted"] == pytest.approx(m["ppl_hardware_adapted"], rel=1e-6)

    # rerunning the same command resumes: nothing is recomputed, the numbers stay
    code, _, err = cli("run", *common, "--preset", preset, "--out", out)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["metrics"] == m

    code, text, err = cli("generate", "To be", "--model", model, "--adapted", out / "adapted",
                          "--max-new-tokens", 8, "--quiet")
    assert code == 0, err
    assert text.startswith("To be") and len(text.strip()) > len("To be")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gaincell_run_on_cuda_with_lora_ships_parameters_the_cpu_reproduces(cli, monkeypatch, capsys, tmp_path, tiny_text):
    preset = tmp_path / "tiny-lora.yaml"
    preset.write_text(
        "attention: gaincell\ngaincell: {window_tokens: 64, tokens_per_array: 16, normalize: true}\n"
        "adapt: {calib_tokens: 128, calib_context: 32, skip: [init], layerwise_steps: 2, finetune_steps: 2, train: lora, lora_rank: 4}\n"
    )
    out = tmp_path / "run"
    common = ["--model", "tiny-llama", "--text", tiny_text, "--eval-tokens", 256, "--context", 64, "--quiet"]
    code, _, err = cli("run", *common, "--preset", preset, "--out", out, "--device", "cuda")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["device"] == torch.cuda.get_device_name()
    code, _, err = cli("eval", *common, "--adapted", out / "adapted", "--out", tmp_path / "eval")  # on the CPU
    assert code == 0, err
    again = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert again["ppl_hardware_adapted"] == pytest.approx(results["metrics"]["ppl_hardware_adapted"], rel=2e-2)
    code, text, err = cli("generate", "To be", "--model", "tiny-llama", "--adapted", out / "adapted", "--device", "cuda",
                          "--max-new-tokens", 8, "--quiet")
    assert code == 0, err
    assert text.startswith("To be") and len(text.strip()) > len("To be")


def test_unsupported_architecture_is_one_line(cli, monkeypatch, capsys, tmp_path):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_supports_attention_backend", False)
    code, _, err = cli("eval", "--model", "tiny-llama", "--out", tmp_path / "r")
    assert code == 2 and "AttentionInterface" in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_leaves_finished_stages_and_no_partial_file(cli, monkeypatch, capsys, tmp_path, tiny_text):
    from cimattn import pipeline

    def interrupted(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "STAGES", [pipeline.STAGES[0], ("convert", interrupted), *pipeline.STAGES[2:]])
    out = tmp_path / "run"
    code, _, _ = cli("run", "--model", "tiny-llama", "--preset", "digital", "--out", out,
                     "--text", tiny_text, "--eval-tokens", 128, "--context", 64, "--quiet")
    assert code != 0
    results = json.loads((out / "results.json").read_text())  # complete JSON, with the finished stage
    assert "ppl_digital" in results["metrics"] and "ppl_hardware_initial" not in results["metrics"]
    assert not list(out.glob(".*.tmp"))


def test_adapt_command_writes_adapted_parameters(cli, monkeypatch, capsys, tmp_path, tiny_text):
    preset = tmp_path / "tiny-gaincell.yaml"
    preset.write_text("attention: gaincell\ngaincell: {window_tokens: 64, tokens_per_array: 16}\n"
                      "adapt: {calib_tokens: 128, init_iterations: 3, finetune_steps: 1}\n")
    out = tmp_path / "a"
    code, _, err = cli("adapt", "--model", "tiny-llama", "--preset", preset, "--out", out,
                       "--text", tiny_text, "--eval-tokens", 128, "--context", 32, "--quiet")
    assert code == 0, err
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert "ppl_digital" not in metrics and "ppl_hardware_initialized" in metrics
    assert (out / "adapted" / "hardware.safetensors").is_file() and (out / "report.md").is_file()


def test_replay_repeats_a_budgeted_run_step_for_step(cli, monkeypatch, capsys, tmp_path, tiny_text):
    """`--replay DIR` adapts with the step counts DIR's --budget run recorded: same counts, same perplexity, no clock."""
    preset = tmp_path / "tiny-gaincell.yaml"
    preset.write_text("attention: gaincell\ngaincell: {window_tokens: 64, tokens_per_array: 16}\n"
                      "adapt: {calib_tokens: 128, calib_context: 32, init_iterations: 3}\n")
    common = ["--model", "tiny-llama", "--preset", preset, "--text", tiny_text, "--eval-tokens", 128, "--context", 32, "--quiet"]
    code, _, err = cli("adapt", *common, "--out", tmp_path / "timed", "--budget", 3)
    assert code == 0, err
    timed = json.loads((tmp_path / "timed" / "results.json").read_text())
    assert timed["adapt_steps"].get("finetune", 0) > 0, timed["adapt_steps"]
    code, _, err = cli("adapt", *common, "--out", tmp_path / "again", "--replay", tmp_path / "timed")
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["adapt_steps"] == timed["adapt_steps"]
    assert again["metrics"]["ppl_hardware_layerwise"] == timed["metrics"]["ppl_hardware_layerwise"]

    for args, needle in ((["--replay", tmp_path / "timed", "--budget", 3], "--budget"),
                         (["--replay", tmp_path / "timed", "--seed", 1], "seed 0"),
                         (["--replay", tmp_path / "nowhere"], "no results.json")):
        code, _, err = cli("adapt", *common, "--out", tmp_path / "bad", *args)
        assert code == 2 and needle in err and "Traceback" not in err, err


def test_resumed_results_name_the_commit_that_measured_them(monkeypatch):
    """A rerun reuses an identical run's metrics; `measured_by` keeps the commit whose code measured them."""
    from cimattn import pipeline
    from cimattn.config import load_preset

    spec, hw = pipeline.RunSpec(), load_preset("leroux-gaincell")
    monkeypatch.setattr(pipeline, "git_commit", lambda: "aaa")
    first = pipeline.new_results(spec, hw, None)
    first["metrics"]["ppl_digital"] = 32.0
    monkeypatch.setattr(pipeline, "git_commit", lambda: "bbb")
    again = pipeline.new_results(spec, hw, first)
    assert (again["git_commit"], again["measured_by"], again["metrics"]) == ("bbb", "aaa", {"ppl_digital": 32.0})
    assert pipeline.new_results(spec, hw, again)["measured_by"] == "aaa"  # still the first run's code
    other = pipeline.new_results(pipeline.RunSpec(seed=1), hw, again)  # another spec: nothing reused
    assert (other["measured_by"], other["metrics"]) == ("bbb", {})


def test_a_rerun_with_another_configuration_adapts_afresh(cli, tmp_path):
    """DIR/adapted/ belongs to the configuration that made it: another preset (or budget, seed, …) into the same DIR
    must not resume from it, nor take its finished parameters for its own."""
    common = ["--model", "tiny-llama", "--eval-tokens", 128, "--context", 32, "--out", tmp_path / "run", "--quiet"]
    presets = {}
    for name, window in (("a", 64), ("b", 32)):
        presets[name] = tmp_path / f"{name}.yaml"
        presets[name].write_text(f"attention: gaincell\ngaincell: {{window_tokens: {window}, tokens_per_array: 16}}\n"
                                 "adapt: {calib_tokens: 64, calib_context: 32, init_iterations: 2, finetune_steps: 1}\n")
    assert cli("adapt", *common, "--preset", presets["a"])[0] == 0
    first = (tmp_path / "run" / "adapted" / "preset.yaml").read_text()
    code, _, err = cli("adapt", *common, "--preset", presets["b"])
    assert code == 0, err
    assert (tmp_path / "run" / "adapted" / "preset.yaml").read_text() != first  # adapted for b, not a's reused
    assert "window_tokens: 32" in (tmp_path / "run" / "adapted" / "preset.yaml").read_text()
    (tmp_path / "run" / "results.json").unlink()  # an adapted/ nobody can vouch for: one clear line, nothing removed
    code, _, err = cli("adapt", *common, "--preset", presets["a"])
    assert code == 2 and "no results.json" in err and (tmp_path / "run" / "adapted").is_dir()
