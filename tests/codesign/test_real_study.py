"""The real evaluator on tiny-llama: convert, fit the scalers, perplexity, cost — deterministic, cached, searched."""

import math

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
