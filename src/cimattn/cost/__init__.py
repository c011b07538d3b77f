"""Virtual hardware model: op counts × component tables → energy, latency, area; GPU roofline; validation.

    from cimattn.cost import load_table, decode, SHAPES
    b = decode(load_table("leroux-gaincell"), SHAPES["gpt2"], context=1024)
    b.energy, b.latency, b.area, b.energy_j  # J, s, m², per component

Everything is torch float64, differentiable in the table's values (pass
`params={name: tensor}`).  `cimattn validate` checks the published figures,
`cimattn cost RUN_DIR` costs a run, `cimattn roofline` times SDPA on this machine and fits the roofline to it.
"""

from cimattn.cost.hardware import (
    Breakdown,
    GainCellDesign,
    SprintDesign,
    decode,
    prefill,
)
from cimattn.cost.mapper import Mapping, map_gaincell
from cimattn.cost.tables import Quantity, Table, list_tables, load_table
from cimattn.cost.workload import SHAPES, ModelShape, Telemetry

__all__ = [
    "SHAPES", "Breakdown", "GainCellDesign", "Mapping", "ModelShape", "Quantity", "SprintDesign", "Table", "Telemetry",
    "decode", "list_tables", "load_table", "map_gaincell", "prefill",
]
