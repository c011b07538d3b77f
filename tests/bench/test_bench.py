"""`cimattn bench` on a tiny model and a tiny grid: every attention timed beside digital, ratios, files, errors."""

import json
import sys

import pytest

from cimattn.bench import (
    ATTENTIONS,
    Grid,
    parse_sizes,
    peak_memory,
    run_bench,
    time_call,
)
from cimattn.cli import main
from cimattn.errors import CimattnError

TINY = Grid(prefill=(32,), decode=(48,), batch=(1, 2), context=16, repeats=1)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, run_bench("tiny-llama", out, TINY)


def test_every_point_has_every_attention_beside_digital(record):
    _, rec = record
    names = {"digital", *ATTENTIONS}
    points = {(r["mode"], r["tokens"], r["batch"]) for r in rec["attention"]}
    assert points == {("prefill", 32, 1), ("prefill", 32, 2), ("decode", 48, 1), ("decode", 48, 2)}
    for point in points:
        rows = {r["attention"]: r for r in rec["attention"] if (r["mode"], r["tokens"], r["batch"]) == point}
        assert names <= set(rows) <= names | {f"{family}_torch" for family in ATTENTIONS}  # the torch paths join on CUDA
        base = rows["digital"]["median_s"]
        for r in rows.values():
            assert r["median_s"] > 0 and r["min_s"] <= r["median_s"] and r["peak_bytes"] >= 0
            assert r["time_ratio"] == pytest.approx(r["median_s"] / base)
        assert rows["digital"]["time_ratio"] == 1.0
    assert rec["shape"] == {"heads": 4, "kv_heads": 2, "head_dim": 16}  # tiny-llama's attention


def test_model_throughput_ratios_and_files(record):
    out, rec = record
    rows = {r["attention"]: r for r in rec["model_throughput"]}
    assert set(rows) == {"digital", *ATTENTIONS}
    for r in rows.values():
        assert r["context"] == 16 and r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["prefill_throughput_ratio"] == pytest.approx(r["prefill_tokens_per_s"] / rows["digital"]["prefill_tokens_per_s"])
        assert r["decode_throughput_ratio"] == pytest.approx(r["decode_tokens_per_s"] / rows["digital"]["decode_tokens_per_s"])
    saved = json.loads((out / "bench.json").read_text())
    assert saved["attention"] == rec["attention"] and saved["versions"]["torch"] and "git_commit" in saved
    assert saved["load_average"]["before"] and saved["devices"]["cpu"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_call_takes_the_median_after_a_warm_up():
    calls = []
    delays = iter([0.0, 0.03, 0.01, 0.02])  # warm-up, then three timed calls

    def fn():
        import time

        calls.append(1)
        time.sleep(next(delays))

    t = time_call(fn, "cpu", 3)
    assert len(calls) == 4 and t["repeats"] == 3
    assert t["median_s"] >= 0.02 and 0.01 <= t["min_s"] <= t["median_s"]  # a sleep lasts at least its time (load adds)


def test_peak_memory_sees_a_large_allocation():
    import torch

    def allocate():
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        return int(x[::4096].sum())

    assert peak_memory(allocate, "cpu") >= 48 << 20


def test_bad_sizes_are_one_line_errors(monkeypatch, capsys, tmp_path):
    with pytest.raises(CimattnError, match="--prefill"):
        parse_sizes("512,abc", "prefill")
    with pytest.raises(CimattnError, match="--batch"):
        parse_sizes("0", "batch")
    monkeypatch.setattr(sys, "argv", ["cimattn", "bench", "--model", "tiny-llama", "--out", str(tmp_path), "--decode", "1k"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--decode" in err and len(err.strip().splitlines()) == 1


def test_cli_writes_bench_json(monkeypatch, capsys, tmp_path):
    args = ["bench", "--model", "tiny-llama", "--out", tmp_path, "--prefill", "16", "--decode", "16", "--batch", "1",
            "--context", "0", "--repeats", "1", "--quiet"]
    monkeypatch.setattr(sys, "argv", ["cimattn", *map(str, args)])
    try:
        main()
    except SystemExit as e:
        assert not e.code
    rec = json.loads((tmp_path / "bench.json").read_text())
    assert {r["attention"] for r in rec["attention"] if r["device"] == "cpu"} == {"digital", *ATTENTIONS}
    assert rec["model_throughput"] == []


def test_training_step_calls_give_the_gradients_of_q_k_v():
    """The CUDA-only training-step point (mode "train"), exercised on the CPU: digital and gain-cell forward + backward."""
    from cimattn.bench import Shape, hardware_presets, training_calls

    hardware, _ = hardware_presets()
    calls = training_calls(Shape(heads=4, kv_heads=2, head_dim=16), 24, 2, "cpu", 0, hardware)
    assert set(calls) == {"digital", "gaincell"}
    for name, call in calls.items():
        dq, dk, dv = call()
        assert dq.shape == (2, 4, 24, 16) and dk.shape == dv.shape == (2, 2, 24, 16), name
        assert all(g.abs().sum() > 0 for g in (dq, dk, dv)), name
