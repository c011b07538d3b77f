"""`cimattn` command line: thin — parses, calls the library, prints.

Bad input ends with one line on stderr and exit code 2 (a traceback only
with --debug); Ctrl-C stops with exit code 130 and, since every result file
is written atomically, leaves no half-written file.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
    budget: Annotated[float | None, typer.Option(min=0, help="Wall-clock seconds for adaptation (default: the preset's recipe).")] = None,
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """The whole study: digital baseline → convert → adapt → evaluate → report."""
    from cimattn.pipeline import RunSpec, run_pipeline

    ui = _setup(seed, quiet)
    spec = RunSpec(model=model, preset=preset, out=out, text=text, eval_tokens=eval_tokens, context=context, budget_s=budget, seed=seed)
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
    budget: Annotated[float | None, typer.Option(min=0, help="Wall-clock seconds for adaptation (default: the preset's recipe).")] = None,
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Convert and adapt only (no digital baseline): writes OUT/adapted/ for `eval --adapted` and `generate --adapted`."""
    from cimattn.pipeline import RunSpec, run_pipeline

    ui = _setup(seed, quiet)
    spec = RunSpec(model=model, preset=preset, out=out, text=text, eval_tokens=eval_tokens, context=context, budget_s=budget, seed=seed)
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
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Perplexity of the digital model and, with --preset, of the hardware model."""
    from cimattn.pipeline import evaluate_models

    ui = _setup(seed, quiet)
    results = evaluate_models(model=model, preset=preset, adapted=adapted, out=out, text=text,
                              eval_tokens=eval_tokens, context=context, seed=seed, progress=ui.progress)
    _print_metrics(ui, results, out)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")] = "The capital of France is",
    model: Model = "smollm2-135m",
    preset: Annotated[str | None, typer.Option(help="Hardware preset; omit for the digital model.")] = None,
    adapted: Annotated[Path | None, typer.Option(help="A run's adapted/ directory (its preset is used unless --preset).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 40,
    temperature: Annotated[float, typer.Option(min=0, help="0 = greedy.")] = 0.0,
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Continue a prompt with the digital or the hardware model (decode runs through the hardware state)."""
    from cimattn.eval import generate_text
    from cimattn.pipeline import hardware_model

    _setup(seed, quiet)
    lm, tokenizer = hardware_model(model, preset, adapted, seed)
    typer.echo(prompt + generate_text(lm, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))


@app.command()
def fetch(seed: Seed = 0, quiet: Quiet = False, debug: Debug = False):
    """Put the bundled model and corpus into the cache ($CIMATTN_CACHE, default ~/.cache/cimattn)."""
    from cimattn.data import fetch_corpus
    from cimattn.models import load_model

    ui = _setup(0, quiet)
    ui.log(f"corpus: {fetch_corpus()}")
    load_model("smollm2-135m")
    ui.log("model: smollm2-135m ready")


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


def _print_metrics(ui: _Console, results: dict, out: Path) -> None:
    for key, value in results["metrics"].items():
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
