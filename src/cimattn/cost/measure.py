"""Measured mode: time the model's own attention (SDPA) on this machine (CPU, or CUDA) and fit a roofline with memory levels.

Prefill: `scaled_dot_product_attention` over a causal prompt of T tokens.  Decode: one
query over a KV cache of L tokens (GQA through `enable_gqa`).  Each point is the median
of `repeats` timings after a warm-up (the fastest repeat is kept too).  The model of a point is
    t = t0 + flops / F + bytes / BW(working set)
with BW chosen by the cache level the working set fits in (L2, L3, DRAM; sizes read
from the OS, the last level's effective size chosen by the fit).  t0, F and the three
bandwidths (stored as logs: exp gives s, FLOP/s, B/s) are fitted in torch (log-space
least squares) on every other grid point and judged on the held-out rest by MAPE.
"""
from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cimattn.cost.workload import ModelShape

CI_GRID = {"prefill": [32, 64, 128, 256], "decode": [256, 1024, 4096, 16384]}
FULL_GRID = {"prefill": [32, 64, 96, 128, 192, 256, 384, 512, 768, 1024],
             "decode": [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]}


@dataclass
class Point:
    mode: str  # prefill | decode
    tokens: int
    seconds: float
    spread: float  # (max − min) / median of the repeats
    flops: float
    bytes: float
    seconds_min: float  # the fastest repeat: the machine without the other processes' load, nearly


def cache_sizes() -> dict[str, int]:
    """L2 and L3 bytes of this CPU (per core L2, shared L3), from sysfs; conservative defaults elsewhere."""
    sizes = {"L2": 1 << 20, "L3": 32 << 20}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            level = int((idx / "level").read_text())
            text = (idx / "size").read_text().strip()
            size = int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text)
        except (OSError, ValueError, KeyError):
            continue
        if level in (2, 3):
            sizes[f"L{level}"] = size
    return sizes


def counts(shape: ModelShape, mode: str, tokens: int, element: int = 4) -> tuple[float, float]:
    """(FLOPs, bytes moved) of one attention layer call."""
    h, kv, d = shape.heads, shape.kv_heads, shape.head_dim
    if mode == "prefill":
        # causal: half of 4·T²·h·d FLOPs; traffic: q, k, v, o plus the T×T scores of every head, which leave L2
        # once T ≳ 200 (counting them cut the held-out error from 21 % to 15 % on this CPU's measurements)
        return 2.0 * tokens * tokens * h * d, float((2 * h + 2 * kv) * tokens * d * element + tokens * tokens * h * element)
    return 4.0 * tokens * h * d, float((2 * kv * tokens + 2 * h) * d * element)


DTYPES = {"cpu": torch.float32, "cuda": torch.float16}  # what each device's SDPA decode normally runs in


def _call(shape: ModelShape, mode: str, tokens: int, generator: torch.Generator, device: str):
    """A zero-argument SDPA call on fresh random q, k, v of this grid point, and its element size."""
    h, kv, d = shape.heads, shape.kv_heads, shape.head_dim
    q_len = tokens if mode == "prefill" else 1
    dtype = DTYPES[device]
    q = torch.randn(1, h, q_len, d, generator=generator).to(device, dtype)  # (B, H, T, D)
    k = torch.randn(1, kv, tokens, d, generator=generator).to(device, dtype)
    v = torch.randn(1, kv, tokens, d, generator=generator).to(device, dtype)
    return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=mode == "prefill", enable_gqa=kv != h)), q.element_size()


def measure(shape: ModelShape, grid: dict[str, list[int]] = CI_GRID, repeats: int = 15, seed: int = 0,
            device: str = "cpu") -> list[Point]:
    """Median of `repeats` timings per grid point.  The repeats sweep the whole grid round-robin, so a burst
    of load from other processes lands on every point alike instead of on a contiguous stretch of the grid;
    each timed call follows an untimed one of the same point, so caches hold what a repeated call finds."""
    g = torch.Generator().manual_seed(seed)
    keys = [(mode, n) for mode, ns in grid.items() for n in ns]
    calls = {key: _call(shape, *key, g, device) for key in keys}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict = {key: [] for key in keys}
    with torch.inference_mode():
        for call, _ in calls.values():
            for _ in range(3):  # warm-up: allocator, kernel selection, caches
                call()
        for _ in range(repeats):
            for key, (call, _) in calls.items():
                call()  # re-warm this point's caches: the previous point evicted them
                sync()
                t0 = time.perf_counter()
                call()
                sync()
                times[key].append(time.perf_counter() - t0)
    points = []
    for (mode, n), ts in times.items():
        med = statistics.median(ts)
        flops, bytes_ = counts(shape, mode, n, element=calls[(mode, n)][1])
        points.append(Point(mode, n, med, (max(ts) - min(ts)) / med, flops, bytes_, min(ts)))
    return points


def device_caches(device: str) -> dict[str, int]:
    """Cache levels the working set is judged against: the CPU's L2 / L3, or a GPU's L2 (no L3)."""
    if device == "cuda":
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        return {"L2": l2, "L3": l2}
    return cache_sizes()


class CpuRoofline(torch.nn.Module):
    """t = t0 + flops / F + bytes / BW(level of the working set), parameters in log space."""

    LEVELS = ("L2", "L3", "DRAM")

    def __init__(self, caches: dict[str, int]):
        super().__init__()
        self.caches = caches
        self.log_t0 = torch.nn.Parameter(torch.tensor(-11.0, dtype=torch.float64))  # ≈ 17 µs
        self.log_flops = torch.nn.Parameter(torch.tensor(23.0, dtype=torch.float64))  # ≈ 1e10 FLOP/s
        self.log_bw = torch.nn.Parameter(torch.tensor([24.0, 23.5, 23.0], dtype=torch.float64))  # ≈ 26, 16, 10 GB/s

    def level(self, bytes_: torch.Tensor) -> torch.Tensor:
        return (bytes_ > self.caches["L2"]).long() + (bytes_ > self.caches["L3"]).long()

    def forward(self, flops: torch.Tensor, bytes_: torch.Tensor) -> torch.Tensor:
        bw = torch.exp(self.log_bw)[self.level(bytes_)]
        return torch.exp(self.log_t0) + flops / torch.exp(self.log_flops) + bytes_ / bw


def _tensors(points: list[Point]):
    f = torch.tensor([p.flops for p in points], dtype=torch.float64)
    b = torch.tensor([p.bytes for p in points], dtype=torch.float64)
    t = torch.tensor([p.seconds for p in points], dtype=torch.float64)
    return f, b, t


def fit(points: list[Point], caches: dict[str, int] | None = None, steps: int = 400) -> CpuRoofline:
    """Fit t0, F and the level bandwidths; the last-level cache's *effective* size (shared with other
    processes, a VM's slice) is chosen among the gaps between measured working sets, at most the OS's size."""
    caches = caches or cache_sizes()
    sizes = sorted({p.bytes for p in points if caches["L2"] < p.bytes <= caches["L3"]})
    candidates = [caches["L3"]] + [(a * b) ** 0.5 for a, b in itertools.pairwise(sizes)] + ([sizes[0] * 0.99] if sizes else [])
    fits = [_fit_once(points, caches | {"L3": c}, steps) for c in candidates]
    return min(fits, key=lambda m: _log_loss(m, points))


def _log_loss(model: CpuRoofline, points: list[Point]) -> float:
    f, b, t = _tensors(points)
    with torch.no_grad():
        return float(((torch.log(model(f, b)) - torch.log(t)) ** 2).mean())


def _fit_once(points: list[Point], caches: dict[str, int], steps: int) -> CpuRoofline:
    model = CpuRoofline(caches)
    f, b, t = _tensors(points)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((torch.log(model(f, b)) - torch.log(t)) ** 2).mean()
        loss.backward()
        opt.step()
    return model


def split(points: list[Point]) -> tuple[list[Point], list[Point]]:
    """Every other point of each mode's grid for fitting; the rest held out."""
    train, test = [], []
    for mode in dict.fromkeys(p.mode for p in points):
        ps = [p for p in points if p.mode == mode]
        train += ps[0::2]
        test += ps[1::2]
    return train, test


def mape(model: CpuRoofline, points: list[Point]) -> float:
    f, b, t = _tensors(points)
    with torch.no_grad():
        return float(((model(f, b) - t).abs() / t).mean())


def naive_mape(train: list[Point], test: list[Point]) -> float:
    """The anchor: a plain roofline (one bandwidth, no overhead, no cache levels) fitted the same way."""
    model = _fit_once(train, {"L2": float("inf"), "L3": float("inf")}, 400)
    with torch.no_grad():
        model.log_t0.fill_(-60.0)
    return mape(model, test)


def run_bench(shape: ModelShape, out: Path, grid: dict[str, list[int]] = CI_GRID, repeats: int = 15, seed: int = 0,
              threads: int | None = None, device: str = "cpu") -> dict:
    """Measure, fit on half, report held-out MAPE, write roofline.json and roofline.png into `out`."""
    from cimattn.errors import CimattnError
    from cimattn.storage import atomic_write_json

    if device not in DTYPES or (device == "cuda" and not torch.cuda.is_available()):
        raise CimattnError(f"--device {device}: choose cpu{' or cuda' if torch.cuda.is_available() else ' (no CUDA device here)'}")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        points = measure(shape, grid, repeats, seed, device)
    finally:
        torch.set_num_threads(previous)
    train, test = split(points)
    model = fit(train, device_caches(device))
    fastest = [Point(**(p.__dict__ | {"seconds": p.seconds_min})) for p in points]
    model_min = fit(split(fastest)[0], device_caches(device))
    result = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "threads": threads or previous, "shape": shape.__dict__, "repeats": repeats,
        "caches_bytes": model.caches, "caches_bytes_os": device_caches(device),
        "fitted": {k: v.detach().exp().tolist() for k, v in model.named_parameters()},
        "mape_train": mape(model, train), "mape_heldout": mape(model, test),
        "mape_heldout_by_mode": {m: mape(model, [p for p in test if p.mode == m]) for m in grid if any(p.mode == m for p in test)},
        "median_spread": statistics.median(p.spread for p in points),
        "mape_heldout_plain_roofline": naive_mape(train, test),
        "mape_heldout_fastest_repeat": mape(model_min, split(fastest)[1]),
        "max_spread": max(p.spread for p in points),
        "points": [p.__dict__ | {"predicted_s": float(model(*[torch.tensor([x], dtype=torch.float64) for x in (p.flops, p.bytes)]).detach()),
                                 "held_out": p in test} for p in points],
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "roofline.json", result)
    _plot(out, result)
    return result


def _plot(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cimattn.storage import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, mode in zip(axes, ("prefill", "decode")):
        ps = [p for p in result["points"] if p["mode"] == mode]
        if not ps:
            continue
        x = [p["tokens"] for p in ps]
        ax.plot(x, [p["predicted_s"] for p in ps], "-", color="k", label="model")
        ax.scatter([p["tokens"] for p in ps if not p["held_out"]], [p["seconds"] for p in ps if not p["held_out"]], label="measured (fit)")
        ax.scatter([p["tokens"] for p in ps if p["held_out"]], [p["seconds"] for p in ps if p["held_out"]], marker="x", label="measured (held out)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens" if mode == "prefill" else "KV-cache tokens")
        ax.set_ylabel("seconds per call (median)")
        ax.set_title(f"SDPA {mode} · {result['device']}")
        ax.legend(fontsize=7)
    fig.suptitle(f"held-out MAPE {result['mape_heldout']:.1%} (plain roofline {result['mape_heldout_plain_roofline']:.1%})", fontsize=9)
    save_figure(fig, out / "roofline.png")
