"""Measured mode: time the model's own attention (SDPA) on this machine (CPU, or CUDA) and fit a roofline with memory levels.

Prefill: `scaled_dot_product_attention` over a causal prompt of T tokens.  Decode: one
query over a KV cache of L tokens (GQA through `enable_gqa`).  Each point is the median
of `repeats` timings after a warm-up (the fastest repeat is kept too); on the CPU one timing
averages back-to-back calls over at least CPU_SAMPLE_S.  The model of a point is
    t = t0 + flops / F(q block) + Σ_level bytes served by the level / BW(level)
- flops are what a flash kernel computes, not the ideal causal half.  A query block of Bq
  rows at row m scores whole key blocks of Bk columns until it passes its last row, the
  last block's masked columns included: Σ_blocks Bq · Σ_{n < m+Bq, step Bk} min(Bk, T − n)
  pairs.  PyTorch's CPU kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp) takes
  Bq = 32 / 64 / 256 by prompt length (<192 / <768 / longer) and Bk = 512, so a prompt of
  up to 512 tokens computes the whole T² square, twice the causal half (counted as
  T²/2 + T·Bq/2 before: held-out prefill error 4.4 → 2.2 % on the recorded CPU grid).
  Each block size runs at its own efficiency F; decode, one query, is a one-row product
  with an F of its own;
- memory is read as a stream through the levels: the first C_L2 bytes at the L2
  bandwidth, the next up to C_L3 at the L3 bandwidth, the rest at DRAM's.  The capacities
  are fitted too (a VM's or a shared L3 slice is smaller than the OS says); a hard switch
  by working-set size instead mispredicted the points near a capacity by up to 80 %.
- on a GPU the host's launch work and the kernel overlap (CUDA runs asynchronously), so a
  call costs their smooth maximum, (t_host^p + t_kernel^p)^(1/p) with p fitted, not their
  sum: on an H100, where SDPA calls up to ~1k tokens are all launch-bound (~25 µs), held-out
  MAPE 4.2 % against 5.8 % for the sum (the same measured points, docs/results/roofline-h100).
All parameters are logs (exp gives s, FLOP/s, B/s, B), fitted in torch (log-space least
squares) on every other grid point and judged on the held-out rest by MAPE.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cimattn.cost.workload import ModelShape

CI_GRID = {"prefill": [32, 64, 192, 256], "decode": [256, 1024, 4096, 16384]}  # both halves see the 32- and 64-row kernels
# dense enough that every held-out point lies between fitted ones of its own kernel block size (√2 steps for decode)
FULL_GRID = {"prefill": [32, 48, 64, 80, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280],
             "decode": [256, 362, 512, 724, 1024, 1448, 2048, 2896, 4096, 5793, 8192, 11585, 16384, 23170, 32768,
                        46341, 65536, 92682, 131072]}
CPU_Q_BLOCKS = ((768, 256), (192, 64), (0, 32))  # (from prompt length, query rows per block) of PyTorch's CPU flash kernel
CUDA_Q_BLOCK = 128  # FlashAttention-2's query tile at head dim 64
KV_BLOCKS = {"cpu": 512, "cuda": 128}  # key columns per block: PyTorch's CPU kernel at every prompt length, FlashAttention-2's tile


@dataclass
class Point:
    mode: str  # prefill | decode
    tokens: int
    seconds: float
    spread: float  # (max − min) / median of the repeats
    flops: float
    bytes: float
    seconds_min: float  # the fastest repeat: the machine without the other processes' load, nearly
    q_block: int  # query rows per kernel block: which efficiency F the point runs at


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


def q_block(mode: str, tokens: int, device: str = "cpu") -> int:
    """Query rows per kernel block: the prompt's block on the CPU (one row in decode), the query tile on CUDA."""
    if device == "cuda":
        return CUDA_Q_BLOCK
    if mode == "decode":
        return 1
    return next(rows for start, rows in CPU_Q_BLOCKS if tokens >= start)


def computed_pairs(tokens: int, q_rows: int, kv_cols: int) -> int:
    """Query-key pairs a causal flash kernel scores on a prompt: each block of q_rows query rows scores whole blocks
    of kv_cols keys until it passes its last row (the masked part of the last one too)."""
    pairs = 0
    for m in range(0, tokens, q_rows):
        rows = min(q_rows, tokens - m)
        pairs += rows * sum(min(kv_cols, tokens - n) for n in range(0, m + rows, kv_cols))
    return pairs


def counts(shape: ModelShape, mode: str, tokens: int, element: int = 4, block: int = 32,
           kv_block: int = KV_BLOCKS["cpu"]) -> tuple[float, float]:
    """(FLOPs, bytes moved) of one attention layer call; prefill counts the `computed_pairs` of `block`-row query
    blocks and `kv_block`-column key blocks, each 2·d multiply-adds for QKᵀ and for A·V."""
    h, kv, d = shape.heads, shape.kv_heads, shape.head_dim
    if mode == "prefill":
        return 4.0 * computed_pairs(tokens, block, kv_block) * h * d, float((2 * h + 2 * kv) * tokens * d * element)
    return 4.0 * tokens * h * d, float((2 * kv * tokens + 2 * h) * d * element)


DTYPES = {"cpu": torch.float32, "cuda": torch.float16}  # what each device's SDPA decode normally runs in
CPU_SAMPLE_S = 2e-3  # a CPU timing sample lasts at least this long


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
    """Median of `repeats` timings per grid point.  Each repeat sweeps the whole grid in a fresh seeded order, so a
    burst of load from other processes, or whatever the point before leaves behind, lands on every point alike
    instead of on a contiguous stretch of the grid or on one neighbour (in a fixed order the 32-token prompt, timed
    right after the 131,072-token decode, measured slower than the 48-token one in two of four runs, which is
    physically impossible); each timed call follows an untimed one of the same point, so caches hold what a
    repeated call finds."""
    g = torch.Generator().manual_seed(seed)
    keys = [(mode, n) for mode, ns in grid.items() for n in ns]
    calls = {key: _call(shape, *key, g, device) for key in keys}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict = {key: [] for key in keys}
    with torch.inference_mode():
        number = {}  # calls per timing sample
        for key, (call, _) in calls.items():
            for _ in range(3):  # warm-up: allocator, kernel selection, caches
                sync()
                t0 = time.perf_counter()
                call()
                sync()
            last = time.perf_counter() - t0
            # on the CPU a sample averages back-to-back calls up to CPU_SAMPLE_S (single calls of 25-200 µs left the fitted
            # points 2.4-2.9 % off the fit in three runs, averaged ones 1.2-2.4 % in six); CUDA times one synchronised
            # call (back to back, the launches would overlap)
            number[key] = 1 if device == "cuda" else max(1, round(CPU_SAMPLE_S / last))
        for _ in range(repeats):
            for key in (keys[i] for i in torch.randperm(len(keys), generator=g).tolist()):
                call = calls[key][0]
                call()  # re-warm this point's caches: the previous point evicted them
                sync()
                t0 = time.perf_counter()
                for _ in range(number[key]):
                    call()
                sync()
                times[key].append((time.perf_counter() - t0) / number[key])
    points = []
    for (mode, n), ts in times.items():
        med = statistics.median(ts)
        block = q_block(mode, n, device)
        flops, bytes_ = counts(shape, mode, n, element=calls[(mode, n)][1], block=block, kv_block=KV_BLOCKS[device])
        points.append(Point(mode, n, med, (max(ts) - min(ts)) / med, flops, bytes_, min(ts), block))
    return points


def device_caches(device: str) -> dict[str, int]:
    """Cache levels the working set is judged against: the CPU's L2 / L3, or a GPU's L2 (no L3)."""
    if device == "cuda":
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        return {"L2": l2, "L3": l2}
    return cache_sizes()


class MeasuredRoofline(torch.nn.Module):
    """t = t0 + flops / F(q block) + Σ_level bytes served by the level / BW(level), parameters in log space; with
    `overlap` (a GPU) that kernel time t overlaps the host's launch time h: (h^p + t^p)^(1/p), p > 1 fitted."""

    LEVELS = ("L2", "L3", "DRAM")

    def __init__(self, caches: dict[str, float], blocks: list[int], overlap: bool = False):
        super().__init__()
        self.overlap = overlap
        if overlap:
            self.log_host = torch.nn.Parameter(torch.tensor(-10.6, dtype=torch.float64))  # ≈ 25 µs
            self.log_p = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))  # p = 1 + e^log_p ≈ 3.7
        self.blocks = sorted(set(blocks))
        self.log_t0 = torch.nn.Parameter(torch.tensor(-11.0, dtype=torch.float64))  # ≈ 17 µs
        self.log_flops = torch.nn.Parameter(torch.full((len(self.blocks),), 23.0, dtype=torch.float64))  # ≈ 1e10 FLOP/s
        self.log_bw = torch.nn.Parameter(torch.tensor([24.0, 23.5, 23.0], dtype=torch.float64))  # ≈ 26, 16, 10 GB/s
        self.log_caches = torch.nn.Parameter(torch.tensor([caches["L2"], caches["L3"]], dtype=torch.float64).log())

    def block_index(self, block: int) -> int:
        """The fitted efficiency a point runs at: its own block size's, else the nearest fitted one's."""
        return min(range(len(self.blocks)), key=lambda i: abs(self.blocks[i] - block))

    @property
    def caches(self) -> dict[str, float]:
        return dict(zip(("L2", "L3"), self.log_caches.detach().exp().tolist()))

    def fitted(self) -> dict:
        exp = {k: v.detach().exp().tolist() for k, v in self.named_parameters()}
        overlap = {"host_s": exp["log_host"], "overlap_p": 1 + exp["log_p"]} if self.overlap else {}
        return {"t0_s": exp["log_t0"], "flops_per_s": dict(zip(map(str, self.blocks), exp["log_flops"])),
                "bandwidth_bytes_per_s": dict(zip(self.LEVELS, exp["log_bw"])), "capacity_bytes": self.caches, **overlap}

    def forward(self, flops: torch.Tensor, bytes_: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        l2, l3 = self.log_caches.exp()
        bw = self.log_bw.exp()
        memory = (bytes_.clamp(max=l2) / bw[0] + (bytes_.clamp(max=l3) - l2).clamp(min=0) / bw[1]
                  + (bytes_ - l3).clamp(min=0) / bw[2])
        kernel = self.log_t0.exp() + flops / self.log_flops.exp()[block] + memory
        if not self.overlap:
            return kernel
        p = 1 + self.log_p.exp()
        return (self.log_host.exp() ** p + kernel ** p) ** (1 / p)

    def inputs(self, points: list[Point]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flops, bytes, fitted-efficiency index) of `points`: this model's forward arguments."""
        f, b, _ = _tensors(points)
        return f, b, torch.tensor([self.block_index(p.q_block) for p in points])

    def predict(self, points: list[Point]) -> torch.Tensor:
        return self(*self.inputs(points))


def _tensors(points: list[Point]):
    f = torch.tensor([p.flops for p in points], dtype=torch.float64)
    b = torch.tensor([p.bytes for p in points], dtype=torch.float64)
    t = torch.tensor([p.seconds for p in points], dtype=torch.float64)
    return f, b, t


def fit(points: list[Point], caches: dict[str, int] | None = None, steps: int | None = None, overlap: bool = False) -> MeasuredRoofline:
    """Fit t0, each block size's F, the level bandwidths and capacities (and, with `overlap`, the host time and p).
    The fit is not convex in the capacities, so it starts the last level at the OS's size and at each gap between
    measured working sets below it, and keeps the best.  The overlap's p converges slowly (H100 grid: train loss
    0.0059 / 0.0033 / 0.0026 after 1.5k / 3k / 6k steps, held-out 5.2 / 4.3 / 4.2 %), so it takes 6k steps."""
    caches = caches or cache_sizes()
    steps = steps or (6000 if overlap else 1500)
    sizes = sorted({p.bytes for p in points if caches["L2"] < p.bytes <= caches["L3"]})
    starts = [caches["L3"]] + [(a * b) ** 0.5 for a, b in zip(sizes, sizes[1:])]
    fits = [_fit_once(points, caches | {"L3": c}, steps, overlap) for c in starts]
    inputs, log_t = fits[0].inputs(points), _tensors(points)[2].log()  # every start has the same blocks
    return min(fits, key=lambda m: _log_loss(m, inputs, log_t))


def _log_loss(model: MeasuredRoofline, inputs: tuple, log_t: torch.Tensor) -> torch.Tensor:
    return ((model(*inputs).log() - log_t) ** 2).mean()


def _fit_once(points: list[Point], caches: dict[str, float], steps: int, overlap: bool) -> MeasuredRoofline:
    model = MeasuredRoofline(caches, [p.q_block for p in points], overlap)
    inputs, log_t = model.inputs(points), _tensors(points)[2].log()  # once: the loop runs up to 6k steps
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        _log_loss(model, inputs, log_t).backward()
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


def mape(model: MeasuredRoofline, points: list[Point]) -> float:
    with torch.no_grad():
        t = _tensors(points)[2]
        return float(((model.predict(points) - t).abs() / t).mean())


def naive_mape(train: list[Point], test: list[Point]) -> float:
    """The anchor: a plain roofline, flops / F + bytes / BW (one efficiency, one bandwidth, no overhead), fitted the same way."""
    f, b, t = _tensors(train)
    log_f, log_bw = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (23.0, 23.0))
    opt = torch.optim.Adam([log_f, log_bw], lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        ((torch.log(f / log_f.exp() + b / log_bw.exp()) - t.log()) ** 2).mean().backward()
        opt.step()
    f, b, t = _tensors(test)
    with torch.no_grad():
        return float(((f / log_f.exp() + b / log_bw.exp() - t).abs() / t).mean())


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
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    result = summarize(points, device_caches(device), overlap=device == "cuda",
                       setup={"device": name, "threads": threads or previous, "shape": shape.__dict__, "repeats": repeats})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "roofline.json", result)
    _plot(out, result)
    return result


def summarize(points: list[Point], caches: dict[str, int], overlap: bool, setup: dict) -> dict:
    """Fit on every other point, judge on the rest: the record `roofline.json` holds (`setup` first)."""
    train, test = split(points)
    model = fit(train, caches, overlap=overlap)
    fastest = [Point(**(p.__dict__ | {"seconds": p.seconds_min})) for p in points]
    model_min = fit(split(fastest)[0], caches, overlap=overlap)
    return {
        **setup,
        "caches_bytes_os": caches,
        "fitted": model.fitted(),
        "mape_train": mape(model, train), "mape_heldout": mape(model, test),
        "mape_heldout_by_mode": {m: mape(model, [p for p in test if p.mode == m]) for m in dict.fromkeys(p.mode for p in test)},
        "median_spread": statistics.median(p.spread for p in points),
        "mape_heldout_plain_roofline": naive_mape(train, test),
        "mape_heldout_fastest_repeat": mape(model_min, split(fastest)[1]),
        "max_spread": max(p.spread for p in points),
        "points": [p.__dict__ | {"predicted_s": float(predicted), "held_out": p in test}
                   for p, predicted in zip(points, model.predict(points).detach())],
    }


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
