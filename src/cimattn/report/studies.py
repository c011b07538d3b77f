"""Plots and markdown of `cimattn study` results (study.json → study.png, study.md)."""

from __future__ import annotations

from pathlib import Path

from cimattn.report import plt
from cimattn.storage import atomic_write_text, save_figure

PAPER_TAU_S = 5e-3  # Leroux et al.'s retention (PAPERS.md §1)
SILICON_TAU_S = (1e-5, 1e-3)  # silicon gain cells hold 10 µs – 1 ms (PAPERS.md, neighbours)
OXIDE_TAU_S = 3600.0  # oxide (IGZO) gain cells: > 1 h


def _adaptation(study: dict, steps: dict) -> str:
    ran = ", ".join(f"{k} {v}" for k, v in steps.get("adapt", {}).items()) or "no training steps"
    ran += "".join(f"; {label} fine-tuning {n} steps" for label, n in steps.get("finetune", {}).items())
    how = f"{study['budget_s']:g} s budget" if study.get("budget_s") is not None else (
        f"replayed from `{study['replay']}`" if study.get("replay") else "the preset's recipe")
    return f"{how} ({ran})"


def write_study_report(out: Path, record: dict) -> Path:
    """Write `out/study.png` and `out/study.md` for one study record; returns the markdown's path."""
    out = Path(out)
    plot = {"retention": _plot_retention, "context": _plot_context, "noise": _plot_noise}[record["study"]](record)
    png = out / "study.png"
    save_figure(plot, png)
    study = record["config"]["study"]
    lines = [
        f"# cimattn study `{record['study']}`: {record['model']} on `{record['preset']}`",
        "",
        f"seed {record['seed']} · commit `{record.get('git_commit')}` · perplexity windows of {study['context']} tokens, "
        f"{study['eval_tokens']} tokens per point · adaptation: "
        + (f"loaded from `{study['adapted']}`" if study.get("adapted") else _adaptation(study, record.get("steps", {}))),
        "",
        "## Summary",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in record["metrics"].items()],
        "",
        "## Table",
        "",
        "| " + " | ".join(record["columns"]) + " |",
        "|" + "---|" * len(record["columns"]),
        *["| " + " | ".join(_fmt(row[c]) for c in record["columns"]) + " |" for row in record["rows"]],
        "",
        f"Timings: {', '.join(f'{k} {v:.0f} s' for k, v in record['timings'].items())}.",
        "",
        f"![{record['study']}]({png.name})",
        "",
    ]
    path = out / "study.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return "ideal" if value is None else str(value)


def _plot_retention(record: dict):
    rows = [r for r in record["rows"] if r["tau_s"] is not None]
    ideal = record["metrics"]["ppl_no_leakage"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.axvspan(*SILICON_TAU_S, color="tab:orange", alpha=0.15, label="silicon gain cells (10 µs – 1 ms)")
    ax.axvspan(OXIDE_TAU_S, max(r["tau_s"] for r in rows) * 3, color="tab:green", alpha=0.15, label="oxide gain cells (> 1 h)")
    ax.axvline(PAPER_TAU_S, color="gray", ls=":", label="paper (5 ms)")
    ax.axhline(ideal, color="k", ls="--", lw=1, label="no leakage")
    ax.plot([r["tau_s"] for r in rows], [r["ppl"] for r in rows], marker="o", color="tab:blue", label="adapted hardware")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"retention τ [s] (step {rows[0]['step_time_s'] * 1e6:g} µs per token)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{record['model']} · {record['preset']}: retention")
    ax.legend(fontsize=7)
    return fig


def _plot_context(record: dict):
    rows, window = record["rows"], record["metrics"]["window_tokens"]
    centre = [(r["first_position"] + r["last_position"]) / 2 for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(centre, [r["ppl_digital"] for r in rows], marker=".", label="digital")
    ax.plot(centre, [r["ppl_hardware"] for r in rows], marker=".", label="hardware (sliding window)")
    for k in range(1, record["metrics"]["sequence_tokens"] // window):
        ax.axvline(k * window, color="gray", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel(f"position [tokens] (dotted: multiples of the {window}-token window)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{record['model']} · {record['preset']}: perplexity by position")
    ax.legend(fontsize=8)
    return fig


def _plot_noise(record: dict):
    rows = record["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, (swept, fixed, label) in zip(axes, (("read_std", "cell_variability_std", "read noise std [full scale]"),
                                                ("cell_variability_std", "read_std", "cell variability std [gain]"))):
        sweep = sorted((r for r in rows if r[fixed] == 0.0), key=lambda r: r[swept])
        for key, name in (("ppl_plain", "fine-tuned without noise"), ("ppl_noise_aware", "fine-tuned with noise (noise-aware)")):
            ax.plot([r[swept] for r in sweep], [r[key] for r in sweep], marker="o", label=name)
        if "ppl_adapted_noiseless" in record["metrics"]:
            ax.axhline(record["metrics"]["ppl_adapted_noiseless"], color="grey", lw=0.8, ls="--", label="adapted, noiseless, before")
        ax.set_xlabel(label)
        ax.set_yscale("log")
    axes[0].set_ylabel("perplexity")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{record['model']} · {record['preset']}: noise (aware at read {record['metrics']['noise_aware_at'][0]}, "
                 f"var {record['metrics']['noise_aware_at'][1]})", fontsize=9)
    return fig

