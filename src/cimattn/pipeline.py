"""The stages of `cimattn run`, as plain functions over a run directory.

load → baseline → convert → adapt → evaluate → cost → report.  This is the only
place that knows the stage order.  After each stage `results.json` is
rewritten atomically, so a killed run leaves the last finished stage on
disk.  Rerunning the same command into the same directory resumes: each
stage skips the measurements it already holds (when the spec and hardware
are unchanged) and rebuilds only the model state later stages need, the
adaptation resuming from its checkpoints in `DIR/adapted/` (removed when
another configuration made them).

A stage that cimattn does not have yet is absent from the results, never faked.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cimattn.config import HardwareConfig, load_preset
from cimattn.errors import CimattnError
from cimattn.storage import atomic_write_json, git_commit, read_json, versions

RESULTS = "results.json"
ADAPTED = "adapted"  # the run directory's folder of adapted hardware parameters


@dataclass
class RunSpec:
    """Everything a run depends on; its hash decides what a rerun may reuse."""

    model: str = "smollm2-135m"
    preset: str = "leroux-gaincell"
    out: Path = Path("runs/demo")
    text: str | None = None  # evaluated text; None = the bundled corpus' held-out works
    eval_tokens: int = 4096
    context: int = 1024
    budget_s: float | None = None  # wall-clock seconds for adaptation; None = the preset's recipe
    adapt_steps: dict[str, int] | None = None  # replay: each adaptation stage's count, from a run's results.json (`replay_steps`)
    seed: int = 0
    device: str = "cpu"  # where the model runs: cpu, cuda, cuda:1, …

    def key(self) -> dict:
        return {k: str(v) for k, v in self.__dict__.items() if k != "out"}


@dataclass
class Run:
    """State shared by the stages of one run."""

    spec: RunSpec
    hardware: HardwareConfig
    progress: Callable  # progress(description, total) -> context manager yielding advance(n)
    results: dict = field(default_factory=dict)
    model: torch.nn.Module | None = None
    teacher: torch.nn.Module | None = None
    tokenizer: object = None
    eval_ids: torch.Tensor | None = None
    calib_ids: torch.Tensor | None = None

    @property
    def out(self) -> Path:
        return Path(self.spec.out)

    @property
    def metrics(self) -> dict:
        return self.results["metrics"]

    def save(self) -> None:
        atomic_write_json(self.out / RESULTS, self.results)


@contextmanager
def no_progress(description: str, total: int | None = None):
    yield lambda n=1: None


def replay_steps(run_dir: Path, spec: RunSpec) -> dict[str, int]:
    """The step counts a finished run's adaptation ran (its results.json `adapt_steps`), to repeat it with no clock.

    The run must have adapted the same model with the same preset, seed and context: counts of another
    configuration would not reproduce anything.
    """
    previous = replay_record(run_dir, RESULTS, "`cimattn run` or `adapt`")
    if "adapt_steps" not in previous:
        raise CimattnError(f"--replay {run_dir}: its {RESULTS} records no adaptation steps (not a gain-cell adaptation, "
                           "or made by a cimattn before they were recorded)")
    require_same(run_dir, "run", previous["config"]["run"], spec.key(), ("model", "preset", "seed", "context"))
    return {k: int(n) for k, n in previous["adapt_steps"].items()}


def replay_record(source: Path, file: str, made_by: str) -> dict:
    """The record `file` of a finished run or study that --replay names (`made_by`: the command that writes it)."""
    path = Path(source) / file
    if not path.is_file():
        raise CimattnError(f"--replay {source}: no {file} there; give the directory of a finished {made_by}")
    return read_json(path)


def require_same(source: Path, kind: str, ran: dict, mine: dict, keys: tuple[str, ...]) -> None:
    """Refuse to replay a `kind` that ran with other `keys` than `mine`: its counts would reproduce nothing."""
    differ = [k for k in keys if ran.get(k) != mine[k]]
    if differ:
        raise CimattnError(f"--replay {source}: that {kind} used " + ", ".join(f"{k} {ran.get(k)}" for k in differ)
                           + "; pass the same values to repeat it")


def new_results(spec: RunSpec, hardware: HardwareConfig, previous: dict | None) -> dict:
    """The results record: config, seed, versions and commit beside the metrics.

    Metrics of a previous run into the same directory are kept only when it
    ran the very same spec and hardware; `measured_by` then names the commit
    whose code measured them (the first run's), which `git_commit` (this
    run's) need not be.
    """
    config = {"run": spec.key(), "hardware": hardware.model_dump(mode="json")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    reuse = previous is not None and previous.get("config_hash") == digest
    commit = git_commit()
    return {
        "model": spec.model,
        "preset": spec.preset,
        "seed": spec.seed,
        "git_commit": commit,
        "measured_by": previous.get("measured_by", previous.get("git_commit")) if reuse else commit,
        "versions": versions(),
        "config": config,
        "config_hash": digest,
        "timings": dict(previous["timings"]) if reuse else {},
        "metrics": dict(previous["metrics"]) if reuse else {},
        "history": dict(previous.get("history", {})) if reuse else {},
        **({k: previous[k] for k in ("adapt_steps", "telemetry", "ppl_by_position") if reuse and k in previous}),
    }


# ---------------------------------------------------------------- stages
def load(run: Run) -> None:
    from cimattn.data import load_text, tokenize_cached
    from cimattn.models import load_model

    torch.manual_seed(run.spec.seed)
    device = torch_device(run.spec.device)
    run.model, run.tokenizer = load_model(run.spec.model, seed=run.spec.seed)
    run.model.to(device)
    run.results["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # Calibration and fine-tuning always read the bundled corpus' training works,
    # so they never see the evaluated text, bundled or the user's.
    run.eval_ids = tokenize_cached(run.tokenizer, load_text(run.spec.text, "eval"))
    run.calib_ids = tokenize_cached(run.tokenizer, load_text(None, "calib"))
    run.results["data"] = {
        "eval": f"user text {run.spec.text}" if run.spec.text else "bundled corpus, held-out works",
        "calib": "bundled corpus, training works",
        **({"adapt": f"{run.hardware.adapt.teacher_tokens} tokens sampled from the teacher, prompted by the calib text"}
           if run.hardware.attention == "gaincell" and run.hardware.adapt.data == "teacher" else {}),
        "eval_tokens_available": int(run.eval_ids.numel()),
        "calib_tokens_available": int(run.calib_ids.numel()),
    }


def baseline(run: Run) -> str | None:
    # The model's own attention (SDPA): the reference cimattn's hardware is compared with.
    if "ppl_digital" in run.metrics:
        return "reused"
    result = _perplexity(run, "digital baseline")
    _record_by_position(run, "digital", result)
    run.metrics.update(
        ppl_digital=result.ppl,
        eval_tokens=result.eval_tokens,
        scored_tokens=result.scored_tokens,
        tokens_per_s_digital=result.tokens_per_s,
    )


def convert_stage(run: Run) -> str | None:
    from cimattn.models import convert

    if run.hardware.attention != "digital":
        run.teacher = copy.deepcopy(run.model).eval()  # the digital model, teacher of the adaptation
    convert(run.model, run.hardware)
    if "ppl_hardware_initial" in run.metrics:
        return "reused"
    result = _perplexity(run, "converted, before adaptation")
    run.metrics.update(ppl_hardware_initial=result.ppl, tokens_per_s_hardware=result.tokens_per_s)


def adapt(run: Run) -> str | None:
    from cimattn.adapt import adapt_model, checkpoint

    if run.hardware.attention == "digital":
        return
    if run.hardware.attention == "prune_recompute":  # calibrate thresholds and converter ranges: no training
        from cimattn.adapt.thresholds import adapt_thresholds

        result = adapt_thresholds(run.model, run.calib_ids, run.hardware, context=run.spec.context,
                                  checkpoint_dir=run.out / ADAPTED, teacher=run.teacher)
        run.results["history"].update({k: result.pop(k) for k in ("learn_loss",) if k in result})
        run.metrics.update(result)
        return
    finished = checkpoint.read_state(run.out / ADAPTED).get("done", False)  # then only its parameters are loaded
    history = adapt_model(
        run.model, run.teacher, run.calib_ids, run.hardware,
        budget_s=run.spec.budget_s, context=run.spec.context, checkpoint_dir=run.out / ADAPTED, seed=run.spec.seed,
        progress=run.progress, evaluate=lambda label: _perplexity(run, label).ppl, steps=run.spec.adapt_steps,
    )
    run.results["history"].update(history.pop("history", {}))
    run.results["adapt_steps"] = history.pop("adapt_steps")
    run.metrics.update(history)
    return "reused" if finished else None


def evaluate(run: Run) -> str | None:
    if run.hardware.attention == "digital" or "ppl_hardware_adapted" in run.metrics:
        return "reused"
    result = _hardware_perplexity(run, "adapted hardware model")
    _record_by_position(run, "hardware_adapted", result)
    run.metrics.update(
        ppl_hardware_adapted=result.ppl,
        ppl_ratio_adapted=result.ppl / run.metrics["ppl_digital"],
    )


def cost(run: Run) -> None:
    # analytical, milliseconds: always recomputed, so a changed table or telemetry shows up
    from cimattn.cost.run import apply, shape_of

    apply(run.results, shape_of(run.spec.model, getattr(run.model, "config", None)), run.hardware, run.spec.context, run.out)


def report(run: Run) -> None:
    from cimattn.report import write_report

    write_report(run.out, run.results)


# Each stage returns "reused" when it found its measurements already in the results.
STAGES: list[tuple[str, Callable[[Run], str | None]]] = [
    ("baseline", baseline),
    ("convert", convert_stage),
    ("adapt", adapt),
    ("evaluate", evaluate),
    ("cost", cost),
    ("report", report),
]


def _perplexity(run: Run, label: str):
    from cimattn.eval import perplexity

    n = min(run.spec.eval_tokens, run.eval_ids.numel())
    with run.progress(f"perplexity: {label}", total=n) as advance:
        return perplexity(run.model, run.eval_ids, context=run.spec.context, eval_tokens=run.spec.eval_tokens, progress=advance)


def _record_by_position(run: Run, model: str, result) -> None:
    """Keep `result`'s perplexity by position in the window beside the run's other records, under `model`."""
    run.results.setdefault("ppl_by_position", {})[model] = list(result.by_position)


def _hardware_perplexity(run: Run, label: str):
    """Perplexity of the converted model; a prune-and-recompute model also records its keep rate and telemetry."""
    if run.hardware.attention != "prune_recompute":
        return _perplexity(run, label)
    from cimattn.attention.prune_recompute import collect_telemetry

    with collect_telemetry(run.model) as telemetry:  # keep rate and the traffic the cost model reads
        result = _perplexity(run, label)
    run.results["telemetry"] = telemetry.summary()
    run.metrics["keep_rate"] = run.results["telemetry"]["keep_rate"]
    return result


def run_pipeline(
    spec: RunSpec,
    *,
    progress: Callable = no_progress,
    log: Callable[[str], None] = lambda s: None,
    stages: tuple[str, ...] | None = None,
) -> dict:
    """Run every stage (or the named ones, in pipeline order) into `spec.out`, resuming what an identical run finished."""
    hardware = load_preset(spec.preset)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_json(out / RESULTS) if (out / RESULTS).is_file() else None
    run = Run(spec=spec, hardware=hardware, progress=progress, results=new_results(spec, hardware, previous))
    _drop_stale_adaptation(run, previous, log)
    if run.results["measured_by"] != run.results["git_commit"] and run.results["metrics"]:
        log(f"resuming measurements made by commit {run.results['measured_by']} (this is {run.results['git_commit']}): "
            f"remove {out} for a fresh run with this code")
    if spec.context > hardware_window(hardware) and hardware.gaincell and hardware.gaincell.context_policy == "error":
        raise CimattnError(
            f"--context {spec.context} exceeds the hardware window ({hardware_window(hardware)} tokens) "
            "and the preset's context_policy is 'error': lower --context or set context_policy: sliding"
        )

    started = time.perf_counter()
    _timed(run, "load", load, log)
    for name, stage in STAGES:
        if stages is not None and name not in stages:
            continue
        _timed(run, name, stage, log)
        run.save()
    run.results["timings"]["total"] = round(time.perf_counter() - started, 3)
    run.save()
    return run.results


def _drop_stale_adaptation(run: Run, previous: dict | None, log: Callable[[str], None]) -> None:
    """Remove DIR/adapted/ when another configuration made it: its checkpoints would resume (or, finished, stand in for)
    an adaptation this run's spec and hardware never ran.  The run's results.json records which configuration that was."""
    adapted = run.out / ADAPTED
    if not adapted.exists() or (previous is not None and previous.get("config_hash") == run.results["config_hash"]):
        return
    if previous is None:
        raise CimattnError(f"{adapted} has no {RESULTS} beside it to say which run made it: remove it, or give another --out")
    shutil.rmtree(adapted)
    log(f"{adapted}: made by another configuration ({previous.get('config_hash')}), removed; adapting afresh")


def _timed(run: Run, name: str, stage: Callable[[Run], str | None], log: Callable[[str], None]) -> None:
    t0 = time.perf_counter()
    if stage(run) == "reused" and name in run.results["timings"]:
        log(f"{name}: reused from an earlier run")
        return
    run.results["timings"][name] = round(time.perf_counter() - t0, 3)
    log(f"{name}: {run.results['timings'][name]:.1f} s")


def torch_device(name: str) -> torch.device:
    """A device the model can run on, or a CimattnError that says why not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CimattnError(f"--device '{name}': give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CimattnError(f"--device {name}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise CimattnError(f"--device {name}: cimattn runs on cpu or cuda")
    return device


def hardware_window(hardware: HardwareConfig) -> int | float:
    return hardware.gaincell.window_tokens if hardware.gaincell else float("inf")


def hardware_source(preset: str | None, adapted: Path | None) -> str | None:
    """The preset to convert to: --preset, else the adapted directory's own, else None (digital)."""
    from cimattn.adapt.checkpoint import PRESET

    if adapted is not None and not (Path(adapted) / PRESET).is_file():
        raise CimattnError(f"--adapted {adapted}: not an adapted directory (no {PRESET}); give a run's adapted/ folder")
    return preset or (str(Path(adapted) / PRESET) if adapted else None)


def to_hardware(model: torch.nn.Module, preset: str | None, adapted: Path | None) -> HardwareConfig | None:
    """Convert `model` in place to the preset and load adapted parameters; None leaves it digital."""
    from cimattn.adapt import load_adapted
    from cimattn.models import convert

    source = hardware_source(preset, adapted)
    if source is None:
        return None
    hardware = load_preset(source)
    convert(model, hardware)
    if adapted is not None and hardware.attention == "prune_recompute":
        from cimattn.adapt.thresholds import load_thresholds

        load_thresholds(model, adapted)
    elif adapted is not None:
        load_adapted(model, adapted)
    return hardware


def hardware_model(model: str, preset: str | None, adapted: Path | None, seed: int, device: str = "cpu"):
    """(model, tokenizer) loaded onto `device` and converted for `cimattn generate`."""
    from cimattn.models import load_model

    lm, tokenizer = load_model(model, seed=seed)
    lm.to(torch_device(device))
    to_hardware(lm, preset, adapted)
    return lm, tokenizer


def evaluate_models(
    *, model: str, preset: str | None, adapted: Path | None, out: Path, text: str | None,
    eval_tokens: int, context: int, seed: int, device: str = "cpu", progress: Callable = no_progress,
) -> dict:
    """`cimattn eval`: the digital perplexity and, given a preset or adapted parameters, the hardware one."""
    source = hardware_source(preset, adapted) or "digital"
    spec = RunSpec(model=model, preset=source, out=out, text=text, eval_tokens=eval_tokens, context=context, seed=seed,
                   device=device)
    hardware = load_preset(source)
    run = Run(spec=spec, hardware=hardware, progress=progress, results=new_results(spec, hardware, None))
    Path(out).mkdir(parents=True, exist_ok=True)
    _timed(run, "load", load, lambda s: None)
    _timed(run, "baseline", baseline, lambda s: None)
    if to_hardware(run.model, preset, adapted) is not None:
        key = "ppl_hardware_adapted" if adapted else "ppl_hardware_initial"
        result = _hardware_perplexity(run, key.removeprefix("ppl_").replace("_", " "))
        run.metrics[key] = result.ppl
        _record_by_position(run, key.removeprefix("ppl_"), result)
        run.metrics["ppl_ratio"] = run.metrics[key] / run.metrics["ppl_digital"]
    run.save()
    return run.results
