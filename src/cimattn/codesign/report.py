"""A study's figures: hypervolume vs real evaluations per method, the Pareto front (plot + table), proxy error.

Hypervolume is computed in the space the search compares in (log of the objectives that say
`log: true`, maximised ones negated), normalised so the ideal point of all methods' feasible
evaluations is 0 and the reference is 1 on every axis (reference = an objective's `ref`, else
the worst feasible value + 10 % of the range).  Infeasible points (constraints) add nothing.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from cimattn.codesign.methods import feasible, from_proxy, objective_value, proxy_targets, transformed
from cimattn.codesign.pareto import hypervolume, pareto_mask
from cimattn.codesign.space import Space
from cimattn.codesign.store import Store
from cimattn.storage import atomic_write_bytes, atomic_write_json, atomic_write_text

MARGIN = 0.1


def normaliser(space: Space, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ideal, reference) in transformed objective units, from the feasible points of every method."""
    m = len(space.objectives)
    finite = points[np.all(np.isfinite(points[:, :m]), axis=1), :m] if len(points) else np.zeros((0, m))
    ideal = finite.min(0) if len(finite) else np.zeros(m)
    worst = finite.max(0) if len(finite) else np.ones(m)
    ref = worst + MARGIN * np.maximum(worst - ideal, 1e-12)
    for j, o in enumerate(space.objectives):
        if o.ref is not None:
            ref[j] = objective_value(o, o.ref)
    return ideal, ref


def hv_curves(space: Space, trials: dict[str, list], constants: dict, ideal=None, ref=None) -> tuple[dict[str, list[float]], np.ndarray, np.ndarray]:
    """Normalised hypervolume after each evaluation, per method."""
    m = len(space.objectives)
    pts = {name: np.array([transformed(space, mt)[:m] if feasible(space, mt, constants) else [np.inf] * m for _, mt in t]).reshape(-1, m)
           for name, t in trials.items()}
    if ideal is None:
        ideal, ref = normaliser(space, np.vstack([p for p in pts.values()] + [np.zeros((0, m))]))
    span = np.maximum(ref - ideal, 1e-12)
    curves = {}
    for name, p in pts.items():
        z = (p - ideal) / span
        curves[name] = [hypervolume(z[: i + 1][np.all(np.isfinite(z[: i + 1]), axis=1)], np.ones(m)) for i in range(len(z))]
    return curves, ideal, ref


CV_FOLDS = 5  # cross-validated proxy error once there are at least 4 designs per fold


def evaluations_to_reach(curve: list[float], target: float) -> int | None:
    for i, v in enumerate(curve):
        if v >= target - 1e-12:
            return i + 1
    return None


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def proxy_error(space: Space, train: list, test: list, seed: int = 0) -> dict:
    """Fit a proxy on `train` (the proxy method's evaluations), score it on held-out `test` designs:
    mean relative error of each objective in its own unit, and Spearman rank correlation."""
    import torch

    from cimattn.codesign.methods import ProxySearch
    from cimattn.codesign.proxy import finite_cap

    search = ProxySearch(space, seed, len(train), {})
    x = np.array([space.to_unit(p) for p, _ in train])
    y = finite_cap(np.array([proxy_targets(space, m) for _, m in train]))
    search.proxy.fit(x, y)
    with torch.no_grad():
        mu, _ = search.proxy.predict(torch.tensor([space.to_unit(p) for p, _ in test], dtype=torch.float32))
    out = {"train": len(train), "held_out": len(test)}
    for j, o in enumerate(space.objectives):
        truth = np.array([m[o.metric] for _, m in test])
        ok = np.isfinite(truth) & (truth != 0)  # relative error is undefined at 0
        pred = from_proxy(o.metric, mu[:, j].numpy().astype(float))
        pred = -pred if o.direction == "maximize" else pred
        pred = np.exp(pred) if o.log else pred
        out[o.metric] = {"mean_relative_error": float(np.mean(np.abs(pred[ok] - truth[ok]) / np.abs(truth[ok]))),
                         "spearman": spearman(pred[ok], truth[ok]) if ok.sum() > 2 else math.nan}
    return out


def proxy_error_cv(space: Space, evaluations: list, folds: int = CV_FOLDS, seed: int = 0) -> dict:
    """`proxy_error` in k-fold cross-validation over every method's evaluations: the proxy's accuracy over the
    space the study covered, without the shift from the proxy's own points (crowded at the front) to the rest."""
    order = np.random.default_rng(seed).permutation(len(evaluations))
    parts = []
    for fold in np.array_split(order, folds):
        held = set(fold.tolist())
        parts.append(proxy_error(space, [evaluations[i] for i in order if i not in held], [evaluations[i] for i in fold], seed))
    out = {"folds": folds, "evaluations": len(evaluations)}
    for o in space.objectives:
        out[o.metric] = {k: float(np.nanmean([part[o.metric][k] for part in parts])) for k in ("mean_relative_error", "spearman")}
    return out


def summarise(space: Space, out: Path, methods: list[str]) -> dict:
    """Write summary.json, hypervolume.png, front.png and front.md into `out` from its study.db."""
    from cimattn.codesign.study import identity

    out = Path(out)
    store = Store(out / "study.db", identity(space, 0))
    try:
        constants = store.get_meta("constants") or {}
        trials = {name: [t for t in store.trials(name) if t[1] is not None] for name in methods}
    finally:
        store.close()
    trials = {k: v for k, v in trials.items() if v}
    curves, ideal, ref = hv_curves(space, trials, constants)
    summary: dict = {"space": space.name, "constants": constants, "objectives": [o.metric for o in space.objectives],
                     "constraints": [str(c) for c in space.constraints], "reference_point": ref.tolist(), "ideal_point": ideal.tolist(),
                     "methods": {}}
    tpe_final = curves["tpe"][-1] if "tpe" in curves else None
    for name, curve in curves.items():
        row = {"evaluations": len(curve), "final_hypervolume": curve[-1], "hypervolume": curve,
               "feasible": sum(feasible(space, m, constants) for _, m in trials[name])}
        if tpe_final is not None:
            row["evaluations_to_tpe_final"] = evaluations_to_reach(curve, tpe_final)
        summary["methods"][name] = row
    if "proxy" in trials and len(trials) > 1:
        seen = {json.dumps(p, sort_keys=True) for p, _ in trials["proxy"]}
        held = list({json.dumps(p, sort_keys=True): (p, m) for k, t in trials.items() if k != "proxy" for p, m in t
                     if json.dumps(p, sort_keys=True) not in seen}.values())
        if len(held) > 2 and len(trials["proxy"]) > 2:
            summary["proxy_error"] = proxy_error(space, trials["proxy"], held)
    everything = list({json.dumps(p, sort_keys=True): (p, m) for t in trials.values() for p, m in t}.values())
    if len(everything) >= 4 * CV_FOLDS:
        summary["proxy_error_cv"] = proxy_error_cv(space, everything, CV_FOLDS)
    front = front_rows(space, trials, constants)
    summary["front"] = front
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "front.md", front_table(space, summary))
    _plot_hv(out / "hypervolume.png", curves, space)
    _plot_front(out / "front.png", space, trials, constants)
    return summary


def front_rows(space: Space, trials: dict, constants: dict) -> list[dict]:
    """The Pareto front of all methods' feasible evaluations together, best first on the first objective."""
    m = len(space.objectives)
    rows = [(name, p, mt) for name, t in trials.items() for p, mt in t if feasible(space, mt, constants)]
    if not rows:
        return []
    pts = np.array([transformed(space, mt)[:m] for _, _, mt in rows])
    ok = np.all(np.isfinite(pts), axis=1)
    rows, pts = [r for r, k in zip(rows, ok) if k], pts[ok]
    mask = pareto_mask(pts)
    unique: dict[str, dict] = {}
    for (name, p, mt), keep in zip(rows, mask):
        key = json.dumps(p, sort_keys=True)
        if keep:
            entry = unique.setdefault(key, {"params": p, "metrics": {o.metric: mt[o.metric] for o in space.objectives}, "found_by": []})
            if name not in entry["found_by"]:
                entry["found_by"].append(name)
    return sorted(unique.values(), key=lambda r: r["metrics"][space.objectives[0].metric])


def front_table(space: Space, summary: dict) -> str:
    lines = [f"# Co-design study `{space.name}`", ""]
    if summary["constants"]:
        lines.append("Study constants: " + ", ".join(f"{k} = {v:.6g}" for k, v in summary["constants"].items()))
    if summary["constraints"]:
        lines.append("Constraints: " + "; ".join(summary["constraints"]))
    lines += ["", "## Hypervolume (normalised, higher is better)", "",
              "| method | evaluations | feasible | final hypervolume | evaluations to reach TPE's final |", "|---|---|---|---|---|"]
    for name, r in summary["methods"].items():
        lines.append(f"| {name} | {r['evaluations']} | {r['feasible']} | {r['final_hypervolume']:.4f} | {r.get('evaluations_to_tpe_final', '–')} |")
    if "proxy_error" in summary:
        pe = summary["proxy_error"]
        lines += ["", f"## Proxy error on {pe['held_out']} held-out designs (proxy fitted on the proxy method's {pe['train']})", "",
                  "| objective | mean relative error | Spearman |", "|---|---|---|"]
        lines += [f"| {o} | {pe[o]['mean_relative_error']:.4f} | {pe[o]['spearman']:.3f} |" for o in summary["objectives"]]
    if "proxy_error_cv" in summary:
        cv = summary["proxy_error_cv"]
        lines += ["", f"## Proxy error in {cv['folds']}-fold cross-validation over all {cv['evaluations']} evaluated designs", "",
                  "| objective | mean relative error | Spearman |", "|---|---|---|"]
        lines += [f"| {o} | {cv[o]['mean_relative_error']:.4f} | {cv[o]['spearman']:.3f} |" for o in summary["objectives"]]
    names = [p.name for p in space.parameters]
    lines += ["", "## Pareto front (all methods)", "", "| " + " | ".join(names + summary["objectives"] + ["found by"]) + " |",
              "|" + "---|" * (len(names) + len(summary["objectives"]) + 1)]
    for r in summary["front"]:
        cells = [_fmt(r["params"][n]) for n in names] + [_fmt(r["metrics"][o]) for o in summary["objectives"]] + [", ".join(r["found_by"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "![hypervolume](hypervolume.png)", "", "![front](front.png)", ""])


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot_hv(path: Path, curves: dict, space: Space) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, c in curves.items():
        ax.plot(range(1, len(c) + 1), c, marker=".", label=name)
    ax.set_xlabel("real evaluations")
    ax.set_ylabel("hypervolume (normalised)")
    ax.set_title(f"{space.name}: hypervolume vs evaluations", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def _plot_front(path: Path, space: Space, trials: dict, constants: dict) -> None:
    """The first objective against each other one; every evaluation, feasible ones filled."""
    plt = _pyplot()
    first, others = space.objectives[0], space.objectives[1:] or space.objectives[:1]
    fig, axes = plt.subplots(1, len(others), figsize=(4.2 * len(others), 3.6), squeeze=False)
    for ax, o in zip(axes[0], others):
        for i, (name, t) in enumerate(trials.items()):
            pts = [(m[first.metric], m[o.metric], feasible(space, m, constants)) for _, m in t]
            pts = [q for q in pts if math.isfinite(q[0]) and math.isfinite(q[1])]
            ax.scatter([q[0] for q in pts if q[2]], [q[1] for q in pts if q[2]], s=14, color=f"C{i}", label=name)
            ax.scatter([q[0] for q in pts if not q[2]], [q[1] for q in pts if not q[2]], s=14, facecolors="none", edgecolors=f"C{i}")
        ax.set_xlabel(first.metric)
        ax.set_ylabel(o.metric)
        ax.set_xscale("log" if first.log else "linear")
        ax.set_yscale("log" if o.log else "linear")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{space.name}: every evaluation (hollow: violates a constraint)", fontsize=9)
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
