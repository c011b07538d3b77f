"""The GPT-2 reproduction recipe (recipes/gpt2_leroux.py, preset leroux-gpt2) end to end on a tiny random GPT-2."""

import json
import runpy
from pathlib import Path

import yaml

from cimattn.config import load_preset, preset_yaml

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gpt2_leroux.py"


def test_gpt2_preset_is_the_papers():
    hw = load_preset("leroux-gpt2")
    g, a = hw.gaincell, hw.adapt
    # Leroux et al. (PAPERS.md §1): 1,024-token window of 64 x 64 arrays, the gain-cell design of leroux-gaincell
    assert g == load_preset("leroux-gaincell").gaincell
    assert (g.window_tokens, g.tokens_per_array, g.head_dim_per_array) == (1024, 64, 64)
    # the recipe: 60 x 1,024-token fixed batch, at most 100 iterations to 1e-4; AdamW 6e-4, (0.9, 0.95), wd 0.1,
    # clip 1.0, 2,000 warm-up steps, 13,000 nonlinear iterations, the whole model trained
    assert (a.calib_tokens, a.calib_context, a.init_iterations, a.init_tolerance) == (61440, 1024, 100, 1e-4)
    assert (a.lr, a.betas, a.weight_decay, a.grad_clip, a.warmup_steps) == (6e-4, (0.9, 0.95), 0.1, 1.0, 2000)
    assert (a.finetune_steps, a.layerwise_steps, a.train) == (13000, 0, "all")


def test_recipe_runs_end_to_end_on_tiny_gpt2(tmp_path, tiny_text, monkeypatch):
    from local_tasks import write_tasks  # tests/local_tasks.py

    # the shipped preset at CI size: only the amounts of data shrink
    data = yaml.safe_load(preset_yaml(load_preset("leroux-gpt2")))
    data["gaincell"].update(window_tokens=64, tokens_per_array=16)
    data["adapt"].update(calib_tokens=128, calib_context=64, init_iterations=5, finetune_steps=2, warmup_steps=1, batch_size=1)
    preset = tmp_path / "tiny-gpt2-leroux.yaml"
    preset.write_text(yaml.safe_dump(data))
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["gpt2_leroux.py"])
    summary = runpy.run_path(str(RECIPE))["main"]([
        "--model", "tiny-gpt2", "--preset", str(preset), "--text", str(tiny_text), "--context", "64", "--eval-tokens", "256",
        "--tasks", "local_mc,local_ll", "--include-path", str(tasks), "--limit", "3", "--batch-size", "2", "--out", str(out),
    ])
    m = json.loads((out / "results.json").read_text())["metrics"]
    for key in ("ppl_digital", "ppl_hardware_initial", "ppl_linear_adapted", "ppl_hardware_initialized", "ppl_hardware_adapted"):
        assert m[key] > 1, key
    hardware = json.loads((out / "lm-eval-hardware" / "results.json").read_text())
    digital = json.loads((out / "lm-eval-digital" / "results.json").read_text())
    assert hardware["adapted"] == str(out / "adapted") and digital["preset"] == "digital"
    assert hardware["metrics"]["lm_eval"]["local_ll"]["perplexity"] != digital["metrics"]["lm_eval"]["local_ll"]["perplexity"]
    assert summary["lm_eval_hardware"]["lm_eval"]["local_mc"]["acc"] >= 0
