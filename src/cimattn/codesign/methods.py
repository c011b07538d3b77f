"""Search methods behind one ask/tell interface, so every method runs in the same loop, store and budget.

ask(n)               n new points (params dicts) to evaluate
tell(params, m)      a point's metrics; also how a resumed study replays its history
Random and grid are functions of (seed, index), Optuna's samplers see the history through
enqueue → ask → tell, and the proxy refits on the history: a resumed method continues from
what the store holds, whatever process asked before.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from cimattn.codesign import proxy as px
from cimattn.codesign.pareto import pareto_mask
from cimattn.codesign.space import Space
from cimattn.errors import CimattnError

METHODS = ("proxy", "tpe", "nsga2", "random", "grid")


def transformed(space: Space, metrics: dict) -> list[float]:
    """Objectives as minimised quantities (log where the objective says so), then the constrained metrics."""
    out = [objective_value(o, metrics[o.metric]) for o in space.objectives]
    for metric in constrained_metrics(space):
        out.append(_log(metrics[metric]))
    return out


def objective_value(o, x: float) -> float:
    x = _log(x) if o.log else x
    return -x if o.direction == "maximize" else x


def constrained_metrics(space: Space) -> list[str]:
    objectives = {o.metric for o in space.objectives}
    return list(dict.fromkeys(c.metric for c in space.constraints if c.metric not in objectives))


# Perplexity spans decades even in log space (a design that breaks the model: 10^3–10^4 against ~60 at the front), and in
# a least-squares fit that tail drowns the few-percent differences that rank the front; the proxy models log(log ppl)
# (ppl ≥ 1: log ppl ≥ 0).  SmolLM2, space gaincell-adapted, seeds 0 / 1: the proxy's cross-validated rank correlation
# for perplexity 0.925 / 0.933, against 0.921 / 0.889 when it modelled log ppl.
PROXY_LOGLOG = ("ppl",)


def proxy_value(metric: str, v: float) -> float:
    """A `transformed` value (log units) → what the proxy fits for that metric."""
    return math.log(max(v, 1e-6)) if metric in PROXY_LOGLOG and math.isfinite(v) else v


def from_proxy(metric: str, v: np.ndarray) -> np.ndarray:
    """`proxy_value`'s inverse, element-wise."""
    return np.exp(v) if metric in PROXY_LOGLOG else v


def proxy_targets(space: Space, metrics: dict) -> list[float]:
    """`transformed`, in the units the proxy fits (`proxy_value` per column)."""
    columns = [o.metric for o in space.objectives] + constrained_metrics(space)
    return [proxy_value(c, v) for c, v in zip(columns, transformed(space, metrics))]


def _log(x: float) -> float:
    return math.log(x) if x > 0 else (math.inf if math.isnan(x) else -30.0)  # log(0): a floor far below any real metric


def feasible(space: Space, metrics: dict, constants: dict) -> bool:
    return all(c.violation(metrics, constants) <= 0 for c in space.constraints)


class RandomSearch:
    def __init__(self, space: Space, seed: int, budget: int, **_):
        self.space, self.seed, self.count, self.told = space, seed, 0, 0

    def ask(self, n: int) -> list[dict]:
        out = [self.space.from_unit(np.random.default_rng([self.seed, self.count + i]).random(self.space.dim)) for i in range(n)]
        self.count += n
        return out

    def tell(self, params: dict, metrics: dict) -> None:
        self.told += 1
        self.count = max(self.count, self.told)  # a replayed history moves the index on


class GridSearch:
    """The coarsest full-factorial grid with at least `budget` points, visited in a seeded random order."""

    def __init__(self, space: Space, seed: int, budget: int, **_):
        k = 2
        while math.prod(len(p.grid(k)) for p in space.parameters) < budget and k < budget:
            k += 1
        points = list(itertools.product(*(p.grid(k) for p in space.parameters)))
        order = np.random.default_rng(seed).permutation(len(points))
        self.points = [dict(zip((p.name for p in space.parameters), points[i])) for i in order]
        self.count, self.told = 0, 0

    def ask(self, n: int) -> list[dict]:
        out = [self.points[(self.count + i) % len(self.points)] for i in range(n)]
        self.count += n
        return out

    def tell(self, params: dict, metrics: dict) -> None:
        self.told += 1
        self.count = max(self.count, self.told)


class OptunaSearch:
    """TPE or NSGA-II through Optuna's ask/tell; constraint violations are told with `trial.set_constraint` (Optuna ≥ 5)."""

    def __init__(self, space: Space, seed: int, budget: int, sampler: str, constants: dict, **_):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.space, self.constants = space, constants
        self.dists = {p.name: _distribution(p) for p in space.parameters}
        if sampler == "tpe":
            s = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(budget // 4, 2)))
        else:
            s = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, budget // 4)))
        self.study = optuna.create_study(directions=[o.direction for o in space.objectives], sampler=s)
        self.open: dict[str, list] = {}

    def ask(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            trial = self.study.ask(self.dists)
            params = dict(trial.params)
            self.open.setdefault(_k(params), []).append(trial)
            out.append(params)
        return out

    def tell(self, params: dict, metrics: dict) -> None:
        pending = self.open.get(_k(params))
        if pending:
            trial = pending.pop(0)
        else:  # replay of a point asked by an earlier process
            self.study.enqueue_trial(params, skip_if_exists=False)
            trial = self.study.ask(self.dists)
        for c in self.space.constraints:
            trial.set_constraint(str(c), min(c.violation(metrics, self.constants), 1e300))
        values = [metrics[o.metric] for o in self.space.objectives]
        if any(math.isnan(v) for v in values):
            self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, [min(v, 1e300) for v in values])


def _distribution(p):
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if p.type == "categorical":
        return CategoricalDistribution(p.choices)
    if p.type == "int":
        return IntDistribution(int(p.low), int(p.high), log=p.log, step=p.step or 1)
    return FloatDistribution(p.low, p.high, log=p.log)


def _k(params: dict) -> str:
    return repr(sorted(params.items()))


class ProxySearch:
    """Gradient search through the MORPH-style proxy (module `proxy`); a space-filling random start first."""

    def __init__(self, space: Space, seed: int, budget: int, constants: dict, exact=None, state: bytes | None = None, **_):
        self.space, self.seed, self.constants, self.exact = space, seed, constants, exact
        self.n_init = max(2, min(space.dim + 1, budget // 3))  # a small random start: the cost model needs no data
        self.m = len(space.objectives)
        self.columns = self.m + len(constrained_metrics(space))
        self.proxy = px.Proxy(space.dim, self.columns, seed)
        if state:
            self.proxy.load(state)
        self.x: list[list[float]] = []
        self.y: list[list[float]] = []
        self.last_ask: int | None = None  # evaluations told before the last proposal: the ones after it are its points
        self.round = 0

    def tell(self, params: dict, metrics: dict) -> None:
        self.x.append(self.space.to_unit(params))
        self.y.append(proxy_targets(self.space, metrics))

    def ask(self, n: int) -> list[dict]:
        done = len(self.x)
        if done < self.n_init:
            return [self.space.from_unit(np.random.default_rng([self.seed, done + i]).random(self.space.dim)) for i in range(n)]
        self.round += 1
        x, y = np.array(self.x), px.finite_cap(np.array(self.y))
        # the points the proxy proposed last round, now evaluated: where it must match the simulator (MORPH)
        visited = np.arange(len(x)) >= self.last_ask if self.last_ask is not None else None
        self.proxy.fit(x, y, visited, self.round)
        self.last_ask = len(x)
        return self._propose(x, y, n)

    def _propose(self, x: np.ndarray, y: np.ndarray, n: int) -> list[dict]:
        rng = np.random.default_rng([self.seed, 7, self.round])
        m, d = self.m, self.space.dim
        front = y[pareto_mask(y[:, :m])][:, :m] if len(y) else np.zeros((0, m))
        ideal, worst = y[:, :m].min(0), y[:, :m].max(0)
        scale = np.maximum(worst - ideal, 1e-9)
        best = x[pareto_mask(y[:, :m])]
        starts = np.clip(np.vstack([rng.random((px.STARTS_PER_PICK * n, d)), best + rng.normal(0, 0.05, best.shape)]), 0, 1)
        weights = px.dirichlet(rng, len(starts), m)
        found = px.descend(self.proxy, starts, weights, ideal, scale, m, self._bounds(), self.seed + self.round)
        candidates, seen = [], {_k(self.space.from_unit(u)) for u in x}
        for u in np.vstack([found, rng.random((4 * n, d))]):  # a few random points keep exploration alive
            params = self.space.from_unit(u)
            if _k(params) not in seen:
                seen.add(_k(params))
                candidates.append(params)
        if not candidates:
            raise CimattnError(f"space '{self.space.name}': every point of the space has been evaluated; lower --budget")
        import torch

        with torch.no_grad():
            mu, sd = self.proxy.predict(torch.tensor([self.space.to_unit(c) for c in candidates], dtype=torch.float32))
        pred = (mu - px.KAPPA * sd).numpy().astype(float)
        if self.exact is not None:  # the cost model is exact: use its values, not the proxy's, for what it computes
            for i, params in enumerate(candidates):
                exact = self.exact(params)
                for j, o in enumerate(self.space.objectives):
                    if o.metric in exact:
                        pred[i, j] = proxy_value(o.metric, objective_value(o, exact[o.metric]))
        ok = np.ones(len(candidates), bool)
        for col, bound, sign in self._bounds():
            ok &= sign * (mu[:, col].numpy() - bound) <= 0
        ref = worst + 0.1 * scale
        order = px.greedy_hv_batch(np.where(ok[:, None], pred[:, :m], np.inf), front, ref, n, sd.numpy().sum(1))
        return [candidates[i] for i in order]

    def _bounds(self) -> list[tuple[int, float, float]]:
        """(target column, bound in target units, +1 for ≤ / −1 for ≥) of each constraint."""
        objectives = {o.metric: (j, o) for j, o in enumerate(self.space.objectives)}
        extra = constrained_metrics(self.space)
        out = []
        for c in self.space.constraints:
            sign, bound = (1.0 if c.op == "<=" else -1.0), c.bound(self.constants)
            if c.metric in objectives:
                j, o = objectives[c.metric]
                out.append((j, proxy_value(c.metric, objective_value(o, bound)), -sign if o.direction == "maximize" else sign))
            else:
                out.append((self.m + extra.index(c.metric), proxy_value(c.metric, _log(bound)), sign))
        return out


def make_method(name: str, space: Space, seed: int, budget: int, constants: dict, exact=None, state: bytes | None = None):
    if name == "random":
        return RandomSearch(space, seed, budget)
    if name == "grid":
        return GridSearch(space, seed, budget)
    if name in ("tpe", "nsga2"):
        return OptunaSearch(space, seed, budget, sampler=name, constants=constants)
    if name == "proxy":
        return ProxySearch(space, seed, budget, constants, exact=exact, state=state)
    raise CimattnError(f"unknown method '{name}': choose from {', '.join(METHODS)} or 'all'")
