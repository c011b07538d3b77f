"""Spaces built in code for the co-design tests: the analytic problem with a known front, and a tiny real one."""

import pytest

from cimattn.codesign import parse_space


def analytic_space(dim: int = 2, objectives=("f1", "f2")):
    return parse_space({
        "name": "zdt", "evaluator": "analytic",
        "parameters": [{"name": f"x{i}", "path": f"x{i}", "type": "float", "low": 0, "high": 1} for i in range(dim)],
        "objectives": [{"metric": m, "log": False, "ref": 1.1} for m in objectives],
    })


@pytest.fixture
def zdt():
    return analytic_space()


@pytest.fixture
def analytic():
    """The analytic space factory: analytic(dim, objectives)."""
    return analytic_space


@pytest.fixture
def tiny_space(tiny_text):
    return parse_space({
        "name": "tiny", "model": "tiny-llama", "preset": "leroux-gaincell", "text": str(tiny_text),
        "context": 64, "calib_tokens": 128, "eval_tokens": 128,
        "parameters": [
            {"name": "q_levels", "path": "gaincell.q.levels", "type": "int", "low": 4, "high": 16},
            {"name": "tau_s", "path": "gaincell.leakage.tau_s", "type": "float", "low": 1e-6, "high": 1e-2, "log": True},
            {"name": "spread", "path": "adaptation.qkv_spread", "type": "float", "low": 0.1, "high": 0.4},
        ],
        "objectives": [{"metric": "ppl"}, {"metric": "energy_per_token_j"}],
        "constraints": ["ppl <= 100 * ppl_digital"],
    })
