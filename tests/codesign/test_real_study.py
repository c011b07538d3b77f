"""The real evaluator on tiny-llama: convert, fit the scalers, perplexity, cost — deterministic, cached, searched."""

import importlib.util
import json
import math
import shutil

import pytest

from cimattn.codesign import run_study, summarise
from cimattn.codesign.evaluators import CostModel, RealEvaluator


def test_real_evaluator_is_deterministic_and_costed(tiny_space):
    a, b = RealEvaluator(tiny_space, seed=0), RealEvaluator(tiny_space, seed=0)
    params = tiny_space.from_unit([0.5, 0.5, 0.5])
    ma, mb = a(params), b(params)
    assert ma["ppl"] == mb["ppl"] and math.isfinite(ma["ppl"]) and ma["ppl"] > 1
    assert a.constants()["ppl_digital"] > 1
    assert ma["energy_per_token_j"] == CostModel(tiny_space)(params)["energy_per_token_j"] > 0
    # fewer query-DAC levels cost less energy (the cost model charges per level) and change the perplexity
    low = a(tiny_space.from_unit([0.0, 0.5, 0.5]))
    assert low["energy_per_token_j"] < ma["energy_per_token_j"]
    assert low["ppl"] != ma["ppl"]
    # the adaptation knob reaches the scalers: another q/k/v spread, another perplexity, same cost
    other = a(tiny_space.from_unit([0.5, 0.5, 0.0]))
    assert other["ppl"] != ma["ppl"] and other["energy_per_token_j"] == ma["energy_per_token_j"]


def test_small_real_study_proxy_and_tpe(tmp_path, tiny_space, monkeypatch):
    calls = []
    original = RealEvaluator.__call__
    monkeypatch.setattr(RealEvaluator, "__call__", lambda self, p: calls.append(p) or original(self, p))
    trials = run_study(tiny_space, tmp_path, 6, ["proxy", "tpe"], batch=2)
    assert all(len(t) == 6 for t in trials.values())
    n = len(calls)
    assert n <= 12
    run_study(tiny_space, tmp_path, 6, ["proxy", "tpe"], batch=2)  # resumed when finished: nothing evaluated again
    assert len(calls) == n
    s = summarise(tiny_space, tmp_path, ["proxy", "tpe"])
    assert s["constants"]["ppl_digital"] > 1 and s["front"]
    assert (tmp_path / "front.md").read_text().count("|") > 10


def test_adapted_start_gives_every_point_one_adaptation(tmp_path, tiny_text):
    """start: adapted adapts once (replayed step counts, into DIR/start/) and every design runs those parameters: at the
    preset's own values a design scores exactly the adapted run's perplexity; another window moves it."""
    from cimattn.codesign import parse_space
    from cimattn.codesign.evaluators import adapt_start
    from cimattn.storage import read_json

    preset = tmp_path / "tiny.yaml"
    preset.write_text("name: tiny-adapted\nattention: gaincell\ngaincell: {window_tokens: 64, tokens_per_array: 16}\n"
                      "adapt: {calib_tokens: 128, calib_context: 32, skip: [init], train: attention}\n")
    space = parse_space({
        "name": "tiny-adapted", "model": "tiny-llama", "preset": str(preset), "text": str(tiny_text), "context": 64, "eval_tokens": 128,
        "start": "adapted", "adapt_steps": {"linear_finetune": 1, "layerwise": 1, "finetune": 1},
        "parameters": [{"name": "window", "path": "gaincell.window_tokens", "type": "categorical", "choices": [32, 64]},
                       {"name": "adc", "path": "gaincell.av_out.levels", "type": "int", "low": 8, "high": 32}],
        "objectives": [{"metric": "ppl"}, {"metric": "energy_per_token_j"}],
    })
    adapted = adapt_start(space, 0, tmp_path)
    run = read_json(tmp_path / "start" / "results.json")
    assert run["adapt_steps"] == {"linear_finetune": 1, "layerwise": 1, "finetune": 1}
    evaluator = RealEvaluator(space, seed=0, adapted=adapted)
    own = evaluator({"window": 64, "adc": 32})  # the preset's values
    assert own["ppl"] == run["metrics"]["ppl_hardware_adapted"]
    assert evaluator.constants()["ppl_digital"] == run["metrics"]["ppl_digital"]
    narrow = evaluator({"window": 32, "adc": 32})
    assert narrow["ppl"] != own["ppl"] and math.isfinite(narrow["ppl"])
    assert adapt_start(space, 0, tmp_path).keys() == adapted.keys()  # resumed: the finished adaptation is loaded, not rerun
    trials = run_study(space, tmp_path, 3, ["random"])
    assert len(trials["random"]) == 3
    if importlib.util.find_spec("ray") is not None:  # Ray workers get the adapted parameters too: the same metrics
        shutil.copytree(tmp_path / "start", tmp_path / "ray" / "start")  # the finished adaptation, not rerun
        remote = run_study(space, tmp_path / "ray", 3, ["random"], workers=2)
        assert {json.dumps(p, sort_keys=True): m["ppl"] for p, m in remote["random"]} == \
            {json.dumps(p, sort_keys=True): m["ppl"] for p, m in trials["random"]}


def test_adapted_start_refuses_what_it_cannot_run(tiny_space):
    from cimattn.codesign import parse_space
    from cimattn.errors import CimattnError

    data = tiny_space.model_dump(mode="json") | {"start": "adapted"}
    with pytest.raises(CimattnError, match="needs adapt_steps"):
        parse_space(data)
    with pytest.raises(CimattnError, match="training-free fit"):  # tiny_space tunes adaptation.qkv_spread
        parse_space(data | {"adapt_steps": {"finetune": 1}})
    with pytest.raises(CimattnError, match="stages are"):
        parse_space(data | {"adapt_steps": {"finetuning": 1}})
    with pytest.raises(CimattnError, match="start: adapted only"):
        parse_space(tiny_space.model_dump(mode="json") | {"adapt_steps": {"finetune": 1}})
