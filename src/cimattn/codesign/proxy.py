"""The MORPH-style differentiable proxy (He & Ciocarlie, ICRA 2024; shared/PAPERS.md): an ensemble of
small MLPs from the unit-cube point to the (transformed, standardised) objectives, kept close to the
real evaluator by a matching loss on the points the search visited, and searched by gradient.

Each round: refit (warm start) on every evaluation so far + MATCH_WEIGHT × the points proposed last
round (the "visited states" of MORPH: where the proxy was trusted, its error is penalised most);
then from many starts descend an augmented Chebyshev scalarisation with random weights (to spread
along the front) of the ensemble's optimistic prediction μ − κσ (exploration where members
disagree) plus a penalty for predicted constraint violations; round the results to the grid of
the space, replace the predicted costs by the cost model's exact values where the evaluator has
them, and pick the batch greedily by predicted hypervolume gain.  Every pick is then evaluated
for real by the caller.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from torch import nn

from cimattn.codesign.pareto import hypervolume, pareto_mask

MEMBERS = 5  # ensemble size: enough spread for an uncertainty signal at ~10 ms per step on 2 CPU cores
HIDDEN = 64
FIT_STEPS, REFIT_STEPS = 300, 100
MATCH_WEIGHT = 1.0
KAPPA = 1.0  # optimism: μ − κσ
DESCENT_STEPS = 60
STARTS_PER_PICK = 16
CHEBYSHEV_AUGMENT = 0.05  # ρ of the augmented Chebyshev scalarisation (keeps weakly dominated points out)


class Ensemble(nn.Module):
    """MEMBERS independent MLPs (dim → HIDDEN → HIDDEN → outputs, SiLU) held as batched weights: one
    batched matmul per layer instead of a Python loop over members (5× fewer optimizer tensors)."""

    def __init__(self, dim: int, outputs: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        sizes = [dim, HIDDEN, HIDDEN, outputs]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default initialisation range
            self.weights.append(nn.Parameter((torch.rand(MEMBERS, fan_in, fan_out, generator=g) * 2 - 1) * bound))
            self.biases.append(nn.Parameter((torch.rand(MEMBERS, 1, fan_out, generator=g) * 2 - 1) * bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.expand(MEMBERS, *x.shape)  # (members, N, dim)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < len(self.weights) - 1:
                h = torch.nn.functional.silu(h)
        return h  # (members, N, outputs)


class Proxy:
    """Ensemble + the per-column standardisation of its targets."""

    def __init__(self, dim: int, outputs: int, seed: int):
        self.net = Ensemble(dim, outputs, seed)
        self.seed = seed
        self.mean = torch.zeros(outputs)
        self.std = torch.ones(outputs)
        self.fitted = False

    def fit(self, x: np.ndarray, y: np.ndarray, visited: np.ndarray | None = None, round_: int = 0) -> float:
        """Fit on all (x, y); the rows `visited` (a bool mask) get the extra matching weight. Returns the final loss."""
        X = torch.tensor(x, dtype=torch.float32)
        Y = torch.tensor(y, dtype=torch.float32)
        self.mean, self.std = Y.mean(0), Y.std(0, unbiased=False).clamp_min(1e-6)
        Z = (Y - self.mean) / self.std
        torch.manual_seed(self.seed * 1000 + round_)
        # bootstrap weights: each member sees its own resample of the data, the source of ensemble disagreement
        boot = torch.distributions.Exponential(torch.ones(MEMBERS, len(X))).sample() if len(X) > 1 else torch.ones(MEMBERS, 1)
        boot = boot / boot.mean(1, keepdim=True)
        match = torch.tensor(visited if visited is not None else np.zeros(len(X), bool), dtype=torch.float32)
        weights = boot + MATCH_WEIGHT * match * (len(X) / max(match.sum().item(), 1.0))
        opt = torch.optim.Adam(self.net.parameters(), lr=3e-3, weight_decay=1e-4, foreach=True)
        steps = REFIT_STEPS if self.fitted else FIT_STEPS
        for _ in range(steps):
            opt.zero_grad()
            err = ((self.net(X) - Z) ** 2).mean(-1)  # (members, N)
            loss = (err * weights).sum() / weights.sum()
            loss.backward()
            opt.step()
        self.fitted = True
        return float(loss.detach())

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) over members, in the targets' own units (not standardised)."""
        z = self.net(x)
        return z.mean(0) * self.std + self.mean, z.std(0) * self.std

    def state(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"net": self.net.state_dict(), "mean": self.mean, "std": self.std, "fitted": self.fitted}, buf)
        return buf.getvalue()

    def load(self, blob: bytes) -> None:
        s = torch.load(io.BytesIO(blob), weights_only=True)
        self.net.load_state_dict(s["net"])
        self.mean, self.std, self.fitted = s["mean"], s["std"], s["fitted"]


def descend(proxy: Proxy, starts: np.ndarray, weights: np.ndarray, ideal: np.ndarray, scale: np.ndarray, n_objectives: int,
            bounds: list[tuple[int, float, float]], seed: int) -> np.ndarray:
    """Gradient descent of each start on its own scalarisation of the proxy; returns points in [0, 1]^d.

    bounds: (output column, bound in target units, +1 for ≤ / −1 for ≥) of each constraint.  The point is a sigmoid of a free
    variable, so steps never leave the cube and no projection is needed.
    """
    torch.manual_seed(seed)
    x0 = torch.tensor(starts, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
    free = torch.logit(x0).requires_grad_(True)
    w = torch.tensor(weights, dtype=torch.float32)
    z0, s = torch.tensor(ideal, dtype=torch.float32), torch.tensor(scale, dtype=torch.float32)
    opt = torch.optim.Adam([free], lr=0.1)
    for _ in range(DESCENT_STEPS):
        opt.zero_grad()
        mu, sd = proxy.predict(torch.sigmoid(free))
        f = ((mu - KAPPA * sd)[:, :n_objectives] - z0) / s
        loss = (w * f).amax(1) + CHEBYSHEV_AUGMENT * (w * f).sum(1)
        for col, bound, sign in bounds:
            loss = loss + 10 * torch.relu(sign * (mu[:, col] - bound) / proxy.std[col])
        loss.sum().backward()
        opt.step()
    return torch.sigmoid(free).detach().numpy().astype(float)


def greedy_hv_batch(pred: np.ndarray, front: np.ndarray, ref: np.ndarray, n: int, fallback: np.ndarray) -> list[int]:
    """Indices of n candidates chosen one by one for the largest predicted hypervolume gain over `front`
    (fallback score, e.g. uncertainty, breaks ties when no candidate adds any)."""
    chosen: list[int] = []
    current = front.copy()
    base = hypervolume(current, ref) if len(current) else 0.0
    for _ in range(n):
        best, best_gain = None, 0.0
        for i in range(len(pred)):
            if i in chosen:
                continue
            gain = hypervolume(np.vstack([current, pred[i : i + 1]]), ref) - base
            if gain > best_gain + 1e-12:
                best, best_gain = i, gain
        if best is None:
            rest = [i for i in np.argsort(-fallback) if i not in chosen]
            if not rest:
                break
            best = int(rest[0])
        chosen.append(best)
        current = np.vstack([current, pred[best : best + 1]])
        current = current[pareto_mask(current)]
        base = hypervolume(current, ref)
    return chosen


def dirichlet(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    return rng.dirichlet(np.ones(m), size=n) + 1e-3


def finite_cap(y: np.ndarray) -> np.ndarray:
    """Replace ±inf (a design that produced NaN logits) by a value just beyond the worst finite one."""
    y = y.copy()
    for j in range(y.shape[1]):
        col = y[:, j]
        finite = col[np.isfinite(col)]
        worst = finite.max() + max(1.0, abs(finite.max()) * 0.1) if len(finite) else 0.0
        col[~np.isfinite(col)] = worst
    return y


