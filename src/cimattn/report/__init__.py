"""The run report: `report.md` with plots, from a run's `results.json`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402

from cimattn.storage import atomic_write_text, save_figure  # noqa: E402

# metric key → label, in pipeline order
PPL_STAGES = {
    "ppl_digital": "digital",
    "ppl_hardware_initial": "converted",
    "ppl_linear_adapted": "linear cell, adapted",
    "ppl_hardware_initialized": "nonlinear cell (initialization algorithm unless skipped)",
    "ppl_hardware_layerwise": "layer-wise distillation",
    "ppl_hardware_adapted": "adapted",
}


def write_report(out: Path, results: dict) -> Path:
    """Write `out/report.md` and its plots; returns the report's path."""
    out = Path(out)
    plots = [p for p in (_plot_ppl(out, results), _plot_by_position(out, results), _plot_history(out, results)) if p]
    m = results.get("metrics", {})
    lines = [
        f"# cimattn run: {results['model']} on `{results['preset']}`",
        "",
        f"seed {results['seed']} · commit `{results.get('git_commit')}` · "
        + " · ".join(f"{k} {v}" for k, v in results.get("versions", {}).items()),
        "",
        "## Perplexity",
        "",
        f"Held-out text: {results.get('data', {}).get('eval', '?')}; {m.get('eval_tokens', '?')} tokens "
        f"({m.get('scored_tokens', '?')} scored) in windows of {results['config']['run']['context']} tokens.",
        "",
        "| stage | perplexity | × digital |",
        "|---|---|---|",
    ]
    digital = m.get("ppl_digital")
    for key, label in PPL_STAGES.items():
        if key in m:
            ratio = f"{m[key] / digital:.3g}" if digital else ""
            lines.append(f"| {label} | {m[key]:.4g} | {ratio} |")
    lines += _by_position_lines(results)
    from cimattn.cost.run import report_lines as cost_lines

    lines += ["", *cost_lines(results)]
    telemetry = results.get("telemetry", {})
    if telemetry:  # prune-and-recompute: keep rate and what SPRINT's buffer model fetched
        keys = ("keep_rate", "refetch_fraction", "adjacent_new_fraction", "fetched_tokens_per_query", "fetched_bytes_per_query",
                "context", "buffer_tokens")
        lines += ["", "## Pruning telemetry", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {telemetry[k]:.6g} |" for k in keys if k in telemetry]
    lines += ["", "## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results.get("timings", {}).items()]
    other = {k: v for k, v in m.items() if k not in PPL_STAGES and k != "gpu"}  # gpu: in the cost section
    if other:
        lines += ["", "## Other metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in other.items()]
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _plot_ppl(out: Path, results: dict) -> Path | None:
    m = results.get("metrics", {})
    stages = [(label, m[key]) for key, label in PPL_STAGES.items() if key in m]
    if len(stages) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh([s for s, _ in stages][::-1], [v for _, v in stages][::-1], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity (log scale, lower is better)")
    ax.set_title(f"{results['model']} · {results['preset']}")
    return save_figure(fig, out / "ppl_stages.png")


def _by_position_lines(results: dict) -> list[str]:
    """Perplexity per band of positions in the window, each model a column, and the hardware's ratio to digital."""
    curves = results.get("ppl_by_position", {})
    if len(curves) < 2 or "digital" not in curves:
        return []
    names = list(curves)
    lines = ["", "### By position in the window", "",
             "| positions | tokens | " + " | ".join(n.replace("_", " ") for n in names) + " | × digital |",
             "|---|---|" + "---|" * (len(names) + 1)]
    rows = {n: {b["first"]: b for b in curves[n]} for n in names}
    for band in curves["digital"]:
        cells = [rows[n].get(band["first"], {}).get("ppl") for n in names]
        last = cells[-1]
        ratio = f"{last / band['ppl']:.3g}" if last is not None else ""
        lines.append(f"| {band['first']}–{band['last']} | {band['tokens']} | "
                     + " | ".join("" if c is None else f"{c:.4g}" for c in cells) + f" | {ratio} |")
    return lines


def _plot_by_position(out: Path, results: dict) -> Path | None:
    curves = results.get("ppl_by_position", {})
    if len(curves) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, bands in curves.items():
        ax.plot([b["first"] for b in bands], [b["ppl"] for b in bands], marker="o", label=name.replace("_", " "))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("position in the window (band start)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{results['model']} · {results['preset']}: perplexity by context seen")
    ax.legend(fontsize=8)
    return save_figure(fig, out / "ppl_by_position.png")


def _plot_history(out: Path, results: dict) -> Path | None:
    history = {k: v for k, v in results.get("history", {}).items() if v}
    if not history:
        return None
    cols = min(3, len(history))
    rows = -(-len(history) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(history) :]:
        ax.axis("off")
    for ax, (name, values) in zip(axes.flat, history.items()):
        ax.plot(range(1, len(values) + 1), values, marker="." if len(values) < 60 else None)
        ax.set_yscale("log")
        ax.set_xlabel("layer" if name == "layerwise_error" else "step")
        ax.set_title(name.replace("_", " "))
    return save_figure(fig, out / "adaptation.png")
