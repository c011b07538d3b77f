"""Component tables: energy, latency and area of each hardware part, from YAML.

Every number is a `Quantity` with its SI unit and exactly one provenance:
`source` (a publication or datasheet), `fitted_to` (the published figure it
was solved from — `cimattn.cost.fit` re-derives it), or `assumed` (why this
value, where nothing is published).  Tables are validated at load: a negative
value, a missing or wrong unit, an unknown component or parameter is a
`CimattnError` naming the field.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cimattn.errors import CimattnError

_TABLES = resources.files("cimattn.cost") / "tables"
DTYPE = torch.float64  # figures span 1e-15 J to 1e15 op/s: keep gradients and fits exact


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Quantity(_Strict):
    """One number with its unit and where it comes from."""

    value: float = Field(ge=0, description="the value in `unit` (physical quantities are never negative)")
    unit: str = Field(description="SI unit, e.g. J, s, m2, Hz, B/s, FLOP/s, W, 1")
    source: str | None = None
    fitted_to: str | None = None
    assumed: str | None = None

    @model_validator(mode="after")
    def _one_provenance(self) -> Quantity:
        given = [k for k in ("source", "fitted_to", "assumed") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of source / fitted_to / assumed (got {', '.join(given) or 'none'})")
        return self

    @property
    def provenance(self) -> Literal["sourced", "fitted", "assumed"]:
        return "sourced" if self.source else "fitted" if self.fitted_to else "assumed"


class Component(_Strict):
    """A hardware part: a description and its named quantities."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    description: str = ""

    @model_validator(mode="before")
    @classmethod
    def _quantities(cls, data):
        if not isinstance(data, dict):
            raise ValueError("a component is a mapping of parameters")  # noqa: TRY004 (pydantic reports ValueError as a field error)
        out = {}
        for name, raw in data.items():
            if name == "description":
                out[name] = raw
            elif not isinstance(raw, dict):
                raise ValueError(f"parameter '{name}' must be a mapping {{value, unit, source|fitted_to|assumed}}")
            elif "unit" not in raw:
                raise ValueError(f"parameter '{name}' has no unit")
            else:
                try:
                    out[name] = Quantity.model_validate(raw)
                except ValidationError as e:
                    raise ValueError(f"parameter '{name}': {_first(e)}") from None
        return out

    def quantities(self) -> dict[str, Quantity]:
        return dict(self.model_extra or {})


# family → component → parameter → the SI unit it must carry.  These are the
# inputs each family's model in `cimattn.cost.hardware` reads.
FAMILY_COMPONENTS: dict[str, dict[str, dict[str, str]]] = {
    "gaincell": {
        "cell": {"read_energy_j": "J", "area_m2": "m2", "write_latency_s": "s"},
        "charge_to_pulse": {"energy_j": "J", "latency_s": "s"},
        "adc": {"energy_per_step_j": "J", "step_s": "s"},
        "dac": {"energy_per_level_j": "J", "step_s": "s"},
        "digital": {"energy_per_op_j": "J", "adder_stage_latency_s": "s"},
        "state_memory": {"energy_per_bit_j": "J", "bandwidth": "B/s"},
    },
    "sprint": {
        "clock": {"frequency": "Hz"},
        "reram": {"read_energy_per_bit_j": "J", "write_energy_per_bit_j": "J", "mac_energy_j": "J"},
        "scorer": {"energy_per_key_j": "J", "cycles": "cycle", "msb_bits": "bit", "query_bits": "bit"},
        "buffer": {"energy_per_byte_j": "J"},
        "compute_unit": {"mac_energy_j": "J", "macs_per_cycle": "MAC/cycle"},
        "data": {"bits": "bit"},
        "defaults": {"keep_rate": "1", "refetch_fraction": "1", "sequence_tokens": "token"},
        "chip": {"area_m2": "m2", "area_per_extra_unit_m2": "m2"},
    },
    "hyatt": {
        "clock": {"frequency": "Hz"},
        "analog": {"energy_per_op_j": "J", "ops_per_cycle": "op/cycle", "area_m2": "m2"},
        "digital": {"energy_per_op_j": "J", "ops_per_cycle": "op/cycle"},
        "chip": {"area_m2": "m2"},
        "defaults": {"keep_rate": "1"},
    },
}


class Table(_Strict):
    """A named hardware design's component table."""

    name: str
    family: Literal["gaincell", "sprint", "hyatt"]
    description: str = ""
    source: str = ""
    components: dict[str, Component]

    @model_validator(mode="after")
    def _known(self) -> Table:
        expected = FAMILY_COMPONENTS[self.family]
        for comp in self.components:
            if comp not in expected:
                raise ValueError(f"unknown component '{comp}' for family {self.family} (known: {', '.join(expected)})")
        for comp, params in expected.items():
            if comp not in self.components:
                raise ValueError(f"component '{comp}' is missing (family {self.family} needs {', '.join(expected)})")
            have = self.components[comp].quantities()
            for p, q in have.items():
                if p not in params:
                    raise ValueError(f"unknown parameter '{comp}.{p}' (known: {', '.join(params)})")
                if q.unit != params[p]:
                    raise ValueError(f"parameter '{comp}.{p}' is in '{q.unit}', expected '{params[p]}' (SI, no prefixes)")
            for p, unit in params.items():
                if p not in have:
                    raise ValueError(f"parameter '{comp}.{p}' [{unit}] is missing")
        return self

    def quantities(self) -> dict[str, Quantity]:
        """Flat view: 'component.parameter' → Quantity."""
        return {f"{c}.{p}": q for c, comp in self.components.items() for p, q in comp.quantities().items()}

    def tensors(self, requires_grad: bool = False) -> dict[str, torch.Tensor]:
        """'component.parameter' → float64 tensor, the differentiable inputs of the cost model."""
        return {k: torch.tensor(q.value, dtype=DTYPE, requires_grad=requires_grad) for k, q in self.quantities().items()}

    def with_values(self, values: dict[str, float]) -> Table:
        """A copy with some values replaced (e.g. refitted), provenance kept."""
        data = self.model_dump(mode="json", exclude_none=True)
        for key, value in values.items():
            comp, param = key.split(".", 1)
            data["components"][comp][param]["value"] = float(value)
        return Table.model_validate(data)


def list_tables() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _TABLES.iterdir() if p.name.endswith(".yaml") and p.name != "gpus.yaml")


def load_table(name_or_path: str | Path) -> Table:
    """A shipped table by name (`leroux-gaincell`, `sprint`, `hyatt`) or a YAML path, validated."""
    data, origin = _yaml(name_or_path)
    data.setdefault("name", Path(origin).stem)
    try:
        return Table.model_validate(data)
    except ValidationError as e:
        raise CimattnError(f"cost table {origin}: {_first(e)}") from None


def read_gpu_yaml(path: str | Path | None = None) -> tuple[dict, str]:
    return _yaml(path or "gpus")


def _yaml(name_or_path) -> tuple[dict, str]:
    shipped = _TABLES / f"{name_or_path}.yaml"
    if shipped.is_file():
        text, origin = shipped.read_text(), str(name_or_path)
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise CimattnError(f"unknown cost table '{name_or_path}': choose one of {', '.join(list_tables())} or give a YAML path")
        text, origin = path.read_text(), str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CimattnError(f"cost table {origin}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise CimattnError(f"cost table {origin}: expected a mapping, got {type(data).__name__}")
    return data, origin


def _first(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check its spelling)"
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"field '{loc}': {msg}{more}" if loc else f"{msg}{more}"
