"""GPU roofline baseline for attention decode, with sourced specs (`tables/gpus.yaml`).

Per generated token and layer, decode attention reads the whole KV cache once
(2 · context · kv_heads · head_dim elements) and does 4 · context · heads · head_dim
FLOPs; its time is the slower of the two at the achieved fraction of the peak
(`efficiency.bandwidth_fraction`, fitted to the RTX 4090 measured by Leroux et al.),
and its energy is that time × the dynamic power (`efficiency.power_fraction` × board
power; Leroux et al. count (P − P_static) · latency).  Batch size cancels: the KV
cache of each sequence is read for its own token.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from cimattn.cost.tables import DTYPE, Quantity, _first, read_gpu_yaml
from cimattn.cost.workload import ModelShape
from cimattn.errors import CimattnError


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class GpuSpec(_S):
    name: str
    bandwidth: Quantity
    peak_flop_per_s: Quantity
    power_w: Quantity


class Efficiency(_S):
    bandwidth_fraction: Quantity
    power_fraction: Quantity


class Measured(_S):
    latency_s: Quantity
    energy_j: Quantity


class Workload(_S):
    heads: int
    head_dim: int
    batch: int
    context: int
    bytes_per_element: Quantity
    source: str


class GpuTable(_S):
    description: str = ""
    efficiency: Efficiency
    gpus: dict[str, GpuSpec]
    leroux_workload: Workload
    leroux_measured: dict[str, Measured]


UNITS = {"bandwidth": "B/s", "peak_flop_per_s": "FLOP/s", "power_w": "W", "latency_s": "s", "energy_j": "J",
         "bandwidth_fraction": "1", "power_fraction": "1", "bytes_per_element": "B"}


@lru_cache(maxsize=4)
def load_gpus(path: str | None = None) -> GpuTable:
    data, origin = read_gpu_yaml(path)
    try:
        table = GpuTable.model_validate(data)
    except ValidationError as e:
        raise CimattnError(f"GPU table {origin}: {_first(e)}") from None
    for where, model in [("efficiency", table.efficiency), ("leroux_workload", table.leroux_workload),
                         *[(f"gpus.{k}", v) for k, v in table.gpus.items()], *[(f"leroux_measured.{k}", v) for k, v in table.leroux_measured.items()]]:
        for name, q in model:
            if isinstance(q, Quantity) and q.unit != UNITS[name]:
                raise CimattnError(f"GPU table {origin}: field '{where}.{name}' is in '{q.unit}', expected '{UNITS[name]}'")
    for k in table.leroux_measured:
        if k not in table.gpus:
            raise CimattnError(f"GPU table {origin}: measurement for unknown GPU '{k}' (known: {', '.join(table.gpus)})")
    return table


def roofline_decode(spec: GpuSpec, shape: ModelShape, context, *, bytes_per_element: float = 2.0,
                    bandwidth_fraction=None, power_fraction=None, table: GpuTable | None = None) -> dict[str, torch.Tensor]:
    """Latency [s] and energy [J] of one generated token's attention in every layer, and which roof binds."""
    table = table or load_gpus()
    bw_eff = table.efficiency.bandwidth_fraction.value if bandwidth_fraction is None else bandwidth_fraction
    p_eff = table.efficiency.power_fraction.value if power_fraction is None else power_fraction
    L = torch.as_tensor(context, dtype=DTYPE)
    bytes_ = shape.layers * (2 * L * shape.kv_heads + 2 * shape.heads) * shape.head_dim * bytes_per_element
    flops = shape.layers * 4 * L * shape.heads * shape.head_dim
    t_mem = bytes_ / (spec.bandwidth.value * bw_eff)
    t_compute = flops / (spec.peak_flop_per_s.value * bw_eff)
    latency = torch.maximum(t_mem, t_compute)
    return {"latency_s": latency, "energy_j": latency * spec.power_w.value * p_eff, "bytes": bytes_, "flops": flops,
            "memory_bound": t_mem >= t_compute}


def leroux_shape(table: GpuTable | None = None) -> ModelShape:
    w = (table or load_gpus()).leroux_workload
    return ModelShape("Leroux GPU workload (one attention layer)", 1, w.heads, w.heads, w.head_dim)


def fit_efficiency(table: GpuTable | None = None, gpu: str = "rtx-4090") -> dict[str, float]:
    """Bandwidth and power fractions that make the roofline give the measured latency and energy of `gpu`."""
    table = table or load_gpus()
    w, m, spec = table.leroux_workload, table.leroux_measured[gpu], table.gpus[gpu]
    ideal = roofline_decode(spec, leroux_shape(table), w.context, bytes_per_element=w.bytes_per_element.value,
                            bandwidth_fraction=1.0, power_fraction=1.0, table=table)
    bw = float(ideal["latency_s"]) / m.latency_s.value
    power = m.energy_j.value / m.latency_s.value / spec.power_w.value
    return {"efficiency.bandwidth_fraction": bw, "efficiency.power_fraction": power}


