"""Evaluators: a point of the space → its metrics.

`AnalyticEvaluator` is a test problem with a known Pareto front: ZDT1's shape (Zitzler, Deb &
Thiele, Evol. Comput. 2000), f1 = u₀, f2 = g·(1 − √(f1/g)), with a gentler distance function
g = 1 + mean(u₁…)² (ZDT1's 1 + 9·mean(u₁…) leaves random search hopeless at test budgets); the
front is f2 = 1 − √f1 at u₁… = 0.  f3 = g·(1 − u₀)² adds a third objective, front again at u₁… = 0.

`RealEvaluator` is the simulator: the point's preset → convert a copy of the digital model →
fit the scalers to the teacher's statistics on calibration text (training-free) → perplexity
on the calibration text that follows (never the tokens fitted on) → the cost model's energy,
latency and area per generated token.  Seeded, so a point always gives the same metrics.
With `start: adapted` the fit is replaced by the parameters of one adaptation to the space's
preset (`adapt_start`, run once per study), and the perplexity is the held-out text's, which
the adaptation never reads (it trains on the calibration works).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cimattn.codesign.space import Space
from cimattn.errors import CimattnError

# hypervolume of the ZDT1 front against ref (1.1, 1.1): ∫₀¹(1.1 − (1 − √x))dx + 0.1 · 1.1 (the strip right of f1 = 1)
ZDT1_HV_2D = 0.1 + 2 / 3 + 0.1 * 1.1


class AnalyticEvaluator:
    def __init__(self, space: Space, seed: int = 0):
        self.space = space

    def constants(self) -> dict[str, float]:
        return {}

    def __call__(self, params: dict) -> dict[str, float]:
        u = self.space.to_unit(params)
        g = 1 + (sum(u[1:]) / (len(u) - 1)) ** 2 if len(u) > 1 else 1.0
        f1 = u[0]
        return {"f1": f1, "f2": g * (1 - math.sqrt(f1 / g)), "f3": g * (1 - u[0]) ** 2}


class CostModel:
    """The cost model's metrics of a point: exact and cheap (no model run), so the driver uses it directly."""

    def __init__(self, space: Space, config=None):
        from cimattn.cost.run import shape_of

        self.space, self.base = space, space.base()
        self.shape = shape_of(space.model, config)

    def __call__(self, params: dict) -> dict[str, float]:
        from cimattn.cost.run import cost_metrics

        m = cost_metrics(self.shape, self.space.hardware(params, self.base), self.space.context)
        return {k: m[k] for k in ("energy_per_token_j", "latency_per_token_s", "area_mm2")}


class RealEvaluator:
    """Loads the model and text once; each call converts a fresh copy of the digital model."""

    def __init__(self, space: Space, seed: int = 0, adapted: dict[str, torch.Tensor] | None = None):
        from cimattn.adapt import calibration_batch
        from cimattn.data import load_text, tokenize_cached
        from cimattn.eval.perplexity import perplexity
        from cimattn.models import load_model

        self.space, self.seed = space, seed
        self.base = space.base()
        torch.manual_seed(seed)
        self.teacher, tokenizer = load_model(space.model, seed=seed)
        if space.start == "adapted":
            if adapted is None:
                raise CimattnError(f"space '{space.name}' starts from an adapted model: give its parameters (`adapt_start`)")
            self.adapted = adapted
            self.scored = tokenize_cached(tokenizer, load_text(space.text, "eval"))[: space.eval_tokens]
        else:
            ids = tokenize_cached(tokenizer, load_text(space.text, "calib"))
            if ids.numel() < space.calib_tokens + space.eval_tokens:
                raise CimattnError(f"space '{space.name}': the calibration text has {ids.numel()} tokens; calib_tokens + eval_tokens "
                                   f"= {space.calib_tokens + space.eval_tokens}: lower them or give a longer text")
            self.batch = calibration_batch(ids, space.calib_tokens, space.context)
            self.scored = ids[space.calib_tokens: space.calib_tokens + space.eval_tokens]  # after the fitted tokens
        self.exact = CostModel(space, self.teacher.config)
        self._perplexity = perplexity
        self._constants: dict[str, float] | None = None

    def constants(self) -> dict[str, float]:
        if self._constants is None:
            ppl = self._perplexity(self.teacher, self.scored, context=self.space.context).ppl
            self._constants = {"ppl_digital": ppl}
        return self._constants

    def __call__(self, params: dict) -> dict[str, float]:
        from cimattn.adapt.initialize import fit_scalers, teacher_targets
        from cimattn.models import convert
        from cimattn.models.convert import load_hardware_state

        t0 = time.perf_counter()
        hardware = self.space.hardware(params, self.base)
        knobs = self.space.adaptation(params)
        torch.manual_seed(self.seed)
        model = convert(copy.deepcopy(self.teacher), hardware)
        if self.space.start == "adapted":
            load_hardware_state(model, self.adapted)
        else:
            spread = {name: knobs["qkv_spread"] for name in ("q", "k", "v")} if "qkv_spread" in knobs else None
            fit_scalers(model, self.batch, teacher_targets(model, self.teacher, self.batch, spread))
        try:
            ppl = self._perplexity(model, self.scored, context=self.space.context).ppl
        except CimattnError:  # NaN / Inf logits: this design does not work at all
            ppl = math.inf
        return {"ppl": ppl, **self.exact(params), "seconds": time.perf_counter() - t0}


def make_evaluator(space: Space, seed: int = 0, adapted: dict[str, torch.Tensor] | None = None):
    return RealEvaluator(space, seed, adapted) if space.evaluator == "real" else AnalyticEvaluator(space, seed)


def adapt_start(space: Space, seed: int, out: Path, log: Callable[[str], None] = lambda s: None,
                progress: Callable | None = None) -> dict[str, torch.Tensor] | None:
    """For `start: adapted`, adapt the model to the space's preset once, into OUT/start/ (resumable); the adapted parameters.

    The adaptation is `cimattn run`'s, replaying `adapt_steps`: no clock, so the study's starting model
    is the same on every machine.  None for a space that fits per point.
    """
    if space.start != "adapted":
        return None
    from cimattn.adapt.checkpoint import load_parameters
    from cimattn.pipeline import ADAPTED, RunSpec, no_progress, run_pipeline

    spec = RunSpec(model=space.model, preset=space.preset, out=Path(out) / "start", text=space.text, eval_tokens=space.eval_tokens,
                   context=space.context, adapt_steps=dict(space.adapt_steps), seed=seed)
    metrics = run_pipeline(spec, stages=("baseline", "convert", "adapt", "evaluate"), log=log, progress=progress or no_progress)["metrics"]
    log(f"start: adapted to {space.preset} for {dict(space.adapt_steps)} steps: perplexity {metrics['ppl_hardware_initial']:.1f} "
        f"converted, {metrics['ppl_hardware_adapted']:.1f} adapted")
    return load_parameters(spec.out / ADAPTED)


def exact_metrics(space: Space):
    """What the driver can compute exactly without an evaluation: the cost model for real spaces, nothing otherwise."""
    return CostModel(space) if space.evaluator == "real" else None
