"""Studies: how the adapted hardware model's perplexity moves with one property of the hardware.

`cimattn study NAME` adapts the model to the preset once (or loads
`--adapted DIR`), then sweeps one property, keeping the adapted parameters:
each variant is the preset with that property changed, converted afresh
(`convert`) and given the adapted scalers back, so only the property moves.

retention  τ (retention time constant) from oxide-like (hours) to silicon-like
           (10 µs); the decay per token is exp(−step_time/τ), so the sweep is
           also one over step time at τ fixed: only the ratio τ/step counts.
context    perplexity by position in sequences of `multiple` × the window
           (sliding policy: the ring buffer overwrites the oldest token),
           digital and hardware.
noise      read noise and device-to-device variability levels, for two copies
           of the adapted model fine-tuned --budget seconds more: on the
           noiseless chip (plain) and with the noise in the loop (noise-aware,
           on the NOISE_AWARE_AT levels), so only the noise differs.

Each writes into --out: `study.json` (a table: `columns`, `rows`, plus
`metrics` and the config), `study.png` and `study.md`.  The steps each
adaptation ran are recorded (`steps`); `--replay DIR` repeats a study with
exactly those counts and no wall clock (`replay_steps`), step for step on
any machine.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cimattn.config import HardwareConfig, load_preset, with_changes
from cimattn.errors import CimattnError
from cimattn.storage import atomic_write_json, git_commit, versions

# τ sweep [s] at the preset's step time: oxide (IGZO) gain cells hold > 1 h, silicon ones 10 µs – 1 ms (PAPERS.md,
# neighbours); 5 ms is the paper's (Leroux et al.: 1.6e-4 per 0.8 µs token). None = an ideal, non-leaking cell.
RETENTION_TAUS_S = (None, 3600.0, 1.0, 5e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
RETENTION_TOLERANCE = 1.10  # "short enough" = perplexity within 10 % of the non-leaking cell's
# (read_std, cell_variability_std) levels: two one-factor sweeps through 0 and gaincell-realistic's point (0.01, 0.05)
NOISE_LEVELS = (
    (0.0, 0.0), (0.005, 0.0), (0.01, 0.0), (0.02, 0.0), (0.05, 0.0),
    (0.0, 0.02), (0.0, 0.05), (0.0, 0.1), (0.0, 0.2), (0.01, 0.05),
)
NOISE_AWARE_AT = (0.01, 0.05)  # the noisy chip the noise-aware model is adapted on: gaincell-realistic's levels (assumed there)


@dataclass
class StudySpec:
    """What a study runs on; `context` None = the study's own default (DEFAULT_CONTEXT)."""

    name: str
    model: str = "smollm2-135m"
    preset: str = "gaincell-normalized"  # the demo's hardware: the paper's adapts too poorly on a CPU budget to study
    out: Path = Path("runs/study")
    adapted: Path | None = None  # a run's adapted/ directory to start from instead of adapting
    budget_s: float | None = 120.0  # wall-clock seconds of each adaptation; None: the preset's recipe counts (or `steps`)
    replay: Path | None = None  # a finished study's directory: adapt with its step counts instead of budget_s
    steps: dict | None = None  # what replay sets: {"adapt": adapt_steps, "finetune": {label: steps}} (`replay_steps`)
    text: str | None = None
    eval_tokens: int = 1024  # tokens scored per point (retention, noise); sequences × length for context
    context: int | None = None
    sequences: int = 2  # context study: sequences of `multiple` × window tokens
    multiple: int = 4  # context study: sequence length in windows
    bin_tokens: int = 256  # context study: positions per bin
    seed: int = 0


# perplexity windows [tokens] of each study (and of the adaptation's progress measurements);
# retention uses longer windows so that key ages reach the short τ values
DEFAULT_CONTEXT = {"retention": 512, "noise": 256, "context": 256}


@dataclass
class Bench:
    """The model adapted once to `hardware`; `use(variant)` converts it to a variant and gives the adapted scalers back."""

    spec: StudySpec
    hardware: HardwareConfig
    run: object  # pipeline.Run: model, teacher, tokenizer, eval and calibration ids
    scalers: dict = field(default_factory=dict)
    adapt_metrics: dict = field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        return self.run.model

    def use(self, variant: HardwareConfig) -> None:
        from cimattn.models import convert
        from cimattn.models.convert import load_hardware_state

        convert(self.model, variant)
        load_hardware_state(self.model, self.scalers)

    def ppl(self, model: torch.nn.Module | None = None) -> float:
        from cimattn.eval import perplexity

        return perplexity(model or self.model, self.run.eval_ids, context=self.spec.context, eval_tokens=self.spec.eval_tokens).ppl


def prepare(spec: StudySpec, progress: Callable, log: Callable[[str], None]) -> Bench:
    """Load, keep a digital teacher, convert to the preset and adapt (or load --adapted): the study's starting model."""
    from cimattn import pipeline
    from cimattn.adapt import load_adapted
    from cimattn.adapt.checkpoint import PRESET
    from cimattn.models import convert
    from cimattn.models.convert import hardware_state_dict

    # adapted parameters belong to the preset they were adapted on: that one, not --preset, is swept
    hardware = load_preset(Path(spec.adapted) / PRESET if spec.adapted is not None else spec.preset)
    spec.preset = hardware.name
    if hardware.gaincell is None:
        raise CimattnError(f"study '{spec.name}' sweeps gain-cell properties: preset '{spec.preset}' is not a gain-cell preset")
    run = _run(spec, hardware, spec.out, progress)
    pipeline.load(run)
    run.teacher = copy.deepcopy(run.model).eval()
    convert(run.model, hardware)
    t0 = time.perf_counter()
    if spec.adapted is not None:
        load_adapted(run.model, spec.adapted)
        metrics = {"adapted_from": str(spec.adapted)}
    else:
        pipeline.adapt(run)
        metrics = dict(run.metrics)
    log(f"adapted in {time.perf_counter() - t0:.0f} s")
    return Bench(spec, hardware, run, hardware_state_dict(run.model, "scalers"), metrics)


def _run(spec: StudySpec, hardware: HardwareConfig, out: Path, progress: Callable):
    from cimattn import pipeline

    run_spec = pipeline.RunSpec(model=spec.model, preset=spec.preset, out=out, text=spec.text, eval_tokens=spec.eval_tokens,
                                context=spec.context, budget_s=spec.budget_s, seed=spec.seed,
                                adapt_steps=None if spec.steps is None else spec.steps.get("adapt", {}))
    return pipeline.Run(spec=run_spec, hardware=hardware, progress=progress, results=pipeline.new_results(run_spec, hardware, None))


def _variant(hardware: HardwareConfig, **gaincell) -> HardwareConfig:
    """The preset with gain-cell fields replaced (nested sections as dicts), validated."""
    return with_changes(hardware, {"gaincell": gaincell})


# ---------------------------------------------------------------- the studies
def retention(bench: Bench, progress: Callable) -> tuple[list[dict], dict]:
    step_s = bench.hardware.gaincell.leakage.step_time_s
    rows = []
    with progress("retention sweep", total=len(RETENTION_TAUS_S)) as advance:
        for tau in RETENTION_TAUS_S:
            bench.use(_variant(bench.hardware, leakage={"tau_s": tau}))
            rows.append({"tau_s": tau, "step_time_s": step_s, "retention_tokens": None if tau is None else tau / step_s,
                         "decay_per_token": 1.0 if tau is None else math.exp(-step_s / tau), "ppl": bench.ppl()})
            advance()
    ideal = rows[0]["ppl"]
    for row in rows:
        row["ppl_ratio_ideal"] = row["ppl"] / ideal
    # the shortest τ of the grid from which every longer τ stays within the tolerance
    shortest = None
    for row in rows[1:]:  # longest first
        if row["ppl_ratio_ideal"] > RETENTION_TOLERANCE:
            break
        shortest = row["tau_s"]
    return rows, {"ppl_no_leakage": ideal, "shortest_tau_s_within_10pct": shortest, "step_time_s": step_s}


def context(bench: Bench, progress: Callable) -> tuple[list[dict], dict]:
    spec, window = bench.spec, bench.hardware.gaincell.window_tokens
    length = spec.multiple * window
    ids = bench.run.eval_ids
    if ids.numel() < length * spec.sequences:
        raise CimattnError(
            f"context study needs {length * spec.sequences} tokens of text ({spec.sequences} × {length}), "
            f"the text has {ids.numel()}: lower --sequences or give a longer --text"
        )
    from cimattn.eval import max_context

    limit = max_context(bench.model)
    if limit is not None and length > limit:
        raise CimattnError(f"context study: {length} tokens exceed the model's {limit} positions: lower --multiple")
    bench.use(_variant(bench.hardware, context_policy="sliding"))
    batches = ids[: length * spec.sequences].reshape(spec.sequences, length)  # (N, L)
    with progress("per-position NLL", total=2 * spec.sequences) as advance:
        digital = position_nll(bench.run.teacher, batches, advance)
        hardware = position_nll(bench.model, batches, advance)
    rows = []
    for start in range(0, length, spec.bin_tokens):  # bins of token positions; position p is NLL index p − 1
        lo, hi = max(start, 1), min(start + spec.bin_tokens, length)
        d, h = digital[:, lo - 1 : hi - 1].mean().item(), hardware[:, lo - 1 : hi - 1].mean().item()
        rows.append({"first_position": lo, "last_position": hi - 1, "in_windows": hi / window,
                     "ppl_digital": math.exp(d), "ppl_hardware": math.exp(h), "ppl_ratio": math.exp(h - d)})
    first = [r for r in rows if r["last_position"] < window]
    beyond = [r for r in rows if r["first_position"] > window]
    metrics = {"window_tokens": window, "sequence_tokens": length, "sequences": spec.sequences,
               "ppl_hardware_first_window": _ppl(hardware[:, : window - 1]),
               "ppl_hardware_beyond_window": _ppl(hardware[:, window - 1 :]) if beyond else None,
               "ppl_digital_first_window": _ppl(digital[:, : window - 1]),
               "ppl_digital_beyond_window": _ppl(digital[:, window - 1 :]) if beyond else None,
               "bins_in_first_window": len(first)}
    return rows, metrics


def _ppl(nll: torch.Tensor) -> float:
    return math.exp(nll.mean().item())


@torch.inference_mode()
def position_nll(model: torch.nn.Module, batches: torch.Tensor, advance: Callable) -> torch.Tensor:
    """(N, L−1) NLL of token i+1 given tokens 0..i, one sequence per forward (float32, on the CPU)."""
    from cimattn.eval import token_nll

    rows = []
    for seq in batches:
        rows.append(token_nll(model, seq[None])[0].cpu())
        advance()
    return torch.stack(rows)


def noise(bench: Bench, progress: Callable) -> tuple[list[dict], dict]:
    read_at, var_at = NOISE_AWARE_AT
    noisy = _variant(bench.hardware, noise={"read_std": read_at, "cell_variability_std": var_at})
    # the same extra fine-tuning (--budget s) from the adapted model, on the noiseless chip and on the noisy one:
    # only the noise in the loop differs between the two models compared
    models = {label: _finetuned(bench, hw, label, progress) for label, hw in (("plain", bench.hardware), ("noise_aware", noisy))}
    rows = []
    with progress("noise sweep", total=len(models) * len(NOISE_LEVELS)) as advance:
        for read_std, var_std in NOISE_LEVELS:
            row = {"read_std": read_std, "cell_variability_std": var_std}
            for label, (b, _) in models.items():
                b.use(_variant(bench.hardware, noise={"read_std": read_std, "cell_variability_std": var_std}))
                row[f"ppl_{label}"] = b.ppl()
                advance()
            rows.append(row)
    point = next(r for r in rows if (r["read_std"], r["cell_variability_std"]) == NOISE_AWARE_AT)
    metrics = {"noise_aware_at": list(NOISE_AWARE_AT), "ppl_adapted_noiseless": bench.ppl(),
               "ppl_plain_noiseless": rows[0]["ppl_plain"], "ppl_noise_aware_noiseless": rows[0]["ppl_noise_aware"],
               "ppl_plain_at_aware_point": point["ppl_plain"], "ppl_noise_aware_at_aware_point": point["ppl_noise_aware"],
               "finetune_steps": {label: len(losses) for label, (_, losses) in models.items()}}
    return rows, metrics


def _finetuned(bench: Bench, hardware: HardwareConfig, label: str, progress: Callable) -> tuple[Bench, list[float]]:
    """A copy of the adapted model fine-tuned more (end-to-end distillation: --budget seconds, the replayed steps, or the
    recipe's finetune_steps without a budget) on `hardware`, saved in OUT/label."""
    from cimattn.adapt import distill
    from cimattn.adapt.checkpoint import save_parameters
    from cimattn.models.convert import hardware_state_dict, trainable_parameters
    from cimattn.pipeline import ADAPTED

    run = _run(bench.spec, hardware, bench.spec.out / label, bench.run.progress)
    for name in ("tokenizer", "eval_ids", "calib_ids", "teacher"):
        setattr(run, name, getattr(bench.run, name))
    run.model = copy.deepcopy(bench.model)
    tuned = Bench(bench.spec, hardware, run, bench.scalers)
    tuned.use(hardware)
    recipe = hardware.adapt.model_copy(update={"calib_context": hardware.adapt.calib_context or bench.spec.context})
    if bench.spec.steps is not None:
        steps = bench.spec.steps.get("finetune", {}).get(label, 0)
    else:
        steps = recipe.finetune_steps if bench.spec.budget_s is None else None
    losses = distill.distill(tuned.model, bench.run.teacher, bench.run.calib_ids, recipe, stage=label,
                             parameters=trainable_parameters(tuned.model, recipe.train), steps=steps,
                             budget_s=bench.spec.budget_s if steps is None else None,
                             checkpoint_dir=run.out, seed=bench.spec.seed, progress=progress)
    tuned.scalers = hardware_state_dict(tuned.model, "scalers")
    save_parameters(run.out / ADAPTED, hardware_state_dict(tuned.model, recipe.train), hardware)  # for `cimattn eval --adapted`
    return tuned, losses


STUDIES: dict[str, Callable[[Bench, Callable], tuple[list[dict], dict]]] = {
    "retention": retention, "context": context, "noise": noise,
}


def replay_steps(study_dir: Path, spec: StudySpec) -> dict:
    """The steps a finished study's adaptations ran (its study.json `steps`), to repeat it with no clock.

    The study must be the same one, on the same model, preset, seed and context, and must have adapted
    (a study of --adapted parameters has nothing to replay).
    """
    from cimattn.pipeline import replay_record, require_same

    previous = replay_record(study_dir, "study.json", "`cimattn study`")
    if not previous.get("steps", {}).get("adapt"):
        raise CimattnError(f"--replay {study_dir}: that study records no adaptation steps (it started from --adapted "
                           "parameters, or was made by a cimattn before they were recorded)")
    mine = asdict(spec) | {"preset": load_preset(spec.preset).name}  # a study records its preset by name
    require_same(study_dir, "study", previous["config"]["study"], mine, ("name", "model", "preset", "seed", "context"))
    return previous["steps"]


def run_study(spec: StudySpec, *, progress: Callable, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run study `spec.name` into `spec.out`; returns the study record (also in study.json)."""
    if spec.name not in STUDIES:
        raise CimattnError(f"unknown study '{spec.name}': choose one of {', '.join(STUDIES)}")
    if spec.sequences < 1 or spec.multiple < 1 or spec.bin_tokens < 1:
        raise CimattnError("--sequences, --multiple and --bin-tokens must be at least 1")
    if spec.context is None:
        spec.context = DEFAULT_CONTEXT[spec.name]
    if spec.replay is not None:
        if spec.adapted is not None:
            raise CimattnError("--replay repeats a study's adaptation; a study of --adapted parameters adapts nothing: drop one")
        spec.steps, spec.budget_s = replay_steps(spec.replay, spec), None
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bench = prepare(spec, progress, log)
    prepared = time.perf_counter()
    rows, metrics = STUDIES[spec.name](bench, progress)
    if spec.name != "context":  # the context study scores the digital model by position itself
        metrics["ppl_digital"] = bench.ppl(bench.run.teacher)
    record = {
        "study": spec.name, "model": spec.model, "preset": spec.preset, "seed": spec.seed,
        "git_commit": git_commit(), "versions": versions(),
        "config": {"study": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(spec).items()},
                   "hardware": bench.hardware.model_dump(mode="json")},
        "timings": {"prepare": round(prepared - started, 3), "sweep": round(time.perf_counter() - prepared, 3)},
        "steps": {"adapt": bench.run.results.get("adapt_steps", {}), **({"finetune": metrics["finetune_steps"]} if "finetune_steps" in metrics else {})},
        "metrics": {**metrics, "adaptation": {k: v for k, v in bench.adapt_metrics.items() if k.startswith(("ppl_", "adapted_"))}},
        "columns": list(rows[0]), "rows": rows,
    }
    atomic_write_json(out / "study.json", record)
    from cimattn.report.studies import write_study_report

    write_study_report(out, record)
    return record


__all__ = ["NOISE_LEVELS", "RETENTION_TAUS_S", "STUDIES", "StudySpec", "position_nll", "replay_steps", "run_study"]
