"""How fast the hardware simulation runs beside digital attention (`cimattn bench`, issue 9).

One run times, on the CPU and on CUDA when present:

* attention calls on attention-shaped tensors of the model (its query heads,
  KV heads and head dim): prefill of T tokens (causal) and decode of one
  query over a cache of L tokens whose newest token changes from call to
  call (as in generation), at each batch size — digital SDPA
  (`torch.nn.functional.scaled_dot_product_attention`) and each hardware
  attention function with its preset's physics (`ATTENTIONS`); on CUDA
  each takes its Triton kernels where they support the call (the automatic
  dispatch) and `<family>_torch` times the same call on the torch path, for
  the kernels' share of the gain;
* on CUDA, a training step of the attention call (mode "train"): forward
  and backward (the gradients of q, k, v) of a causal prefill of T tokens,
  digital SDPA beside each family of `TRAINED` (gain-cell: its fused Triton
  kernels, forward and backward, where they support the call);
* the whole model (`--model`, converted with each preset): prefill tokens/s
  over a window of `context` tokens and decode tokens/s (one new token over a
  cache of `context` tokens);
* peak memory of one call: CUDA `max_memory_allocated` above what was
  allocated before; CPU the rise of the process's resident set (RSS, sampled
  every `RSS_SAMPLE_S` in a thread after `malloc_trim` hands freed heap back),
  a lower bound where the allocator reuses memory it kept.

Every number is the median of repeats after one warm-up call, beside the
digital baseline measured in the same run: `time_ratio` = hardware time ÷
digital time (1 = as fast), `throughput_ratio` = hardware tokens/s ÷
digital tokens/s.  `bench.json` (atomic) and `bench.png` go to the output
directory.  The machine's load average before and after is recorded: on a
shared CPU the timings carry the other processes' noise.

The suite lives in the package (not a root `benchmarks/` folder) so that
the installed CLI imports it; a recipe can call `run_bench` directly.
"""

from __future__ import annotations

import copy
import ctypes
import itertools
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cimattn.config import load_preset
from cimattn.errors import CimattnError
from cimattn.storage import atomic_write_json, git_commit, save_figure, versions

# attention family → the preset whose physics is timed
ATTENTIONS = {"gaincell": "leroux-gaincell", "prune_recompute": "sprint"}
TRAINED = ("gaincell",)  # hardware families whose training step is timed on CUDA
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}  # what each device's digital attention normally runs in
POINT_BUDGET_S = 8.0  # repeats of one point stop early (at MIN_REPEATS) once they would exceed this
MIN_REPEATS = 3
RSS_SAMPLE_S = 0.0005  # RSS polling period while measuring CPU peak memory


@dataclass(frozen=True)
class Grid:
    """What one run times: attention shapes, batch sizes, the model's context (0 = no model timing)."""

    prefill: tuple[int, ...] = (512, 2048)
    decode: tuple[int, ...] = (1024, 4096)
    batch: tuple[int, ...] = (1, 4)
    context: int = 1024
    repeats: int = 5

    def __post_init__(self):
        for name in ("prefill", "decode", "batch"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise CimattnError(f"bench {name} sizes must be positive integers, got {list(values)}")
        if self.context < 0 or self.repeats < 1:
            raise CimattnError(f"bench context must be ≥ 0 and repeats ≥ 1, got {self.context} and {self.repeats}")


DEFAULT_GRID = Grid()  # aimed at ≤ 5 min on the idle 2-core CPU with SmolLM2-135M (26 min measured under load ≈ 11)
FULL_GRID = Grid(prefill=(512, 1024, 2048, 4096, 8192), decode=(1024, 2048, 4096, 8192), batch=(1, 4, 16))  # issue 9's grid


def parse_sizes(text: str, name: str) -> tuple[int, ...]:
    """'512,1024' → (512, 1024); a CimattnError naming the option otherwise."""
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise CimattnError(f"--{name} must be integers separated by commas, got '{text}'") from None
    if not sizes or min(sizes) < 1:
        raise CimattnError(f"--{name} must list positive integers, got '{text}'")
    return sizes


def devices(only: str | None = None) -> list[str]:
    """The devices a run times: every one present, or just `only` (a CimattnError when it is absent)."""
    present = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if only is None:
        return present
    if only not in present:
        raise CimattnError(f"bench --device {only}: choose one of {', '.join(present)} (the devices present here)")
    return [only]


# ---------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, repeats: int, warm_up: Callable[[], object] | None = None) -> dict:
    """Median, fastest and spread ((max − min) / median) of `repeats` calls after one warm-up call.

    The warm-up (`fn`, or `warm_up` when given: a call that does the same
    work and more, e.g. also fills a cache) measures the peak memory.
    """
    start = time.perf_counter()
    peak = peak_memory(warm_up or fn, device)
    warm = time.perf_counter() - start
    if repeats > MIN_REPEATS:  # slow points keep MIN_REPEATS, so the default grid fits its time
        repeats = max(MIN_REPEATS, min(repeats, int(POINT_BUDGET_S / max(warm, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"median_s": median, "min_s": min(times), "spread": (max(times) - min(times)) / median, "repeats": repeats,
            "peak_bytes": peak}


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so an RSS rise reflects the call's own allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_memory(fn: Callable[[], object], device: str) -> int:
    """Bytes a call needs at its peak above what was allocated before it (CPU: RSS rise, see module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    _trim_heap()
    base = peak = _rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(RSS_SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return int(max(peak, _rss_bytes()) - base)


# ---------------------------------------------------------------- attention calls


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int


def model_shape(model: nn.Module) -> Shape:
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Shape(heads, getattr(cfg, "num_key_value_heads", None) or heads, head_dim)


def hardware_presets(log: Callable[[str], None] = lambda message: None) -> tuple[dict, dict[str, str]]:
    """({family: HardwareConfig} of `ATTENTIONS`, loaded once per run; {family: why it is skipped})."""
    from cimattn import attention

    hardware, skipped = {}, {}
    for family, preset in ATTENTIONS.items():
        if not hasattr(attention, f"{family}_attention"):
            skipped[family] = f"cimattn.attention has no {family}_attention"
            continue
        try:
            hardware[family] = load_preset(preset)
        except CimattnError as e:
            skipped[family] = str(e)
            log(f"skipping {family}: {e}")
    return hardware, skipped


def _hardware_module(hw, shape: Shape, device: str) -> nn.Module:
    """A stand-in attention module holding the preset's hardware parameters as `cim` (what convert attaches)."""
    from cimattn.attention.gaincell import GainCellParams
    from cimattn.attention.prune_recompute import PruneRecomputeParams

    family = hw.attention
    holder = nn.Module()
    if family == "gaincell":
        holder.cim = GainCellParams(hw.gaincell, shape.heads, shape.kv_heads, shape.head_dim)
    else:
        holder.cim = PruneRecomputeParams(hw.prune_recompute, shape.heads, shape.kv_heads, shape.head_dim)
    return holder.to(device).eval()


def attention_calls(shape: Shape, mode: str, tokens: int, batch: int, device: str, seed: int, hardware: dict) -> dict[str, Callable]:
    """{attention name: zero-argument call} on the same random q (B, H, T, D), k, v (B, Hkv, S, D)."""
    from cimattn import attention

    gen = torch.Generator().manual_seed(seed)
    q_len = tokens if mode == "prefill" else 1
    dtype = DTYPES[device]

    def rand(heads: int, length: int) -> torch.Tensor:
        return torch.randn(batch, heads, length, shape.head_dim, generator=gen).to(device, dtype)

    q, k, v = rand(shape.heads, q_len), rand(shape.kv_heads, tokens), rand(shape.kv_heads, tokens)
    # a decode step's newest token is new each time (the gain-cell array state writes it): alternate two last tokens
    steps = [(k, v)]
    if mode == "decode":
        steps.append((torch.cat([k[:, :, :-1], rand(shape.kv_heads, 1)], 2), torch.cat([v[:, :, :-1], rand(shape.kv_heads, 1)], 2)))
    gqa = shape.kv_heads != shape.heads

    def each_step(call: Callable) -> Callable:
        turn = itertools.cycle(steps)
        return lambda: call(*next(turn))

    calls = {"digital": each_step(lambda k, v: F.scaled_dot_product_attention(q, k, v, is_causal=mode == "prefill", enable_gqa=gqa))}
    for family, hw in hardware.items():
        function = getattr(attention, f"{family}_attention")
        module = _hardware_module(hw, shape, device)
        if family == "prune_recompute":  # thresholds fitted to these inputs at the preset's keep rate, as the adapt stage does
            module.cim.calibrate_to = module.cim.config.selection.keep_rate
            function(module, q, k, v, None)
            module.cim.calibrate_to = None
        calls[family] = each_step(lambda k, v, f=function, m=module: f(m, q, k, v, None))
        if device == "cuda":  # the same call on the torch path: the Triton kernel's own share of the gain
            forced = copy.deepcopy(module)
            forced.cim.backend = "torch"
            calls[f"{family}_torch"] = each_step(lambda k, v, f=function, m=forced: f(m, q, k, v, None))
            if family == "gaincell":  # and on tensor cores (three TF32 passes per dot)
                fast = copy.deepcopy(module)
                fast.cim.dot_precision = "tf32x3"
                calls[f"{family}_tf32x3"] = each_step(lambda k, v, f=function, m=fast: f(m, q, k, v, None))
    return calls


def training_calls(shape: Shape, tokens: int, batch: int, device: str, seed: int, hardware: dict) -> dict[str, Callable]:
    """{attention name: one training step}: forward and backward (dq, dk, dv) of a causal prefill, digital beside `TRAINED`."""
    from cimattn import attention

    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[device]

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device, dtype)

    q = rand(batch, shape.heads, tokens, shape.head_dim).requires_grad_()
    k, v = (rand(batch, shape.kv_heads, tokens, shape.head_dim).requires_grad_() for _ in range(2))
    grad = rand(batch, tokens, shape.heads, shape.head_dim)  # (B, T, H, D): the layout attention functions return
    gqa = shape.kv_heads != shape.heads

    def step(forward: Callable[[], torch.Tensor]) -> Callable:
        def call():
            with torch.enable_grad():  # the run times everything else under no_grad
                return torch.autograd.grad(forward(), (q, k, v), grad)

        return call

    calls = {"digital": step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2))}
    for family in (f for f in TRAINED if f in hardware):
        function, module = getattr(attention, f"{family}_attention"), _hardware_module(hardware[family], shape, device)
        calls[family] = step(lambda f=function, m=module: f(m, q, k, v, None)[0])
    return calls


def bench_attention(shape: Shape, grid: Grid, device: str, seed: int, hardware: dict, step: Callable[[], None]) -> list[dict]:
    rows = []
    points = [("prefill", t) for t in grid.prefill] + [("decode", t) for t in grid.decode]
    if device == "cuda":
        points += [("train", t) for t in grid.prefill]
    for (mode, tokens), batch in ((p, b) for p in points for b in grid.batch):
        if mode == "train":
            calls = training_calls(shape, tokens, batch, device, seed, hardware)
        else:
            calls = attention_calls(shape, mode, tokens, batch, device, seed, hardware)
        timed = {}
        for name, call in calls.items():
            timed[name] = time_call(call, device, grid.repeats)
            step()
        base = timed["digital"]["median_s"]
        for name, t in timed.items():
            rows.append({"device": device, "mode": mode, "tokens": tokens, "batch": batch, "attention": name, **t,
                         "time_ratio": t["median_s"] / base})
        del calls
    return rows


# ---------------------------------------------------------------- whole model


def bench_model(
    model: nn.Module, context: int, device: str, repeats: int, seed: int, hardware: dict, step: Callable[[], None]
) -> list[dict]:
    """Prefill and decode tokens/s of `model` with digital SDPA and each hardware preset (converted in turn)."""
    from cimattn.adapt.thresholds import calibrate_thresholds
    from cimattn.models import convert

    model = model.to(device=device, dtype=DTYPES[device])
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1), generator=gen).to(device)
    prompt, new = ids[:, :context], ids[:, context:]
    digital_impl = model.config._attn_implementation
    rows = []
    for name in ("digital", *hardware):
        if name == "digital":
            model.set_attn_implementation(digital_impl)
        else:
            convert(model, hardware[name])
            if name == "prune_recompute":
                calibrate_thresholds(model, prompt, measure=False)
        t_pre, t_dec = _time_model(model, prompt, new, device, repeats)
        rows.append({"device": device, "attention": name, "implementation": model.config._attn_implementation, "context": context,
                     "prefill_tokens_per_s": context / t_pre["median_s"], "prefill_spread": t_pre["spread"],
                     "decode_tokens_per_s": 1.0 / t_dec["median_s"], "decode_spread": t_dec["spread"],
                     "prefill_peak_bytes": t_pre["peak_bytes"]})
        step()
    base = rows[0]
    for row in rows:
        row["prefill_throughput_ratio"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        row["decode_throughput_ratio"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    model.set_attn_implementation(digital_impl)
    return rows


def _time_model(model: nn.Module, prompt: torch.Tensor, new: torch.Tensor, device: str, repeats: int) -> tuple[dict, dict]:
    """Timings of a prefill of `prompt` (1, L) and of one decode step of `new` (1, 1), or the token after it, over its L cached tokens."""
    caches = []
    t_pre = time_call(lambda: model(input_ids=prompt, use_cache=False), device, repeats,
                      warm_up=lambda: caches.append(model(input_ids=prompt, use_cache=True).cache))
    cache, context = caches[0], prompt.shape[1]
    # the same step each time — one token over `context` cached tokens — but not the same token twice in a row:
    # a generated token is new to the hardware state, which writes it (the gain-cell decode state would otherwise reuse it)
    tokens = itertools.cycle([new, (new + 1) % model.config.vocab_size])

    def decode():
        extra = cache.get_seq_length() - context
        if extra:
            cache.crop(-extra)
        return model(input_ids=next(tokens), cache=cache, use_cache=True)

    return t_pre, time_call(decode, device, repeats)


# ---------------------------------------------------------------- the run


def run_bench(
    model_name: str,
    out: Path,
    grid: Grid = DEFAULT_GRID,
    seed: int = 0,
    progress: Callable | None = None,
    log: Callable[[str], None] = lambda message: None,
    device: str | None = None,
) -> dict:
    """Time everything in `grid` on every device present (or on `device`); write OUT/bench.json and OUT/bench.png; return
    the record."""
    from cimattn.models import load_model

    out = Path(out)
    timed = devices(device)
    load_before = os.getloadavg()
    started = time.time()
    hardware, skipped = hardware_presets(log)  # once: a preset edited during the run cannot break it
    model, _ = load_model(model_name, seed=seed)
    shape = model_shape(model)
    points = (len(grid.prefill) + len(grid.decode)) * len(grid.batch) * (1 + len(hardware))
    total = len(timed) * (points + (1 + len(hardware) if grid.context else 0))
    if "cuda" in timed:
        total += len(grid.prefill) * len(grid.batch) * (1 + len(set(TRAINED) & set(hardware)))
    attention_rows, model_rows = [], []
    with torch.no_grad(), (progress or _no_progress)("bench", total) as step:
        for device in timed:
            log(f"attention calls on {device} ({_device_name(device)})")
            attention_rows += bench_attention(shape, grid, device, seed, hardware, step)
            if grid.context:
                log(f"{model_name} end to end on {device}, context {grid.context}")
                model_rows += bench_model(model, grid.context, device, grid.repeats, seed, hardware, step)
    record = {
        "model": model_name,
        "seed": seed,
        "git_commit": git_commit(),
        "versions": versions() | {"triton": _version("triton")},
        "devices": {d: _device_name(d) for d in timed},
        "dtypes": {d: str(DTYPES[d]).removeprefix("torch.") for d in timed},
        "threads": torch.get_num_threads(),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "seconds": time.time() - started,
        "grid": asdict(grid),
        "presets": {family: ATTENTIONS[family] for family in hardware},
        "skipped": skipped,
        "shape": asdict(shape),
        "attention": attention_rows,
        "model_throughput": model_rows,
    }
    atomic_write_json(out / "bench.json", record)
    plot(record, out / "bench.png")
    return record


class _no_progress:
    def __init__(self, description: str, total: int):
        pass

    def __enter__(self):
        return lambda n=1: None

    def __exit__(self, *exc):
        return False


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- output


def plot(record: dict, path: Path) -> Path:
    """PNG: time ratio to digital vs tokens (prefill, decode), and the model's throughput ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, mode in zip(axes[:2], ("prefill", "decode")):
        modes = (mode, "train") if mode == "prefill" else (mode,)  # a training step is a prefill forward + backward
        rows = [r for r in record["attention"] if r["mode"] in modes and r["attention"] != "digital"]
        for key in sorted({(r["device"], r["attention"], r["batch"], r["mode"]) for r in rows}):
            line = sorted((r["tokens"], r["time_ratio"]) for r in rows if (r["device"], r["attention"], r["batch"], r["mode"]) == key)
            step = " fwd+bwd" if key[3] == "train" else ""
            ax.plot(*zip(*line), marker="o", label=f"{key[1]}{step} B={key[2]} ({key[0]})")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached tokens" if mode == "decode" else "prompt tokens")
        ax.set_ylabel("time ÷ digital SDPA time")
        ax.set_title(f"{mode}: attention call")
        ax.legend(fontsize=7)
    ax = axes[2]
    rows = [r for r in record["model_throughput"] if r["attention"] != "digital"]
    labels = [f"{r['attention']}\n({r['device']})" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["prefill_throughput_ratio"] for r in rows], width=0.4, label="prefill")
    ax.bar([i + 0.2 for i in x], [r["decode_throughput_ratio"] for r in rows], width=0.4, label="decode")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("tokens/s ÷ digital tokens/s")
    context = record["grid"]["context"]
    ax.set_title(f"{record['model']}, context {context}" if rows else "model not timed")
    if rows:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def tables(record: dict) -> Iterable:
    """rich Tables of the record: attention calls and the whole model."""
    from rich.table import Table

    calls = Table(title=f"attention calls: median time, × digital SDPA ({', '.join(record['devices'].values())})")
    for col in ("device", "mode", "tokens", "batch", "attention", "median ms", "× digital", "spread", "peak MiB"):
        calls.add_column(col, justify="left" if col in ("device", "mode", "attention") else "right")
    for r in record["attention"]:
        calls.add_row(r["device"], r["mode"], str(r["tokens"]), str(r["batch"]), r["attention"], f"{r['median_s'] * 1e3:.3g}",
                      f"{r['time_ratio']:.3g}", f"{r['spread']:.0%}", f"{r['peak_bytes'] / 2**20:.1f}")
    yield calls
    if record["model_throughput"]:
        model = Table(title=f"{record['model']} end to end, context {record['grid']['context']}: tokens/s and ÷ digital")
        for col in ("device", "attention", "prefill tok/s", "÷ digital", "decode tok/s", "÷ digital ", "prefill peak MiB"):
            model.add_column(col, justify="left" if col in ("device", "attention") else "right")
        for r in record["model_throughput"]:
            model.add_row(r["device"], r["attention"], f"{r['prefill_tokens_per_s']:.4g}", f"{r['prefill_throughput_ratio']:.3g}",
                          f"{r['decode_tokens_per_s']:.4g}", f"{r['decode_throughput_ratio']:.3g}", f"{r['prefill_peak_bytes'] / 2**20:.1f}")
        yield model


__all__ = ["ATTENTIONS", "DEFAULT_GRID", "FULL_GRID", "Grid", "parse_sizes", "peak_memory", "run_bench", "tables", "time_call"]
