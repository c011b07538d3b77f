"""The measured mode's roofline (cost/measure.py) on synthetic timings whose law is known."""

import pytest
import torch

from cimattn.cost import measure
from cimattn.cost.workload import ModelShape

SHAPE = ModelShape("smollm2-like", layers=1, heads=9, kv_heads=3, head_dim=64)


def _points(law: measure.MeasuredRoofline, device: str = "cpu") -> list[measure.Point]:
    """The full grid's points timed by `law`, counted as `device` runs them (fp32 on the CPU, fp16 on CUDA)."""
    points = []
    for mode, ns in measure.FULL_GRID.items():
        for n in ns:
            block = measure.q_block(mode, n, device)
            flops, bytes_ = measure.counts(SHAPE, mode, n, element=measure.DTYPES[device].itemsize, block=block,
                                           kv_block=measure.KV_BLOCKS[device])
            p = measure.Point(mode, n, 0.0, 0.0, flops, bytes_, 0.0, block)
            with torch.no_grad():
                p.seconds = p.seconds_min = float(law.predict([p]))
            points.append(p)
    return points


def test_cpu_flash_kernel_block_sizes_and_tile_counts():
    # PyTorch's CPU flash kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): 32-row query blocks below 192
    # tokens, 64 below 768, 256 beyond, 512-column key blocks; decode is a one-row product
    assert [measure.q_block("prefill", n) for n in (32, 191, 192, 767, 768)] == [32, 32, 64, 64, 256]
    assert measure.q_block("decode", 100_000) == 1
    # 4 tokens in one 32-row block: every pair of the 4×4 square is computed, 4·h·d FLOPs per pair
    flops, _ = measure.counts(SHAPE, "prefill", 4, block=32)
    assert flops == 4.0 * 16 * 9 * 64
    # 64 tokens in two 32-row blocks, each scoring the one 64-column key block whole (masked half included)
    assert measure.counts(SHAPE, "prefill", 64, block=32)[0] == 4.0 * (32 * 64 + 32 * 64) * 9 * 64
    # 640 tokens in 64-row blocks: the 8 blocks below row 512 score the first 512 keys, the last 2 all 640
    assert measure.computed_pairs(640, 64, 512) == 8 * 64 * 512 + 2 * 64 * 640
    # 1,024 tokens in 256-row blocks: 512, 512, 1,024 and 1,024 keys
    assert measure.computed_pairs(1024, 256, 512) == 256 * (512 + 512 + 1024 + 1024)
    # equal square tiles (FlashAttention-2 on CUDA, 128 × 128): the causal half plus half of each diagonal tile
    assert measure.computed_pairs(1024, 128, 128) == 1024 * 1024 / 2 + 1024 * 128 / 2


def test_fit_recovers_a_known_law_and_predicts_held_out_points():
    law = measure.MeasuredRoofline({"L2": 1 << 20, "L3": 8 << 20}, [1, 32, 64, 256])
    with torch.no_grad():
        law.log_t0.fill_(torch.tensor(5e-6).log())
        law.log_flops.copy_(torch.tensor([1e10, 2e10, 3e10, 5e10]).log())
        law.log_bw.copy_(torch.tensor([4e10, 2e10, 4e9]).log())
    train, test = measure.split(_points(law))
    model = measure.fit(train, {"L2": 1 << 20, "L3": 32 << 20})
    assert measure.mape(model, test) < 0.02
    assert measure.naive_mape(train, test) > 0.1  # the plain roofline cannot: overhead, block sizes, cache levels
    assert model.fitted()["capacity_bytes"]["L3"] == pytest.approx(8 << 20, rel=0.15)


def test_gpu_fit_overlaps_launch_and_kernel_time():
    """CUDA is asynchronous: a call costs the smooth maximum of the host's launch time and the kernel's, not their sum.
    Fitting that law's timings recovers held-out points; the synchronous (sum) model cannot bend from flat to rising."""
    caches = {"L2": 50 << 20, "L3": 50 << 20}
    law = measure.MeasuredRoofline(caches, [measure.CUDA_Q_BLOCK], overlap=True)
    with torch.no_grad():
        law.log_t0.fill_(torch.tensor(3e-6).log())
        law.log_flops.fill_(torch.tensor(1e13).log())  # the prefill grid's largest prompt reaches ~3x the host time
        law.log_bw.copy_(torch.tensor([2e12, 2e12, 2e12]).log())
        law.log_host.fill_(torch.tensor(25e-6).log())
        law.log_p.fill_(torch.tensor(3.0 - 1).log())  # p = 3
    train, test = measure.split(_points(law, "cuda"))
    model = measure.fit(train, caches, overlap=True)
    assert measure.mape(model, test) < 0.03
    assert measure.mape(measure.fit(train, caches), test) > 1.5 * measure.mape(model, test)
    assert model.fitted()["host_s"] == pytest.approx(25e-6, rel=0.2)
