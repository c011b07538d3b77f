"""A co-design space in YAML: free parameters (each a preset field), objectives with directions, constraints.

    name: gaincell
    evaluator: real                  # real | analytic (the cheap test problem with a known front)
    model: smollm2-135m
    preset: leroux-gaincell          # the fixed ("iso") part of the design
    parameters:
      - {name: window, path: gaincell.window_tokens, type: categorical, choices: [64, 128, 256]}
      - {name: tau, path: gaincell.leakage.tau_s, type: float, low: 1.0e-5, high: 1.0e-2, log: true}
    objectives:
      - {metric: ppl, direction: minimize}
    constraints:
      - ppl <= 1.5 * ppl_digital

Every point of the space is also a point of the unit cube (`to_unit` / `from_unit`): the proxy
and the random / grid baselines work there; integers and categoricals round on the way back.
Paths under `adaptation.` are the adaptation's own knobs (ADAPTATION_PARAMETERS), optimised jointly
with the hardware.

`start` says what model each point's hardware runs: `fit` (default) converts the digital model and
fits the scalers to the teacher training-free, per point; `adapted` adapts the model to the preset
once, for `adapt_steps` (the stage counts `results.json` records), and gives each point's hardware
those adapted parameters, so the perplexity measures what the point's hardware costs an adapted model.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ValidationError, model_validator

from cimattn.config import HardwareConfig, load_preset
from cimattn.config.schema import Field, Strict
from cimattn.errors import CimattnError

SPACES_DIR = Path(__file__).parent / "spaces"
# adaptation knobs a space may set beside the preset: name → (low, high, meaning)
ADAPTATION_PARAMETERS = {
    "qkv_spread": (0.01, 1.0, "std of q, k, v after the fitted scalers, as a fraction of their converter's range"),
}
REAL_METRICS = ("ppl", "energy_per_token_j", "latency_per_token_s", "area_mm2")
ANALYTIC_METRICS = ("f1", "f2", "f3")
REFERENCE_METRICS = ("ppl_digital",)  # constants of a study a constraint may scale
METRIC_FLOOR = {"ppl": 1.0}  # lower bounds every evaluation obeys (perplexity ≥ 1); other metrics are ≥ 0
_CONSTRAINT = re.compile(r"^\s*(\w+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*(?:\*\s*(\w+))?\s*$")


class Parameter(Strict):
    name: str = Field(description="short name, used in tables and plots")
    path: str = Field(description="dotted preset field (gaincell.leakage.tau_s) or adaptation.<knob>")
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = Field(False, description="search in log space (positive ranges only)")
    step: int | None = Field(None, ge=1, description="int only: values are low + k·step")
    choices: list[float | int | str | bool] | None = None

    @model_validator(mode="after")
    def _range(self) -> Parameter:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError(f"parameter '{self.name}': a categorical needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError(f"parameter '{self.name}': a categorical takes 'choices', not low/high")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"parameter '{self.name}': a {self.type} needs both 'low' and 'high'")
        if not self.high > self.low:
            raise ValueError(f"parameter '{self.name}': empty range [{self.low}, {self.high}]: 'high' must exceed 'low'")
        if self.log and self.low <= 0:
            raise ValueError(f"parameter '{self.name}': log: true needs low > 0, got {self.low}")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"parameter '{self.name}': an int range needs whole-number bounds, got [{self.low}, {self.high}]")
        if self.step is not None and self.type != "int":
            raise ValueError(f"parameter '{self.name}': 'step' applies to int parameters only")
        return self

    def from_unit(self, u: float):
        u = min(max(float(u), 0.0), 1.0)
        if self.type == "categorical":
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        lo, hi = (math.log(self.low), math.log(self.high)) if self.log else (self.low, self.high)
        x = lo + u * (hi - lo)
        x = math.exp(x) if self.log else x
        if self.type == "int":
            step = self.step or 1
            return int(min(self.low + round((x - self.low) / step) * step, self.high))
        return x

    def to_unit(self, value) -> float:
        if self.type == "categorical":
            return (self.choices.index(value) + 0.5) / len(self.choices)
        lo, hi, x = (math.log(self.low), math.log(self.high), math.log(value)) if self.log else (self.low, self.high, value)
        return (x - lo) / (hi - lo)

    def grid(self, k: int) -> list:
        """k values spread over the range (all choices of a categorical), without duplicates."""
        if self.type == "categorical":
            return list(self.choices)
        values = [self.from_unit(i / (k - 1) if k > 1 else 0.5) for i in range(k)]
        return list(dict.fromkeys(values))


class Objective(Strict):
    metric: str = Field(description="a metric the evaluator returns")
    direction: Literal["minimize", "maximize"] = "minimize"
    log: bool = Field(True, description="compare in log space (hypervolume, proxy): metrics spanning decades")
    ref: float | None = Field(None, description="hypervolume reference point in the metric's unit; null = from the study's data")


class Constraint(Strict):
    metric: str
    op: Literal["<=", ">="]
    factor: float
    reference: str | None = None  # a study constant (ppl_digital) the factor multiplies

    @classmethod
    def parse(cls, text: str) -> Constraint:
        m = _CONSTRAINT.match(text)
        if not m:
            raise ValueError(f"constraint '{text}': write 'METRIC <= NUMBER' or 'METRIC <= NUMBER * ppl_digital'")
        return cls(metric=m[1], op=m[2], factor=float(m[3]), reference=m[4])

    def bound(self, constants: dict[str, float]) -> float:
        return self.factor * (constants[self.reference] if self.reference else 1.0)

    def violation(self, metrics: dict[str, float], constants: dict[str, float]) -> float:
        """≤ 0 when satisfied (Optuna's convention); the excess in the metric's unit otherwise."""
        x, b = metrics[self.metric], self.bound(constants)
        if math.isnan(x):
            return math.inf
        return x - b if self.op == "<=" else b - x

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.factor:g}" + (f" * {self.reference}" if self.reference else "")


class Space(Strict):
    name: str
    description: str = ""
    evaluator: Literal["real", "analytic"] = "real"
    model: str = "smollm2-135m"
    preset: str = "leroux-gaincell"
    text: str | None = Field(None, description="text file for calibration and scoring; null = the bundled corpus' training works")
    context: int = Field(256, ge=8, description="perplexity window and cost-model context [tokens]")
    calib_tokens: int = Field(512, ge=16, description="tokens of calibration text the scalers are fitted on [tokens]")
    eval_tokens: int = Field(512, ge=16, description="tokens of held-out calibration text scored per evaluation [tokens]")
    start: Literal["fit", "adapted"] = Field("fit", description="fit: scalers fitted training-free per point; adapted: the model "
                                             "adapted to the preset once, its parameters given to every point")
    adapt_steps: dict[str, int] | None = Field(None, description="start: adapted: the adaptation's count per stage "
                                                "(calibration, linear_finetune, init, layerwise, finetune)")
    parameters: list[Parameter] = Field(min_length=1)
    objectives: list[Objective] = Field(min_length=1)
    constraints: list[Constraint] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _parse_constraints(cls, data):
        if isinstance(data, dict) and isinstance(data.get("constraints"), list):
            data = dict(data, constraints=[Constraint.parse(c) if isinstance(c, str) else c for c in data["constraints"]])
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Space:
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError(f"parameter names must be unique, got {names}")
        metrics = self.metrics
        for o in self.objectives:
            if o.metric not in metrics:
                raise ValueError(f"objective '{o.metric}' is not a metric of the {self.evaluator} evaluator: choose from {', '.join(metrics)}")
        for c in self.constraints:
            if c.metric not in metrics:
                raise ValueError(f"constraint '{c}': unknown metric '{c.metric}': choose from {', '.join(metrics)}")
            if c.reference is not None and c.reference not in REFERENCE_METRICS:
                raise ValueError(f"constraint '{c}': unknown reference '{c.reference}': use one of {', '.join(REFERENCE_METRICS)}")
        _check_feasible(self.constraints)
        if self.start == "adapted":
            from cimattn.adapt import STEP_COUNTS

            if self.evaluator != "real":
                raise ValueError("start: adapted needs the real evaluator")
            if not self.adapt_steps:
                raise ValueError(f"start: adapted needs adapt_steps, the count of each adaptation stage to run ({', '.join(STEP_COUNTS)})")
            unknown = sorted(set(self.adapt_steps) - set(STEP_COUNTS))
            if unknown or any(n < 0 for n in self.adapt_steps.values()):
                raise ValueError(f"adapt_steps: stages are {', '.join(STEP_COUNTS)} with counts ≥ 0, got {self.adapt_steps}")
            knobs = [p.name for p in self.parameters if p.path.startswith("adaptation.")]
            if knobs:
                raise ValueError(f"parameters {knobs} tune the training-free fit, which start: adapted does not run: drop them")
        elif self.adapt_steps is not None:
            raise ValueError("adapt_steps applies to start: adapted only")
        return self

    @property
    def metrics(self) -> tuple[str, ...]:
        return REAL_METRICS if self.evaluator == "real" else ANALYTIC_METRICS

    @property
    def dim(self) -> int:
        return len(self.parameters)

    def from_unit(self, u) -> dict:
        return {p.name: p.from_unit(x) for p, x in zip(self.parameters, u)}

    def to_unit(self, params: dict) -> list[float]:
        return [p.to_unit(params[p.name]) for p in self.parameters]

    def base(self) -> HardwareConfig:
        return load_preset(self.preset)

    def hardware(self, params: dict, base: HardwareConfig | None = None) -> HardwareConfig:
        """The preset with the point's values set; a value the schema refuses names its parameter."""
        data = (base or self.base()).model_dump(mode="json")
        for p in self.parameters:
            if not p.path.startswith("adaptation."):
                _set(data, p.path, params[p.name])
        try:
            return HardwareConfig.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise CimattnError(f"space '{self.name}': point {params} gives an invalid preset: field '{loc}': {err['msg']}") from None

    def adaptation(self, params: dict) -> dict:
        return {p.path.removeprefix("adaptation."): params[p.name] for p in self.parameters if p.path.startswith("adaptation.")}

    def check_paths(self) -> None:
        """Every path names a field of the preset, and each range's ends are values the schema accepts."""
        base = self.base()
        data = base.model_dump(mode="json")
        for p in self.parameters:
            if p.path.startswith("adaptation."):
                knob = p.path.removeprefix("adaptation.")
                if knob not in ADAPTATION_PARAMETERS:
                    raise CimattnError(f"space '{self.name}': parameter '{p.name}': unknown adaptation knob '{knob}': "
                                       f"choose from {', '.join(ADAPTATION_PARAMETERS)}")
                lo, hi, _ = ADAPTATION_PARAMETERS[knob]
                for v in p.choices or (p.low, p.high):
                    if not lo <= v <= hi:
                        raise CimattnError(f"space '{self.name}': parameter '{p.name}': {v} is outside {knob}'s range [{lo}, {hi}]")
                continue
            _get(data, p.path, self.name, p.name)
            ends = p.choices if p.type == "categorical" else [p.from_unit(0.0), p.from_unit(1.0)]
            for v in ends:
                self.hardware({q.name: (v if q is p else _get(data, q.path, self.name, q.name)) for q in self.parameters
                               if not q.path.startswith("adaptation.")} | self.adaptation_defaults(), base)

    def adaptation_defaults(self) -> dict:
        return {p.name: p.from_unit(0.5) for p in self.parameters if p.path.startswith("adaptation.")}


def _get(data: dict, path: str, space: str, name: str):
    node = data
    for i, key in enumerate(path.split(".")):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(path.split(".")[:i]) or "the preset"
            options = ", ".join(node) if isinstance(node, dict) else "(not a section)"
            raise CimattnError(f"space '{space}': parameter '{name}': unknown path '{path}': {where} has no '{key}' (it has: {options})")
        node = node[key]
    if isinstance(node, dict):
        raise CimattnError(f"space '{space}': parameter '{name}': '{path}' is a section, not a field: name one of its fields")
    return node


def _set(data: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[leaf] = value


def _check_feasible(constraints: list[Constraint]) -> None:
    """Refuse constraints that no evaluation can meet: below a metric's floor, or a min above a max."""
    for c in constraints:
        floor = 0.0 if c.reference else METRIC_FLOOR.get(c.metric, 0.0)  # a reference is positive: only its sign is known
        if c.op == "<=" and (c.factor < floor or (c.factor <= 0 and c.reference)):
            raise ValueError(f"constraint '{c}' is infeasible: {c.metric} is never below {floor:g}")
    for a in constraints:
        for b in constraints:
            if a.op == "<=" and b.op == ">=" and a.metric == b.metric and a.reference == b.reference and b.factor > a.factor:
                raise ValueError(f"constraints '{a}' and '{b}' are infeasible together: raise the first or lower the second")


def load_space(source: str | Path) -> Space:
    """A space from a YAML path, or a shipped space by name (`cimattn/codesign/spaces/NAME.yaml`)."""
    path = Path(source)
    if not path.is_file() and (SPACES_DIR / f"{source}.yaml").is_file():
        path = SPACES_DIR / f"{source}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
        raise CimattnError(f"space file not found: {source} (shipped spaces: {shipped})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CimattnError(f"space {path}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise CimattnError(f"space {path}: expected a mapping (name, parameters, objectives, …), got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return parse_space(data, str(path))


def parse_space(data: dict, origin: str = "space") -> Space:
    try:
        space = Space.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise CimattnError(f"space {origin}: {('field ' + repr(loc) + ': ') if loc else ''}{msg}") from None
    if space.evaluator == "real":
        space.check_paths()
    return space
