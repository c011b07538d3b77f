"""The lm-eval adapter on local tasks the test writes (offline): the `cimattn` model scores what the hardware model scores."""

import json
import math

import pytest
import torch
from local_tasks import LL_DOCS, MC_DOCS, write_tasks  # tests/local_tasks.py

from cimattn.eval.harness import (
    PAPER_TASKS,
    CimattnLM,
    evaluate_tasks,
    expand_tasks,
    summary,
)
from cimattn.pipeline import hardware_model


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@torch.inference_mode()
def own_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), computed directly: the oracle for lm-eval's number."""
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(continuation, add_special_tokens=False)
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), dim=-1)[0]
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def expected(preset):
    model, tokenizer = hardware_model("tiny-llama", preset, None, seed=0)
    acc = sum(
        max(range(3), key=lambda c: own_loglikelihood(model, tokenizer, d["question"], " " + d["choices"][c])) == d["answer"]
        for d in MC_DOCS
    ) / len(MC_DOCS)
    lls = [own_loglikelihood(model, tokenizer, d["context"], d["continuation"]) for d in LL_DOCS]
    return acc, math.exp(-sum(lls) / len(lls))


def test_local_tasks_score_the_hardware_model(tasks):
    # batch 2: lm-eval pads the shorter request, which must not change any score
    lm = CimattnLM(model="tiny-llama", preset="leroux-gaincell", batch_size=2)
    table = summary(evaluate_tasks(lm, "local_mc,local_ll", include_path=tasks), ["local_mc", "local_ll"])["tasks"]
    acc, ppl = expected("leroux-gaincell")
    assert table["local_mc"]["acc"] == pytest.approx(acc)
    assert table["local_ll"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
    _, digital_ppl = expected(None)
    assert not math.isclose(ppl, digital_ppl, rel_tol=1e-3), "the hardware model must score differently from the digital one"
    assert lm.max_length == 1024  # the preset's window


def test_paper_flag_expands_to_table_1():
    assert expand_tasks("paper") == list(PAPER_TASKS)
    assert expand_tasks("piqa, paper,local_mc") == ["piqa", *[t for t in PAPER_TASKS if t != "piqa"], "local_mc"]
    assert len(PAPER_TASKS) == 8 and "xwinograd" in PAPER_TASKS




def test_cli_writes_results(cli, monkeypatch, capsys, tmp_path, tasks):
    out = tmp_path / "lm"
    code, _, err = cli("lm-eval", "--model", "tiny-llama", "--preset", "leroux-gaincell",
                       "--tasks", "local_ll", "--include-path", tasks, "--limit", 2, "--out", out, "--quiet")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    for key in ("model", "preset", "seed", "git_commit", "versions", "config", "timings", "metrics"):
        assert key in results
    assert results["preset"] == "leroux-gaincell" and results["lm_eval"]["n-samples"]["local_ll"]["effective"] == 2
    assert results["metrics"]["lm_eval"]["local_ll"]["perplexity"] > 1


def test_cli_bad_include_path_is_one_line(cli, monkeypatch, capsys, tmp_path):
    code, _, err = cli("lm-eval", "--model", "tiny-llama", "--tasks", "local_ll",
                       "--include-path", tmp_path / "nope", "--out", tmp_path / "o", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "include-path" in err


def test_lm_eval_entry_point_knows_the_cimattn_model(cli, monkeypatch, capsys, tasks):
    from cimattn.eval.harness import cli_evaluate

    code, out, err = cli("--model", "cimattn",
                         "--model_args", "model=tiny-llama,preset=leroux-gaincell", "--tasks", "local_mc",
                         "--include_path", tasks, "--device", "cpu", "--limit", "3",
                         entry=cli_evaluate, prog="cimattn-lm-eval")
    assert code == 0, err
    assert "local_mc" in out and "acc" in out


def test_entry_point_bad_model_args_is_one_line(cli, monkeypatch, capsys, tasks):
    from cimattn.eval.harness import cli_evaluate

    code, _, err = cli("--model", "cimattn", "--model_args", "model=tiny-llama,preset=no-such-preset", "--tasks", "local_mc",
                       "--include_path", tasks, entry=cli_evaluate, prog="cimattn-lm-eval")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: unknown preset")
