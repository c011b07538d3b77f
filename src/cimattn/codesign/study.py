"""A co-design study: every method in turn, the same budget of real evaluations each, one store, resumable.

The driver asks a method for points, writes them `pending`, evaluates the ones the cache does
not hold (in this process, or on Ray workers), and stores each result as it completes.  A
killed study, rerun with the same DIR, first evaluates its pending points, then replays each
method's history into the method and continues: no finished evaluation is lost or repeated.

Ray: `workers=K` starts a local cluster of K CPUs; `ray_address="HOST:6379"` joins one started
with `ray start --head` on one machine and `ray start --address HOST:6379` on the others (same
Python environment and cimattn version on each); each worker holds one evaluator (model loaded
once) and the driver stays the only writer of the store.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from cimattn.codesign.evaluators import adapt_start, exact_metrics, make_evaluator
from cimattn.codesign.methods import METHODS, make_method
from cimattn.codesign.space import Space
from cimattn.codesign.store import Store
from cimattn.errors import CimattnError
from cimattn.storage import atomic_write_bytes

PROXY_STATE = "state.pt"  # saved as DIR/proxy_state.pt: the warm start of a resumed proxy search


class StopStudy(Exception):
    """Raised after `max_evaluations` evaluations in this process (a planned stop, as a kill would)."""


class LocalPool:
    size = 1

    def __init__(self, space: Space, seed: int, adapted: dict | None):
        self.evaluator = make_evaluator(space, seed, adapted)

    def constants(self) -> dict:
        return self.evaluator.constants()

    def run(self, items: list[dict]):
        for i, params in enumerate(items):
            yield i, self.evaluator(params)

    def close(self) -> None:
        pass


class RayPool:
    def __init__(self, space: Space, seed: int, adapted: dict | None, workers: int, address: str | None):
        try:
            import ray
        except ImportError:
            raise CimattnError("--workers / --ray-address need Ray: pip install 'ray>=2.40'") from None
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}})
        worker = ray.remote(num_cpus=1)(_Worker)
        # the adapted parameters travel through the object store (put once): a worker on another machine cannot read our files
        shared = None if adapted is None else ray.put(adapted)
        self.workers = [worker.remote(space.model_dump(mode="json"), seed, shared) for _ in range(workers)]
        self.size = workers

    def constants(self) -> dict:
        return self.ray.get(self.workers[0].constants.remote())

    def run(self, items: list[dict]):
        futures = {self.workers[i % self.size].evaluate.remote(p): i for i, p in enumerate(items)}
        while futures:
            ready, _ = self.ray.wait(list(futures), num_returns=1)
            yield futures.pop(ready[0]), self.ray.get(ready[0])

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        if self.started:
            self.ray.shutdown()


class _Worker:
    def __init__(self, space: dict, seed: int, adapted: dict | None):
        from cimattn.codesign.space import Space

        self.evaluator = make_evaluator(Space.model_validate(space), seed, adapted)

    def constants(self) -> dict:
        return self.evaluator.constants()

    def evaluate(self, params: dict) -> dict:
        return self.evaluator(params)


def identity(space: Space, seed: int) -> dict:
    """What an evaluation depends on: the cache key's prefix (objectives and constraints are not part of it)."""
    keep = ("evaluator", "model", "preset", "text", "context", "calib_tokens", "eval_tokens")
    keep += ("start", "adapt_steps") if space.start == "adapted" else ()  # so studies made before `start` existed stay valid
    preset = space.base().model_dump(mode="json") if space.evaluator == "real" else None
    return {"seed": seed, "preset_config": preset, "paths": {p.name: p.path for p in space.parameters},
            **{k: getattr(space, k) for k in keep}}


def run_study(space: Space, out: Path, budget: int, methods: list[str], *, seed: int = 0, workers: int = 1,
              ray_address: str | None = None, batch: int | None = None, max_evaluations: int | None = None,
              log: Callable[[str], None] = lambda s: None, progress: Callable | None = None) -> dict:
    """Run (or resume) every method to `budget` evaluations; returns {method: [(params, metrics), …]}.

    batch: points asked per round (default: one per worker); `max_evaluations`: stop (StopStudy) after
    that many evaluations in this process, leaving the study as a kill would; `progress`: bars for a `start: adapted`
    space's one adaptation.
    """
    for m in methods:
        if m not in METHODS:
            raise CimattnError(f"unknown method '{m}': choose from {', '.join(METHODS)} or 'all'")
    if budget < 1:
        raise CimattnError(f"--budget must be at least 1, got {budget}")
    out = Path(out)
    store = Store(out / "study.db", identity(space, seed))
    old = store.get_meta("space")
    if old is not None and old != space.model_dump(mode="json"):
        store.close()
        raise CimattnError(f"{out} holds a study of another space: give a new --out or the same space file")
    store.set_meta("space", space.model_dump(mode="json"))
    adapted = adapt_start(space, seed, out, log, progress)
    pool = RayPool(space, seed, adapted, workers, ray_address) if (workers > 1 or ray_address) else LocalPool(space, seed, adapted)
    counter = {"evaluated": 0}
    try:
        constants = store.get_meta("constants")
        if constants is None:
            constants = pool.constants()
            store.set_meta("constants", constants)
        exact = exact_metrics(space)
        for name in methods:
            _run_method(name, space, seed, budget, store, pool, constants, exact, out, counter, max_evaluations, log,
                        batch or pool.size)
        return {name: [t for t in store.trials(name) if t[1] is not None] for name in methods}
    finally:
        pool.close()
        store.close()


def _run_method(name, space, seed, budget, store: Store, pool, constants, exact, out: Path, counter, max_evaluations, log,
                batch: int) -> None:
    state_path = out / f"{name}_{PROXY_STATE}"
    method = make_method(name, space, seed, budget, constants, exact=exact,
                         state=state_path.read_bytes() if name == "proxy" and state_path.is_file() else None)
    history = store.trials(name)
    for params, metrics in history:
        if metrics is not None:
            method.tell(params, metrics)
    done = sum(m is not None for _, m in history)
    pending = store.pending(name)
    if done < budget:
        log(f"{name}: {done} of {budget} evaluations done" + (f", {len(pending)} pending from a stopped run" if pending else ""))
    _evaluate(name, pending, store, pool, method, counter, max_evaluations)
    done += len(pending)
    while done < budget:
        t0 = time.perf_counter()
        proposals = method.ask(min(batch, budget - done))
        if name == "proxy" and getattr(method.proxy, "fitted", False):
            atomic_write_bytes(state_path, method.proxy.state())
        items = [(store.propose(name, p), p) for p in proposals]
        _evaluate(name, items, store, pool, method, counter, max_evaluations)
        done += len(items)
        log(f"{name}: {done}/{budget} ({time.perf_counter() - t0:.1f} s for {len(items)})")


def _evaluate(name, items: list[tuple[int, dict]], store: Store, pool, method, counter, max_evaluations) -> None:
    """Evaluate (seq, params) items — cached ones from the store — storing and telling each as it completes."""
    todo = []
    for seq, params in items:
        cached = store.lookup(params)
        if cached is not None:
            store.finish(name, seq, params, cached)
            method.tell(params, cached)
        else:
            todo.append((seq, params))
    if not todo:
        return
    if max_evaluations is not None and counter["evaluated"] >= max_evaluations:
        raise StopStudy(f"stopped after {counter['evaluated']} evaluations")
    if max_evaluations is not None:
        todo = todo[: max_evaluations - counter["evaluated"]]  # the rest stay pending, as after a kill
    for i, metrics in pool.run([p for _, p in todo]):
        seq, params = todo[i]
        store.finish(name, seq, params, metrics)
        method.tell(params, metrics)
        counter["evaluated"] += 1
    if max_evaluations is not None and counter["evaluated"] >= max_evaluations:
        raise StopStudy(f"stopped after {counter['evaluated']} evaluations")
