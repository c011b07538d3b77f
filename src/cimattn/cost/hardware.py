"""Energy, latency and area of attention on each hardware family, from op counts × component tables.

All arithmetic is torch float64 on the table's tensors (`Table.tensors()`), so every
result is differentiable in the continuous hardware parameters.  Counts are per
query (one generated token in one query head of one layer) over `keys` cached
tokens; `decode` and `prefill` sum them over heads, layers and positions.

How results add up (`Breakdown`): energies of components add; latency is the sum
of the phases on the critical path (what overlaps is named in `pipelined`); areas add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cimattn.config.schema import MARGIN_RULES
from cimattn.cost.mapper import Mapping, map_gaincell
from cimattn.cost.tables import DTYPE, Table
from cimattn.cost.workload import ModelShape, Telemetry
from cimattn.errors import CimattnError

UNQUANTISED_LEVELS = 256  # a converter with `levels: null` is costed as 8-bit


@dataclass
class Breakdown:
    """Per-component energy [J], critical-path phases [s], area [m²] of one workload."""

    energy_j: dict[str, torch.Tensor]
    latency_s: dict[str, torch.Tensor]
    area_m2: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    pipelined: str = ""
    notes: list[str] = field(default_factory=list)
    mapping: Mapping | None = None

    @property
    def energy(self) -> torch.Tensor:
        return sum(self.energy_j.values())

    @property
    def latency(self) -> torch.Tensor:
        return sum(self.latency_s.values())

    @property
    def area(self) -> torch.Tensor:
        return sum(self.area_m2.values())


@dataclass(frozen=True)
class GainCellDesign:
    """The gain-cell design choices the cost depends on (from a preset's `gaincell` section)."""

    window_tokens: int = 1024
    tokens_per_array: int = 64
    head_dim_per_array: int = 64
    q_levels: int = 16
    k_levels: int = 8
    v_levels: int = 8
    av_levels: int = 32
    normalize: bool = False  # the ΣA column (ours): one more V column read and converted per tile, d divisions
    context_offset: bool = False  # offset_per_doubling (ours): the HardSigmoid reference set per query from the occupancy

    @classmethod
    def from_preset(cls, gaincell) -> GainCellDesign:
        lv = lambda qz: qz.levels or UNQUANTISED_LEVELS
        return cls(gaincell.window_tokens, gaincell.tokens_per_array, gaincell.head_dim_per_array,
                   lv(gaincell.q), lv(gaincell.k), lv(gaincell.v), lv(gaincell.av_out),
                   gaincell.normalize, bool(gaincell.offset_per_doubling))


def _t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=DTYPE)


# ------------------------------------------------------------------ gain cell (Leroux et al.)
def gaincell_query(p: dict, design: GainCellDesign, head_dim: int, keys) -> tuple[dict, dict, dict]:
    """One query head reading its window: (counts, energy per component [J], latency phases [s]).

    keys: tokens stored in the window (≤ window_tokens; a tensor for prefill sums).
    Empty columns are not read (gated); every tile holding a token is read and converted.
    Each K array has its own row DACs (arrays fire in parallel), so q is converted per tile.
    The ΣA column (`normalize`) is read and converted with the V columns, its tile read-outs are
    summed with theirs and the d outputs divided by it: one more adder-tree clock.  The
    context-dependent offset (`context_offset`) is a lookup of β·log2(n / reference) by the window's
    occupancy and one add to the charge-to-pulse reference word, per query.
    """
    n = torch.clamp(_t(keys), max=design.window_tokens)
    tiles = torch.ceil(n / design.tokens_per_array)
    d = head_dim
    v_columns = d + 1 if design.normalize else d
    c = {
        "qk_cell_reads": n * d,
        "av_cell_reads": n * v_columns,
        "charge_to_pulse": n,  # one per stored token: the HardSigmoid read-out of its score
        "adc_conversions": tiles * v_columns,  # each A·V tile's outputs
        "q_dac_conversions": tiles * d,
        # q routed to every tile, tile sums accumulated (with the ΣA column's), output scaler (and the divisions)
        "digital_ops": 2 * tiles * d + d + (tiles + d if design.normalize else 0) + (2 if design.context_offset else 0),
    }
    e = {
        "Q·Kᵀ array + charge-to-pulse": c["qk_cell_reads"] * p["cell.read_energy_j"] + c["charge_to_pulse"] * p["charge_to_pulse.energy_j"],
        "A·V array + ADC": c["av_cell_reads"] * p["cell.read_energy_j"] + c["adc_conversions"] * p["adc.energy_per_step_j"] * design.av_levels,
        "DACs": c["q_dac_conversions"] * p["dac.energy_per_level_j"] * design.q_levels,
        "digital and routing": c["digital_ops"] * p["digital.energy_per_op_j"],
    }
    adder_stages = torch.ceil(torch.log2(torch.clamp(tiles, min=1)))
    lat = {
        "query pulse (DAC)": (design.q_levels - 1) * p["dac.step_s"],
        "activation pulse (charge-to-pulse, drives A·V)": p["charge_to_pulse.latency_s"],
        "A·V ADC (single-slope)": (design.av_levels - 1) * p["adc.step_s"],
        "digital tile sum": (adder_stages + (1 if design.normalize else 0)) * p["digital.adder_stage_latency_s"],
    }
    return c, e, lat


def gaincell_write(p: dict, design: GainCellDesign, head_dim: int) -> tuple[dict, dict]:
    """Writing one token's k and v into one KV head's arrays (write DACs at the K / V levels)."""
    c = {"write_dac_conversions": torch.tensor(2.0 * head_dim, dtype=DTYPE), "write_digital_ops": torch.tensor(2.0 * head_dim, dtype=DTYPE)}
    e = {
        "DACs": head_dim * p["dac.energy_per_level_j"] * (design.k_levels + design.v_levels),
        "digital and routing": c["write_digital_ops"] * p["digital.energy_per_op_j"],
    }
    return c, e


def gaincell_decode(p: dict, design: GainCellDesign, shape: ModelShape, context, mapping: Mapping,
                    telemetry: Telemetry | None = None) -> Breakdown:
    """One generated token through every layer's attention, at `context` cached tokens."""
    keys = torch.clamp(_t(context), max=design.window_tokens)
    if telemetry is not None and telemetry.window_occupancy is not None:
        keys = telemetry.window_occupancy * design.window_tokens
    qc, qe, qlat = gaincell_query(p, design, shape.head_dim, keys)
    wc, we = gaincell_write(p, design, shape.head_dim)
    reads = shape.layers * shape.heads
    writes = shape.layers * shape.kv_heads * mapping.copies
    energy = {k: v * reads for k, v in qe.items()}
    for k, v in we.items():
        energy[k] = energy[k] + v * writes
    counts = {k: v * reads for k, v in qc.items()} | {k: v * writes for k, v in wc.items()}
    per_layer = {"k, v write": p["cell.write_latency_s"]} | {k: v * mapping.sequential_reads for k, v in qlat.items()}
    latency = {k: v * shape.layers for k, v in per_layer.items()}
    notes = [mapping.summary()]
    if not mapping.spatial:
        # every layer's stored K/V leaves and re-enters the arrays once per token
        bits = shape.layers * shape.kv_heads * mapping.copies * 2 * keys * shape.head_dim * math.log2(design.k_levels)
        energy["state reload"] = bits * (p["state_memory.energy_per_bit_j"]) + (
            shape.layers * shape.kv_heads * mapping.copies * keys * shape.head_dim
            * p["dac.energy_per_level_j"] * (design.k_levels + design.v_levels))
        latency["state reload"] = (bits / 8) / p["state_memory.bandwidth"] + mapping.passes * design.tokens_per_array * p["cell.write_latency_s"]
        counts["state_reload_bits"] = bits
    cells = mapping.arrays_used * design.tokens_per_array * design.head_dim_per_array
    if design.normalize:  # one ΣA column beside each V tile of every (layer, KV head, copy) the arrays hold
        cells = cells + mapping.arrays_used // (2 * mapping.slices) * design.tokens_per_array
    return Breakdown(
        energy, latency, {"gain-cell arrays (incl. periphery and digital)": cells * p["cell.area_m2"]}, counts,
        pipelined="all heads' and tiles' arrays fire in parallel; layers run one after another (each needs the previous "
        "layer's output); the phases within a layer are sequential. Projections and MLP (digital, off-array) are not costed.",
        notes=notes, mapping=mapping,
    )


# ------------------------------------------------------------------ SPRINT (ReRAM pruning + digital recompute)
@dataclass(frozen=True)
class SprintDesign:
    buffer_bytes: int = 16 * 1024
    compute_units: int = 1


# the margin rules' cost (ours, assumed): a second read of the scoring array, to compare against the row's reference
# (its maximum, or its log-sum-exp accumulated during the first read: a lookup and an add per key, costed as one digital MAC)
MAX_TRACKING = "max tracking (second scoring read)"
LOG_SUM_EXP = "log-sum-exp of the scores (digital, per key)"

# SPRINT energy terms paid once per KV head (K/V fetched into the shared buffer), not per query head
SPRINT_PER_KV_HEAD = ("K/V fetch (ReRAM read)", "buffer writes (fetched K/V)")


def sprint_query(p: dict, keys, head_dim: int, keep, refetch, design: SprintDesign = SprintDesign()) -> tuple[dict, dict, torch.Tensor]:
    """SPRINT on one query over `keys` cached keys: (counts, energy per component [J], cycles)."""
    L, d = _t(keys), head_dim
    bytes_per_key = 2 * d * p["data.bits"] / 8  # its K and V at full precision
    kept = keep * L
    # kept keys beyond the buffer's capacity cannot stay on chip: fetched again every query
    overflow = torch.relu(kept * bytes_per_key - design.buffer_bytes) / bytes_per_key
    fetched = (refetch * L + overflow) * bytes_per_key
    c = {"reram_macs": L * d, "comparisons": L, "fetched_bytes": fetched, "buffer_read_bytes": kept * bytes_per_key,
         "digital_macs": 2 * kept * d}
    e = {
        "CopyQ (ReRAM write)": d * p["scorer.query_bits"] * p["reram.write_energy_per_bit_j"] * torch.ones_like(L),
        "in-ReRAM scoring": c["reram_macs"] * p["reram.mac_energy_j"] + L * p["scorer.energy_per_key_j"],
        "ReadP (keep vector, ReRAM read)": L * p["reram.read_energy_per_bit_j"],
        "K/V fetch (ReRAM read)": 8 * fetched * p["reram.read_energy_per_bit_j"],
        "buffer writes (fetched K/V)": fetched * p["buffer.energy_per_byte_j"],
        "buffer reads (kept K/V)": c["buffer_read_bytes"] * p["buffer.energy_per_byte_j"],
        "digital recompute": c["digital_macs"] * p["compute_unit.mac_energy_j"],
    }
    cycles = p["scorer.cycles"] + c["digital_macs"] / (p["compute_unit.macs_per_cycle"] * design.compute_units)
    return c, e, cycles


def sprint_baseline_query(p: dict, keys, head_dim: int, design: SprintDesign = SprintDesign()) -> tuple[dict, dict, torch.Tensor]:
    """The iso-buffer baseline accelerator: fetch every key's K/V from ReRAM, compute all scores digitally."""
    L, d = _t(keys), head_dim
    fetched = L * 2 * d * p["data.bits"] / 8
    c = {"fetched_bytes": fetched, "buffer_bytes": 2 * fetched, "digital_macs": 2 * L * d}
    e = {
        "K/V fetch (ReRAM read)": 8 * fetched * p["reram.read_energy_per_bit_j"],
        "on-chip buffer": c["buffer_bytes"] * p["buffer.energy_per_byte_j"],
        "digital compute": c["digital_macs"] * p["compute_unit.mac_energy_j"],
    }
    return c, e, c["digital_macs"] / (p["compute_unit.macs_per_cycle"] * design.compute_units)


# ------------------------------------------------------------------ HyAtt (charge-CIM scoring + digital recompute)
def hyatt_query(p: dict, keys, head_dim: int, keep) -> tuple[dict, dict, dict]:
    """HyAtt on one query: analog scores every key, the digital core recomputes the kept ones (QK and AV).

    Ops count 2 per MAC (assumed; the paper's convention is not stated).
    """
    L = _t(keys)
    c = {"analog_ops": 2 * L * head_dim, "digital_ops": 2 * 2 * keep * L * head_dim}
    e = {"analog CIM scoring": c["analog_ops"] * p["analog.energy_per_op_j"],
         "digital recompute": c["digital_ops"] * p["digital.energy_per_op_j"]}
    f = p["clock.frequency"]
    t = {"analog": c["analog_ops"] / (p["analog.ops_per_cycle"] * f), "digital": c["digital_ops"] / (p["digital.ops_per_cycle"] * f)}
    return c, e, t


def hyatt_soc(p: dict, keep) -> dict[str, torch.Tensor]:
    """Peak efficiencies of the analog core and of the whole chip, in counted ops (analog + digital) — HyAtt's figures."""
    c, e, t = hyatt_query(p, 1.0, 1, keep)
    ops = c["analog_ops"] + c["digital_ops"]
    rate = ops / torch.maximum(t["analog"], t["digital"])  # the two cores pipeline over queries
    return {
        "analog_tops_per_w": 1 / p["analog.energy_per_op_j"] / 1e12,
        "soc_tops_per_w": ops / (e["analog CIM scoring"] + e["digital recompute"]) / 1e12,
        "analog_gops_per_mm2": p["analog.ops_per_cycle"] * p["clock.frequency"] / (p["analog.area_m2"] * 1e6) / 1e9,
        "soc_gops_per_mm2": rate / (p["chip.area_m2"] * 1e6) / 1e9,
    }


# ------------------------------------------------------------------ whole model
def _pick(name: str, telemetry_value, preset_value, table_value) -> tuple[object, str]:
    for value, origin in ((telemetry_value, "telemetry"), (preset_value, "preset"), (table_value, "table default")):
        if value is not None:
            return value, f"{name} {float(value):.3g} ({origin})"
    raise AssertionError("the table always has a default")


def _prune_decode(table: Table, p: dict, shape: ModelShape, context, telemetry: Telemetry, hardware=None) -> Breakdown:
    """SPRINT or HyAtt on every query head of every layer.  Precedence of each workload input:
    the run's telemetry, then the preset's setting (its keep-rate target, buffer, bit widths), then the table."""
    pr = getattr(hardware, "prune_recompute", None) if hardware is not None else None
    keep, keep_note = _pick("keep rate", telemetry.keep_rate, pr.selection.keep_rate if pr else None, p["defaults.keep_rate"])
    queries = shape.layers * shape.heads
    notes = [keep_note]
    margin = pr is not None and pr.selection.rule in MARGIN_RULES
    if margin:
        notes.append(f"{pr.selection.rule} rule: the scores are read twice, once to track the row's reference (maximum or "
                     "log-sum-exp) and once to compare against it (assumed: no published circuit)")
    if table.family == "sprint":
        design = SprintDesign()
        if pr is not None:
            # the paper pairs 16 / 32 / 64 KB buffers with 1 / 2 / 4 compute units
            design = SprintDesign(int(pr.buffer.size_kb * 1024), max(1, math.ceil(pr.buffer.size_kb / 16)))
            p = p | {"data.bits": torch.tensor(8.0 * pr.buffer.bytes_per_element, dtype=DTYPE)}
            if pr.scorer.query_bits is not None:
                p = p | {"scorer.query_bits": torch.tensor(float(pr.scorer.query_bits), dtype=DTYPE)}
        preset_refetch = keep if pr is not None and not pr.buffer.reuse else None  # no reuse: every kept key is fetched anew
        refetch, refetch_note = _pick("refetch fraction", telemetry.refetch_fraction, preset_refetch, p["defaults.refetch_fraction"])
        notes += [refetch_note, f"{design.buffer_bytes // 1024} KB buffer, {design.compute_units} compute unit(s)"]
        c, e, cycles = sprint_query(p, context, shape.head_dim, keep, refetch, design)
        kv_heads = shape.layers * shape.kv_heads
        c = {k: v * (kv_heads if k == "fetched_bytes" else queries) for k, v in c.items()}
        e = {k: v * (kv_heads if k in SPRINT_PER_KV_HEAD else queries) for k, v in e.items()}
        if telemetry.fetched_bytes_per_query is not None:  # measured: per token, summed over layers and KV heads
            c["fetched_bytes"] = _t(telemetry.fetched_bytes_per_query) * torch.ones_like(_t(context))
            e["K/V fetch (ReRAM read)"] = 8 * c["fetched_bytes"] * p["reram.read_energy_per_bit_j"]
            e["buffer writes (fetched K/V)"] = c["fetched_bytes"] * p["buffer.energy_per_byte_j"]
            notes.append(f"fetched bytes per token {telemetry.fetched_bytes_per_query:.4g} (telemetry)")
        latency = {"in-ReRAM scoring": queries * p["scorer.cycles"] / p["clock.frequency"],
                   "digital recompute": queries * (cycles - p["scorer.cycles"]) / p["clock.frequency"]}
        pipelined = ("fetches of kept keys are prefetched and overlap compute (SPRINT's prefetch); queries of all heads "
                     "and layers run one after another on the compute units")
        area = {f"chip ({design.buffer_bytes // 1024} KB buffer)": p["chip.area_m2"] + (design.compute_units - 1) * p["chip.area_per_extra_unit_m2"]}
        if margin:
            e[MAX_TRACKING] = e["in-ReRAM scoring"]
            latency[MAX_TRACKING] = latency["in-ReRAM scoring"]
        if pr is not None and pr.selection.rule == "probability":  # one digital MAC's energy per key
            e[LOG_SUM_EXP] = queries * _t(context) * p["compute_unit.mac_energy_j"]
    else:
        c, e, t = hyatt_query(p, context, shape.head_dim, keep)
        c, e = ({k: v * queries for k, v in d.items()} for d in (c, e))
        if margin:
            e[MAX_TRACKING] = e["analog CIM scoring"]
            t = t | {"analog": 2 * t["analog"]}
        if pr is not None and pr.selection.rule == "probability":  # 2 ops per key (lookup, add) on the digital core
            e[LOG_SUM_EXP] = queries * 2 * _t(context) * p["digital.energy_per_op_j"]
        latency = {"max(analog scoring, digital recompute)": queries * torch.maximum(t["analog"], t["digital"])}
        pipelined = "analog scoring of the next query overlaps the digital recompute of this one; heads and layers one after another"
        area = {"chip (die)": p["chip.area_m2"]}
    return Breakdown(e, latency, area, c, pipelined=pipelined, notes=notes)


def decode(table: Table, shape: ModelShape, context: int | torch.Tensor, *, hardware=None, telemetry: Telemetry | dict | None = None,
           arrays_available: int | None = None, gqa: str = "share", params: dict | None = None) -> Breakdown:
    """Cost of generating one token (every layer's attention) with `context` tokens cached.

    `params` (name → tensor) overrides the table's values, e.g. tensors with requires_grad.
    """
    if (torch.as_tensor(context) < 1).any():
        raise CimattnError(f"context must be ≥ 1 token, got {context}")
    telemetry = telemetry if isinstance(telemetry, Telemetry) else Telemetry.from_dict(telemetry)
    p = table.tensors() | (params or {})
    if table.family == "gaincell":
        design = GainCellDesign.from_preset(hardware.gaincell) if hardware is not None and hardware.gaincell else GainCellDesign()
        mapping = map_gaincell(shape, window_tokens=design.window_tokens, tokens_per_array=design.tokens_per_array,
                               head_dim_per_array=design.head_dim_per_array, arrays_available=arrays_available, gqa=gqa)
        return gaincell_decode(p, design, shape, context, mapping, telemetry)
    return _prune_decode(table, p, shape, context, telemetry, hardware)


def prefill(table: Table, shape: ModelShape, prompt: int, **kwargs) -> Breakdown:
    """Cost of a `prompt`-token prefill: each position's query over its causal keys, summed.

    Latency: layers pipeline over tokens (layer l takes token t while layer l+1 takes t−1),
    so the prompt takes (prompt + layers − 1) per-layer steps at the longest context.
    """
    if prompt < 1:
        raise CimattnError(f"prompt must be ≥ 1 token, got {prompt}")
    steps = decode(table, shape, torch.arange(1, prompt + 1, dtype=DTYPE), **kwargs)
    per_layer = sum(_last(v) for v in steps.latency_s.values()) / shape.layers
    return Breakdown(
        {k: v.sum() for k, v in steps.energy_j.items()}, {"pipelined layers × tokens": per_layer * (prompt + shape.layers - 1)},
        steps.area_m2, {k: v.sum() for k, v in steps.counts.items()},
        pipelined="layers pipeline over prompt tokens: (prompt + layers − 1) per-layer steps at the longest context",
        notes=steps.notes, mapping=steps.mapping,
    )


def _last(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1)[-1]
