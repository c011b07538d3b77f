"""lm-eval-harness adapter: a hardware model as the lm-eval model `cimattn`.

`CimattnLM` is lm-eval's `HFLM` around a model that cimattn loaded,
converted to a preset and, optionally, loaded with adapted parameters, so
every task type HFLM supports (multiple choice, loglikelihood, rolling
perplexity, generation) runs on the simulated hardware.  Importing this
module registers it; lm-eval's own CLI cannot import it by itself, so
`cimattn-lm-eval` (this module's `cli_evaluate`) is `lm_eval` with the
model registered::

    cimattn-lm-eval --model cimattn --model_args model=smollm2-135m,preset=leroux-gaincell,adapted=runs/demo/adapted \\
        --tasks paper --device cpu --batch_size 8

`cimattn lm-eval` does the same through `evaluate_tasks` and writes a
results.json in the project's format.  The name `paper` stands for the task
list Leroux et al. evaluate (Table 1; the list is their `run_lm_eval.sh`).

The module is `harness`, not `lm_eval`, so it never shadows the package.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from cimattn.errors import CimattnError

# Leroux et al., Table 1 (PAPERS.md §1); names as in the authors' evaluation/run_lm_eval.sh
PAPER_TASKS = ("wikitext", "lambada_openai", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "xwinograd", "piqa")
TASK_GROUPS = {"paper": PAPER_TASKS}
PAPER_GPT2_ACC_MEAN = 0.4302  # public GPT-2 small, Table 1 average — Leroux et al. (PAPERS.md §1)


@register_model("cimattn")
class CimattnLM(HFLM):
    """HFLM over a cimattn hardware model.

    model: what `cimattn.models.load_model` accepts; preset: a preset name or
    YAML path (None: digital, or the adapted directory's own preset);
    adapted: a run's `adapted/` directory.  max_length defaults to the gain-cell
    window, the context the hardware holds (the paper's sequence length);
    longer requests are cut on the left by lm-eval, as for any model.
    Other keyword arguments go to HFLM.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        preset: str | None = None,
        adapted: str | Path | None = None,
        seed: int = 0,
        device: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        **kwargs,
    ):
        from cimattn.config import load_preset
        from cimattn.eval.perplexity import max_context
        from cimattn.pipeline import hardware_model, hardware_source

        if not device or (torch.device(device).type == "cuda" and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # as HFLM: lm-eval's CLI asks for cuda:0 by default
        adapted = Path(adapted) if adapted else None
        lm, tokenizer = hardware_model(str(model), preset or None, adapted, int(seed))
        lm.to(device)
        source = hardware_source(preset or None, adapted)
        self.hardware = load_preset(source) if source else None
        if max_length is None and self.hardware is not None and self.hardware.gaincell is not None:
            max_length = min(self.hardware.gaincell.window_tokens, max_context(lm) or self.hardware.gaincell.window_tokens)
        self.cimattn_args = {"model": str(model), "preset": self.hardware.name if self.hardware else "digital",
                             "preset_source": source, "adapted": str(adapted) if adapted else None, "seed": int(seed)}
        super().__init__(pretrained=lm, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, **kwargs)

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "cimattn": self.cimattn_args}


def expand_tasks(tasks: str | list[str]) -> list[str]:
    """A comma list of task names with group names (`paper`) expanded, order kept, duplicates dropped."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    expanded: list[str] = []
    for name in (n.strip() for n in names):
        for task in TASK_GROUPS.get(name, (name,)):
            if task and task not in expanded:
                expanded.append(task)
    if not expanded:
        raise CimattnError("--tasks is empty: give task names separated by commas, or 'paper'")
    return expanded


def task_manager(tasks: list[str], include_path: Path | None):
    """lm-eval's TaskManager: only the local tasks when they cover the request (fast, offline), else all."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise CimattnError(f"--include-path {include_path}: not a directory of lm-eval task YAML files")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise CimattnError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: see `lm_eval ls tasks`, or give --include-path with their YAML"
        )
    return manager


def evaluate_tasks(
    lm: CimattnLM,
    tasks: str | list[str],
    *,
    include_path: Path | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    seed: int = 0,
) -> dict:
    """Run lm-eval tasks on `lm`; returns lm-eval's results dict (`results`, `n-samples`, `versions`, ...)."""
    from lm_eval import simple_evaluate

    names = expand_tasks(tasks)
    try:
        return simple_evaluate(
            model=lm, tasks=names, task_manager=task_manager(names, include_path), num_fewshot=num_fewshot,
            limit=limit, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            log_samples=False,
        )
    except ConnectionError as e:  # a task's dataset is on the Hub and the Hub is out of reach
        raise CimattnError(f"cannot download a task's data ({e}): these tasks need a network, or give local tasks with --include-path") from None


def summary(output: dict, tasks: list[str]) -> dict:
    """{task: {metric: value}} of the requested tasks (stderr dropped) and the mean of their `acc`."""
    table: dict[str, dict[str, float]] = {}
    for task in tasks:
        row = output["results"].get(task, {})
        table[task] = {
            key.removesuffix(",none"): float(value)
            for key, value in row.items()
            if isinstance(value, (int, float)) and "_stderr" not in key and key != "samples" and math.isfinite(value)
        }
    accs = [row["acc"] for row in table.values() if "acc" in row]
    return {"tasks": table, "acc_mean": sum(accs) / len(accs) if accs else None, "acc_tasks": len(accs)}


def lm_eval_run(
    *, model: str, preset: str | None, adapted: Path | None, tasks: str, out: Path, include_path: Path | None = None,
    num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 1, max_length: int | None = None,
    device: str = "cpu", seed: int = 0,
) -> dict:
    """`cimattn lm-eval`: evaluate tasks on the (adapted) hardware model; writes and returns OUT/results.json."""
    import time
    from importlib import metadata

    from cimattn.storage import atomic_write_json, git_commit, versions

    names = expand_tasks(tasks)
    started = time.perf_counter()
    lm = CimattnLM(model=model, preset=preset, adapted=adapted, seed=seed, device=device, batch_size=batch_size, max_length=max_length)
    loaded = time.perf_counter()
    output = evaluate_tasks(lm, names, include_path=include_path, num_fewshot=num_fewshot, limit=limit, seed=seed)
    table = summary(output, names)
    results = {
        **lm.cimattn_args,
        "git_commit": git_commit(),
        "versions": {**versions(), "lm_eval": metadata.version("lm_eval")},
        "config": {"tasks": names, "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
                   "max_length": lm.max_length, "hardware": lm.hardware.model_dump(mode="json") if lm.hardware else None},
        "timings": {"load": round(loaded - started, 3), "lm_eval": round(time.perf_counter() - loaded, 3)},
        "metrics": {"lm_eval": table["tasks"], "lm_eval_acc_mean": table["acc_mean"], "lm_eval_acc_tasks": table["acc_tasks"]},
        "lm_eval": {k: output[k] for k in ("results", "groups", "n-samples", "versions", "higher_is_better") if k in output},
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out) / "results.json", results)
    return results


def cli_evaluate() -> None:
    """`cimattn-lm-eval`: lm-eval's CLI with the `cimattn` model registered (this module is imported) and `--tasks paper` expanded."""
    import sys

    from lm_eval.__main__ import cli_evaluate as lm_eval_cli

    args = sys.argv
    for i, arg in enumerate(args[:-1]):
        if arg == "--tasks":
            args[i + 1] = ",".join(expand_tasks(args[i + 1]))
    for i, arg in enumerate(args):
        if arg.startswith("--tasks="):
            args[i] = "--tasks=" + ",".join(expand_tasks(arg.removeprefix("--tasks=")))
    try:
        lm_eval_cli()
    except CimattnError as e:  # bad model_args: one line, exit 2, as the cimattn CLI
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


__all__ = ["PAPER_GPT2_ACC_MEAN", "PAPER_TASKS", "TASK_GROUPS", "CimattnLM", "cli_evaluate", "evaluate_tasks", "expand_tasks", "lm_eval_run", "summary"]
