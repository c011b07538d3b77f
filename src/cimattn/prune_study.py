"""Keep rate vs perplexity of prune-and-recompute attention: analog scorers and digital baselines, one harness.

Every method is a `prune_recompute` hardware config (a shipped preset with
a few fields changed), converted onto the same model and measured the same
way: thresholds (threshold / relative rules) calibrated to the target keep
rate on the bundled corpus' training works, then perplexity on held-out
text by the project's convention with telemetry attached, so the *measured*
keep rate is reported beside the target.  The baselines keep the same
always-kept tokens (current, recent, sink) as the analog scorers.

Results go to OUT/prune_study.json after every point (atomic), so an
interrupted study resumes where it stopped when rerun with the same
settings; OUT/prune_study.md holds the table and OUT/prune_study.png the
curves.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cimattn.config import HardwareConfig, load_preset, with_changes
from cimattn.config.schema import MARGIN_RULES
from cimattn.errors import CimattnError
from cimattn.storage import (
    atomic_write_json,
    atomic_write_text,
    git_commit,
    read_json,
    save_figure,
    versions,
)

RESULTS = "prune_study.json"


@dataclass(frozen=True)
class Method:
    """One selection method: a shipped preset, scorer fields changed, a selection rule."""

    preset: str
    rule: str
    scorer: dict = field(default_factory=dict)
    note: str = ""
    selection: dict = field(default_factory=dict)  # other selection fields


METHODS: dict[str, Method] = {
    "oracle-topk": Method("sprint", "keep_rate", {"kind": "exact"}, "exact q·k, top ceil(rate·n) per query (the oracle)"),
    "sprint": Method("sprint", "threshold", {}, "ReRAM 4-bit key MSBs, 4-bit query, comparator vs per-head threshold"),
    "hyatt": Method("hyatt", "threshold", {}, "charge CIM 4-bit key MSBs, comparator vs per-head threshold"),
    "quest": Method("sprint", "keep_rate", {"kind": "quest"}, "Quest page min/max bounds (16-token pages), top per query"),
    "h2o": Method("sprint", "keep_rate", {"kind": "h2o"}, "H2O accumulated attention, half the budget recent"),
    "random": Method("sprint", "keep_rate", {"kind": "random"}, "uniform random keys per query"),
    "sprint-relative": Method("sprint", "relative", {}, "ReRAM scorer, margin below the row maximum (max-tracking variant)"),
    "sprint-topk": Method("sprint", "keep_rate", {}, "ReRAM scorer, top ceil(rate·n) per query (a sorter, not a comparator)"),
    "oracle-relative": Method("sprint", "relative", {"kind": "exact"}, "exact q·k, margin below the row maximum"),
    "sprint-layer": Method("sprint", "threshold", {}, "ReRAM scorer, comparator vs one threshold per layer (heads share it)",
                           {"calibrate_per": "layer"}),
    "sprint-relative-layer": Method("sprint", "relative", {}, "ReRAM scorer, one margin below the row maximum per layer",
                                    {"calibrate_per": "layer"}),
    "sprint-relative-model": Method("sprint", "relative", {}, "ReRAM scorer, one margin below the row maximum for the whole model",
                                    {"calibrate_per": "model"}),
    "oracle-relative-model": Method("sprint", "relative", {"kind": "exact"}, "exact q·k, one margin below the row maximum for the whole model",
                                    {"calibrate_per": "model"}),
    "sprint-probability-layer": Method("sprint", "probability", {}, "ReRAM scorer, one floor on the softmax weight under the scorer "
                                       "per layer", {"calibrate_per": "layer"}),
    "sprint-probability-model": Method("sprint", "probability", {}, "ReRAM scorer, one margin below the row's log-sum-exp (a floor "
                                       "on the key's softmax weight under the scorer) for the whole model", {"calibrate_per": "model"}),
    "oracle-probability-model": Method("sprint", "probability", {"kind": "exact"}, "exact q·k, one floor on the softmax weight for "
                                       "the whole model", {"calibrate_per": "model"}),
    "sprint-probability-learned": Method("sprint", "probability", {}, "ReRAM scorer, one floor for the model, then per-head floors "
                                         "learned against the digital model, one offset back to the keep rate",
                                         {"calibrate_per": "model", "learn_steps": 20}),
    "sprint-relative-learned": Method("sprint", "relative", {}, "ReRAM scorer, per-layer margins then per-head margins learned "
                                      "against the digital model (LeOPArd-style), one offset back to the keep rate",
                                      {"calibrate_per": "layer", "learn_steps": 20}),
    "oracle-relative-learned": Method("sprint", "relative", {"kind": "exact"}, "exact q·k, margins learned as sprint-relative-learned "
                                      "(what learning can reach with a perfect scorer)", {"calibrate_per": "layer", "learn_steps": 20}),
    "sprint-noisy": Method(
        "sprint", "threshold", {"variation_std": 0.05, "comparator_offset_std": 0.01, "read_noise_std": 0.01},
        "ReRAM scorer with 5 % cell variation, 1 % comparator offset and read noise (ours, not sourced: a sensitivity point)",
    ),
}


def method_config(name: str, keep_rate: float, seed: int = 0) -> HardwareConfig:
    """The hardware config of method `name` at target `keep_rate` (validated like a preset)."""
    if name not in METHODS:
        raise CimattnError(f"unknown prune-study method '{name}': choose from {', '.join(METHODS)}")
    m = METHODS[name]
    changes = {
        "name": f"{name}@{keep_rate:g}",
        "prune_recompute": {"scorer": {**m.scorer, "seed": seed}, "selection": {"rule": m.rule, "keep_rate": keep_rate, "threshold": None, **m.selection}},
    }
    try:
        return with_changes(load_preset(m.preset), changes)
    except ValueError as e:
        raise CimattnError(f"prune-study method '{name}' at keep rate {keep_rate}: {e}") from None


def run_prune_study(
    *,
    model: str,
    out: Path,
    keep_rates: list[float],
    methods: list[str],
    context: int = 2048,
    eval_tokens: int = 4096,
    calib_tokens: int = 2048,
    text: str | None = None,
    seed: int = 0,
    progress: Callable | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Measure perplexity and telemetry of every (method, keep rate); returns and writes the study record."""
    from cimattn.adapt.thresholds import calibration_windows, prepare_thresholds
    from cimattn.attention.prune_recompute import collect_telemetry
    from cimattn.data import load_text, tokenize_cached
    from cimattn.eval import perplexity
    from cimattn.models import convert, load_model

    for rate in keep_rates:
        if not 0 < rate <= 1:
            raise CimattnError(f"keep rate {rate} is outside (0, 1]: give rates such as 0.25,0.1")
    configs = {(name, rate): method_config(name, rate, seed) for rate in keep_rates for name in methods}
    settings = {"model": model, "context": context, "eval_tokens": eval_tokens, "calib_tokens": calib_tokens, "text": text, "seed": seed}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out)
    previous = read_json(out / RESULTS) if (out / RESULTS).is_file() else {}
    reuse = previous.get("settings_hash") == digest
    record = {
        "settings": settings, "settings_hash": digest, "git_commit": git_commit(), "versions": versions(),
        "ppl_digital": previous.get("ppl_digital") if reuse else None,
        "rows": [r for r in previous.get("rows", []) if reuse],
        "methods": {**(previous.get("methods", {}) if reuse else {}), **{name: asdict(METHODS[name]) for name in methods}},
    }
    done = {(r["method"], r["target_keep_rate"]) for r in record["rows"]}

    torch.manual_seed(seed)
    lm, tokenizer = load_model(model, seed=seed)
    eval_ids = tokenize_cached(tokenizer, load_text(text, "eval"))
    calib = calibration_windows(tokenize_cached(tokenizer, load_text(None, "calib")), calib_tokens, context)

    def measure(label: str):
        n = min(eval_tokens, eval_ids.numel())
        if progress is None:
            return perplexity(lm, eval_ids, context=context, eval_tokens=eval_tokens)
        with progress(label, total=n) as advance:
            return perplexity(lm, eval_ids, context=context, eval_tokens=eval_tokens, progress=advance)

    if record["ppl_digital"] is None:
        result = measure("digital")
        record.update(ppl_digital=result.ppl, scored_tokens=result.scored_tokens)
        atomic_write_json(out / RESULTS, record)
    log(f"digital: ppl {record['ppl_digital']:.4f}")
    learning = any(hw.prune_recompute.selection.learn_steps for key, hw in configs.items() if key not in done)
    teacher = copy.deepcopy(lm).eval() if learning else None  # before any conversion: the digital model
    for (name, rate), hw in configs.items():
        if (name, rate) in done:
            continue
        convert(lm, hw)
        if hw.prune_recompute.selection.rule in ("threshold", *MARGIN_RULES):
            prepare_thresholds(lm, calib, teacher, measure=False)
        with collect_telemetry(lm) as telemetry:
            result = measure(f"{name} @ {rate:g}")
        summary = telemetry.summary()
        row = {
            "method": name, "target_keep_rate": rate, "keep_rate": summary["keep_rate"], "ppl": result.ppl,
            "ppl_increase_pct": 100 * (result.ppl / record["ppl_digital"] - 1),
            "refetch_fraction": summary["refetch_fraction"], "adjacent_new_fraction": summary["adjacent_new_fraction"],
            "fetched_bytes_per_query": summary["fetched_bytes_per_query"],
            "seconds": result.seconds,
        }
        record["rows"].append(row)
        atomic_write_json(out / RESULTS, record)
        log(f"{name} @ {rate:g}: keep {row['keep_rate']:.4f}, ppl {row['ppl']:.4f} ({row['ppl_increase_pct']:+.2f} %)")
    write_study_report(out, record)
    return record


def study_table(record: dict) -> str:
    """Markdown table of a study record: one row per (target keep rate, method), with the oracle's gap."""
    oracle = {r["target_keep_rate"]: r["ppl"] for r in record["rows"] if r["method"] == "oracle-topk"}
    settings = record["settings"]
    lines = [
        f"digital perplexity {record['ppl_digital']:.4f} ({settings['model']}, context {settings['context']}, {settings['eval_tokens']} held-out tokens)",
        "",
        ("| target keep | method | measured keep | perplexity | Δ vs digital | Δ vs oracle top-k | refetch / seq (buffer) "
         "| new vs previous query / seq | fetched MB/query |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(record["rows"], key=lambda r: (-r["target_keep_rate"], list(METHODS).index(r["method"]))):
        gap = f"{100 * (r['ppl'] / oracle[r['target_keep_rate']] - 1):+.2f} %" if r["target_keep_rate"] in oracle else ""
        lines.append(
            f"| {r['target_keep_rate']:g} | {r['method']} | {r['keep_rate']:.4f} | {r['ppl']:.4f} | {r['ppl_increase_pct']:+.2f} % | "
            f"{gap} | {100 * r['refetch_fraction']:.2f} % | {_pct(r.get('adjacent_new_fraction'))} | {r['fetched_bytes_per_query'] / 1e6:.3g} |"
        )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f} %"


def write_study_report(out: Path, record: dict) -> None:
    """OUT/prune_study.md (table, method notes) and OUT/prune_study.png (perplexity increase vs measured keep rate)."""
    notes = [f"- **{name}**: {m['note']}" for name, m in record["methods"].items()]
    plot = plot_keep_rate_curves(Path(out) / "prune_study.png", record)
    text = ["# Prune-and-recompute study", "", study_table(record), "", *notes, "", f"![keep rate vs perplexity]({plot.name})", ""]
    atomic_write_text(Path(out) / "prune_study.md", "\n".join(text))


def plot_keep_rate_curves(path: Path, record: dict) -> Path:
    """Perplexity increase over digital vs measured keep rate, one line per method (log keep-rate axis)."""

    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name in record["methods"]:
        rows = sorted((r for r in record["rows"] if r["method"] == name), key=lambda r: r["keep_rate"])
        if rows:
            style = "-o" if name.startswith(("sprint", "hyatt")) else "--s"
            ax.plot([r["keep_rate"] for r in rows], [r["ppl_increase_pct"] for r in rows], style, label=name, markersize=4)
    ax.set_xscale("log")
    ax.set_xlabel("measured keep rate (share of visible keys)")
    ax.set_ylabel("perplexity increase over digital [%]")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_title(f"{record['settings']['model']}, {record['settings']['context']}-token context")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


__all__ = ["METHODS", "Method", "method_config", "plot_keep_rate_curves", "run_prune_study", "study_table", "write_study_report"]
