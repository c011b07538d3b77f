"""The `cost` stage: a run's model, preset and context → energy, latency, area and GPU ratios, plus plots.

Writes into results.json `metrics`: `energy_per_token_j`, `latency_per_token_s`,
`area_mm2`, `gpu` (per GPU: latency and energy per token and the ratios), and a
`cost` record with the breakdown, the mapping and what was assumed.  All numbers
are per generated token (decode) through every layer's attention, at the run's
context; projections and MLP are digital and not costed (on neither side).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cimattn.config import HardwareConfig
from cimattn.cost import hardware as hw
from cimattn.cost.gpu import load_gpus, roofline_decode
from cimattn.cost.tables import Table, load_table
from cimattn.cost.workload import SHAPES, ModelShape
from cimattn.errors import CimattnError
from cimattn.storage import atomic_write_json, cache_dir, read_json, save_figure

FAMILY_TABLE = {"gaincell": "leroux-gaincell"}
SCORER_TABLE = {"reram": "sprint", "charge": "hyatt"}  # prune_recompute: the analog scorer names the chip
PLOT_CONTEXTS = [2**k for k in range(7, 18)]  # 128 … 131,072 tokens
PLOT_SHAPES = ("gpt2", "gpt2-xl", "llama-3-8b")


def table_for(hardware: HardwareConfig, table: str | None = None) -> Table | None:
    """The cost table: the one given, else by the hardware — gain cells → leroux-gaincell, a ReRAM scorer →
    sprint, a charge scorer → hyatt; None for digital attention and the digital scorer baselines (GPU roofline only)."""
    if table:
        return load_table(table)
    if hardware.attention == "prune_recompute":
        name = SCORER_TABLE.get(hardware.prune_recompute.scorer.kind)
    else:
        name = FAMILY_TABLE.get(hardware.attention)
    return load_table(name) if name else None


def cost_metrics(shape: ModelShape, hardware: HardwareConfig, context: int, *, telemetry: dict | None = None,
                 table: str | None = None, arrays_available: int | None = None) -> dict:
    tab = table_for(hardware, table)
    gpus = load_gpus()
    out: dict = {"gpu": {}}
    record = {"shape": shape.__dict__, "context": context, "table": tab.name if tab else None, "gpu_roofline": (
        f"bandwidth fraction {gpus.efficiency.bandwidth_fraction.value:.3g} and dynamic-power fraction "
        f"{gpus.efficiency.power_fraction.value:.3g}, fitted to the RTX 4090 of Leroux et al.; fp16 K/V; batched decoding, "
        "so kernel-launch overhead is amortised as in their batch-64 measurement")}
    if tab is not None:
        b = hw.decode(tab, shape, context, hardware=hardware, telemetry=telemetry, arrays_available=arrays_available)
        out |= {"energy_per_token_j": float(b.energy), "latency_per_token_s": float(b.latency), "area_mm2": float(b.area) * 1e6}
        record |= {"energy_j": {k: float(v) for k, v in b.energy_j.items()}, "latency_s": {k: float(v) for k, v in b.latency_s.items()},
                   "area_m2": {k: float(v) for k, v in b.area_m2.items()}, "pipelined": b.pipelined, "notes": b.notes}
        pre = hw.prefill(tab, shape, context, hardware=hardware, telemetry=telemetry, arrays_available=arrays_available)
        record["prefill"] = {"prompt_tokens": context, "energy_j": float(pre.energy), "latency_s": float(pre.latency),
                             "latency_rule": pre.pipelined}
        if b.mapping is not None:
            m = b.mapping
            record["mapping"] = {"arrays_needed": m.arrays_needed, "arrays_used": m.arrays_used, "passes": m.passes,
                                 "layers_per_pass": m.layers_per_pass, "gqa": m.gqa, "summary": m.summary()}
    for key, spec in gpus.gpus.items():
        r = roofline_decode(spec, shape, context, table=gpus)
        entry = {"name": spec.name, "latency_per_token_s": float(r["latency_s"]), "energy_per_token_j": float(r["energy_j"]),
                 "memory_bound": bool(r["memory_bound"])}
        if tab is not None:
            entry |= {"latency_ratio": entry["latency_per_token_s"] / out["latency_per_token_s"],
                      "energy_ratio": entry["energy_per_token_j"] / out["energy_per_token_j"]}
        out["gpu"][key] = entry
    out["cost"] = record
    return out


def shape_of(model_name: str, config=None) -> ModelShape:
    """The attention shape of a run's model: from its config when given, else by name (tiny, bundled, local, hub cache)."""
    if config is not None:
        return ModelShape.from_config(config, model_name)
    from cimattn.models.loading import DEFAULT_MODEL, RANDOM_MODELS

    if model_name in RANDOM_MODELS:
        return ModelShape.from_config(RANDOM_MODELS[model_name](), model_name)
    if model_name == DEFAULT_MODEL:
        local = cache_dir("models") / DEFAULT_MODEL
        return _from_dir(local, model_name) if (local / "config.json").is_file() else SHAPES[DEFAULT_MODEL]
    if Path(model_name).is_dir():
        return _from_dir(Path(model_name), model_name)
    try:
        from transformers import AutoConfig

        return ModelShape.from_config(AutoConfig.from_pretrained(model_name), model_name)
    except (OSError, ValueError):
        raise CimattnError(f"cannot read the shape of model '{model_name}': give a local directory or a cached hub id") from None


def _from_dir(path: Path, name: str) -> ModelShape:
    from transformers import AutoConfig

    return ModelShape.from_config(AutoConfig.from_pretrained(path), name)


def cost_run(run_dir: Path, *, table: str | None = None, arrays_available: int | None = None) -> dict:
    """`cimattn cost RUN_DIR`: cost the run's model, preset and context; update results.json and write the plots."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise CimattnError(f"{run_dir}: no results.json; give a directory written by `cimattn run` or `cimattn eval`")
    results = read_json(path)
    try:
        hardware = HardwareConfig.model_validate(results["config"]["hardware"])
        context = int(results["config"]["run"]["context"])
    except (KeyError, ValueError, TypeError) as e:
        raise CimattnError(f"{path}: no usable config.hardware / config.run.context ({e}); rerun `cimattn run`") from None
    shape = shape_of(results["model"])
    apply(results, shape, hardware, context, Path(run_dir), table=table, arrays_available=arrays_available)
    atomic_write_json(path, results)
    return results


def apply(results: dict, shape: ModelShape, hardware: HardwareConfig, context: int, out: Path, **kwargs) -> None:
    """Put the cost metrics into `results` and write the breakdown and context plots beside it."""
    telemetry = dict(results.get("telemetry") or {})
    if "keep_rate" in results.get("metrics", {}):
        telemetry.setdefault("keep_rate", results["metrics"]["keep_rate"])
    metrics = cost_metrics(shape, hardware, context, telemetry=telemetry, **kwargs)
    results.setdefault("metrics", {}).update({k: v for k, v in metrics.items() if k != "cost"})
    results["cost"] = metrics["cost"]
    results["cost"]["plots"] = [p.name for p in (plot_breakdown(out, results), plot_context(out, shape, hardware, kwargs.get("table"))) if p]


def plot_breakdown(out: Path, results: dict) -> Path | None:
    cost = results.get("cost", {})
    if not cost.get("energy_j"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key, unit, scale in ((a, "energy_j", "nJ per token", 1e9), (b, "latency_s", "ns per token", 1e9)):
        items = sorted(cost[key].items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v * scale for _, v in items], color="tab:green" if key == "energy_j" else "tab:orange")
        ax.set_xlabel(unit)
    a.set_title(f"energy by component · {cost.get('table')}")
    b.set_title("latency: critical-path phases")
    gpu = results["metrics"].get("gpu", {})
    if gpu:
        text = "GPU ÷ this hardware — " + "  ".join(
            f"{v['name'].removeprefix('NVIDIA ')}: latency ×{v['latency_ratio']:.3g}, energy ×{v['energy_ratio']:.3g}"
            for v in gpu.values() if "latency_ratio" in v)
        fig.text(0.01, 0.005, text, fontsize=6.5)
    return save_figure(fig, out / "cost_breakdown.png")


def context_curves(shape: ModelShape, hardware: HardwareConfig, table: str | None = None) -> dict[str, list[float]]:
    tab = table_for(hardware, table)
    gpus = load_gpus()
    curves = {}
    if tab is not None:
        e, t = [], []
        for n in PLOT_CONTEXTS:
            b = hw.decode(tab, shape, n, hardware=hardware)
            e.append(float(b.energy))
            t.append(float(b.latency))
        curves["energy_j"], curves["latency_s"] = e, t
    r = roofline_decode(gpus.gpus["h100-sxm"], shape, torch.tensor(PLOT_CONTEXTS, dtype=torch.float64), table=gpus)
    curves["h100_energy_j"], curves["h100_latency_s"] = r["energy_j"].tolist(), r["latency_s"].tolist()
    return curves


def plot_context(out: Path, shape: ModelShape, hardware: HardwareConfig, table: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    shapes = [shape] + [SHAPES[k] for k in PLOT_SHAPES if SHAPES[k].name != shape.name]
    for i, s in enumerate(shapes):
        c = context_curves(s, hardware, table)
        color = f"C{i}"
        for ax, key in zip(axes, ("energy_j", "latency_s")):
            if key in c:
                ax.plot(PLOT_CONTEXTS, c[key], color=color, marker=".", label=f"{s.name} · {hardware.name}")
            ax.plot(PLOT_CONTEXTS, c["h100_" + key], color=color, ls="--", label=f"{s.name} · H100 roofline")
    for ax, label in zip(axes, ("attention energy per token [J]", "attention latency per token [s]")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context [tokens]")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=6)
    fig.suptitle("cost per generated token vs context (gain-cell windows cap the keys read)", fontsize=9)
    return save_figure(fig, out / "cost_context.png")


def report_lines(results: dict) -> list[str]:
    """The report's cost section (markdown), or nothing when the run has no cost yet."""
    m, cost = results.get("metrics", {}), results.get("cost")
    if not cost:
        return []
    shape = cost["shape"]
    intro = (f"Per generated token through every layer's attention at {cost['context']} tokens of context; model shape "
             f"{shape['layers']} layers × {shape['heads']} heads ({shape['kv_heads']} KV) × {shape['head_dim']}; "
             f"table `{cost['table']}`. Projections and MLP are not costed.")
    lines = ["## Cost (virtual hardware model)", "", intro, ""]
    if "energy_per_token_j" in m:
        lines += [f"- energy {m['energy_per_token_j']:.4g} J · latency {m['latency_per_token_s']:.4g} s · area {m['area_mm2']:.4g} mm²",
                  f"- pipelined: {cost.get('pipelined', '')}", *[f"- {n}" for n in cost.get("notes", [])]]
        if "prefill" in cost:
            pre = cost["prefill"]
            lines.append(f"- prefill of a {pre['prompt_tokens']}-token prompt: energy {pre['energy_j']:.4g} J, latency {pre['latency_s']:.4g} s "
                         f"({pre['latency_rule']})")
        lines.append("")
        lines += ["| component | energy per token [J] |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in cost["energy_j"].items()]
        lines += ["", "| critical-path phase | latency per token [s] |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in cost["latency_s"].items()]
    lines += ["", f"GPU roofline ({cost['gpu_roofline']}):", "",
              "| GPU | latency per token [s] | energy per token [J] | × latency | × energy |", "|---|---|---|---|---|"]
    for g in m.get("gpu", {}).values():
        ratios = f"{g['latency_ratio']:.4g} | {g['energy_ratio']:.4g}" if "latency_ratio" in g else "– | –"
        lines.append(f"| {g['name']} | {g['latency_per_token_s']:.4g} | {g['energy_per_token_j']:.4g} | {ratios} |")
    lines += ["", *[f"![{Path(p).stem}]({p})" for p in cost.get("plots", [])], ""]
    return lines
