"""Choosing sampling probabilities q and sketch sizes k to cut wall-clock time (paper B, B.4-B.5).

Objective (B.5): J(q, k) = R_eps(q, k) * E[T_r(q, k)] with rounds-to-accuracy (B.4)
R_eps = alpha0 (1 + max_n a_n (1 - q_n) / q_n) + sum_n a_n^2 alpha_n(k_n) / q_n and
alpha_n(k) = alpha1 (1 + xi (r / k - 1)). The first factor is B.4's step-size condition
eta <~ 1 / (L H (1 + max_n a_n (1 - q_n) / q_n)) carried into the (F0 - F*) / (eta H R) term
(PROPOSED-M): without it rarely sampled clients look free and the optimum collapses to q_min;
sketching inflates the variance like r / k, as in FSLoRA (xi = 0 ignores it); E[T_r] is the
Monte-Carlo expected round time of :class:`fedsoft.sketching.wallclock.SystemModel`. Constraint: the
expected number of participants sum_n q_n is at most the budget (the same budget as uniform
sampling), q_n in [q_min, 1], k_n in [1, r].

Low-complexity scheme (B.5, PROPOSED-M):
* q-step (B.5 step 2): for fixed k the stationarity condition of the product gives
  q_n = clip(lambda sqrt(a_n^2 alpha_n(k_n) / c_n), q_min, 1), c_n the client's mean round time
  (compute + full-band upload), with one common multiplier lambda; lambda_max meets the budget
  (bisection), and a 1-D log grid below it is scored with the true J;
* start (common-k sweep): for every common k = 1..r the q-step at that k is run from uniform
  sampling; the best (q, k) of these r candidates is the starting point, so the result is never
  worse than the best fixed common k, with or without its own q-step;
* k-step (B.5 step 3, a real 1-D search): at fixed q, first every common k = 1..r, then
  coordinate descent: for each client in turn every k_n in 1..r with the others fixed, all
  scored with the true J; sweeps repeat until none moves J (at most ``k_sweeps``);
* alternate q- and k-steps (B.5 step 4) until neither lowers J. The last step is always a
  k-step, so at the returned q no common k and no single-client change of k_n is better.
A step is accepted only when J decreases, so the result is never worse than uniform sampling.
J is evaluated with common random numbers (``seed``), so it is a deterministic function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsoft.sketching.wallclock import SystemModel
from fedsoft.wireless.arguments import nonneg, pos_int, positive

__all__ = ["SamplingPlan", "SketchObjective", "optimize_sampling", "uniform_plan"]


@dataclass(frozen=True)
class SketchObjective:
    """Constants of R_eps(q, k) (B.4), estimated from a pilot or set in the run config."""

    alpha0: float = 1.0
    alpha1: float = 1.0
    xi: float = 0.5

    def __post_init__(self) -> None:
        nonneg("sketch-alpha0", self.alpha0)
        positive("sketch-alpha1", self.alpha1)
        nonneg("sketch-xi", self.xi)

    def alpha(self, k: np.ndarray, rank: int) -> np.ndarray:
        """alpha_n(k_n), decreasing in k_n."""
        return self.alpha1 * (1.0 + self.xi * (rank / np.asarray(k, dtype=np.float64) - 1.0))

    def rounds(self, q: np.ndarray, k: np.ndarray, a: np.ndarray, rank: int) -> float:
        """R_eps(q, k) up to the 1/eps factor (B.4, see the module docstring)."""
        q = np.asarray(q, dtype=np.float64)
        step = 1.0 + float(np.max(a * (1.0 - q) / q))
        return float(self.alpha0 * step + np.sum(a**2 * self.alpha(k, rank) / q))


@dataclass
class SamplingPlan:
    """q and k per client, the objective J and its value under uniform sampling."""

    q: np.ndarray
    k: np.ndarray
    objective: float
    uniform_objective: float
    expected_round_s: float
    history: list[float] = field(default_factory=list)


def _check(system: SystemModel, a: np.ndarray, budget: float, q_min: float) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    n = system.num_clients
    if a.shape != (n,) or not np.all(np.isfinite(a)) or np.any(a < 0) or a.sum() <= 0:
        raise ValueError(f"data shares must be {n} finite values >= 0 with a positive sum")
    if not 0 < q_min <= 1:
        raise ValueError(f"sampling-q-min = {q_min}: must be in (0, 1]")
    if not q_min * n <= budget:
        raise ValueError(f"expected participants budget {budget} is below q_min x N = "
                         f"{q_min * n}: lower sampling-q-min or raise sampling-q")
    return a / a.sum()


def uniform_plan(system: SystemModel, a: np.ndarray, objective: SketchObjective, q: float,
                 k: int, *, draws: int = 256, seed: int = 0) -> SamplingPlan:
    """Uniform (or, with q = 1, full) participation with one fixed sketch size for everyone."""
    if not 0 < q <= 1:
        raise ValueError(f"sampling-q = {q}: must be in (0, 1]")
    n = system.num_clients
    a = _check(system, a, q * n, min(q, 1.0))
    qs = np.full(n, float(q))
    ks = np.full(n, int(np.clip(k, 1, system.rank)), dtype=np.int64)
    t = system.expected_round_time(qs, ks, draws, seed)
    j = objective.rounds(qs, ks, a, system.rank) * t
    return SamplingPlan(qs, ks, j, j, t, [j])


def optimize_sampling(
    system: SystemModel,
    a: np.ndarray,
    objective: SketchObjective,
    *,
    budget: float,
    k_init: int,
    optimize_k: bool = True,
    q_min: float = 0.05,
    iters: int = 6,
    grid: int = 16,
    k_sweeps: int = 3,
    draws: int = 256,
    seed: int = 0,
) -> SamplingPlan:
    """Alternating q/k minimisation of J = R_eps * E[T] under sum q <= budget (B.5); with
    ``optimize_k`` the k-step is a common-k sweep plus per-client coordinate descent over
    k_n in 1..r (see the module docstring), otherwise k = ``k_init`` for everyone."""
    n, r = system.num_clients, system.rank
    budget = min(positive("expected participants budget", budget), float(n))
    a = _check(system, a, budget, q_min)
    k0 = np.full(n, int(np.clip(pos_int("k_init", k_init), 1, r)), dtype=np.int64)
    q0 = np.full(n, budget / n)
    mean_gamma = system.channel.spectral_eff(system.channel.mean_gains())

    def score(qv: np.ndarray, kv: np.ndarray) -> tuple[float, float]:
        t = system.expected_round_time(qv, kv, draws, seed)
        return objective.rounds(qv, kv, a, r) * t, t

    def q_step(q: np.ndarray, k: np.ndarray, best: tuple[float, float]
               ) -> tuple[np.ndarray, tuple[float, float], bool]:
        # q_n = clip(lam * base_n, q_min, 1) with sum q <= budget (B.5 step 2)
        c = system.compute_time(k) + system.upload_time(k, mean_gamma)
        base = np.sqrt(a**2 * objective.alpha(k, r) / np.maximum(c, 1e-12))
        base = np.maximum(base, 1e-12)
        lo, hi = 0.0, float(1.0 / base.min())  # at hi every q_n = 1
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if np.clip(mid * base, q_min, 1.0).sum() > budget:
                hi = mid
            else:
                lo = mid
        improved = False
        for lam in lo * np.geomspace(0.05, 1.0, grid):
            qv = np.clip(lam * base, q_min, 1.0)
            if qv.sum() > budget * (1 + 1e-9):
                continue
            j = score(qv, k)
            if j[0] < best[0] * (1 - 1e-9):
                best, q, improved = j, qv, True
        return q, best, improved

    def k_step(q: np.ndarray, k: np.ndarray, best: tuple[float, float]
               ) -> tuple[np.ndarray, tuple[float, float], bool]:
        # B.5 step 3: common k = 1..r, then per-client coordinate descent on the true J
        improved = False
        for c in range(1, r + 1):
            kv = np.full(n, c, dtype=np.int64)
            j = score(q, kv)
            if j[0] < best[0] * (1 - 1e-9):
                best, k, improved = j, kv, True
        for _ in range(k_sweeps):
            moved = False
            for i in range(n):
                for c in range(1, r + 1):
                    if c == k[i]:
                        continue
                    kv = k.copy()
                    kv[i] = c
                    j = score(q, kv)
                    if j[0] < best[0] * (1 - 1e-9):
                        best, k, moved = j, kv, True
            improved |= moved
            if not moved:
                break
        return k, best, improved

    uniform = score(q0, k0)
    q, k, best = q0, k0, uniform
    history = [uniform[0]]
    starts = range(1, r + 1) if optimize_k and r > 1 else [int(k0[0])]
    for c in starts:  # the best fixed common k, each with its own q-step
        kc = np.full(n, c, dtype=np.int64)
        jc = uniform if c == k0[0] else score(q0, kc)
        qc, jc, _ = q_step(q0, kc, jc)
        if jc[0] < best[0] * (1 - 1e-9):
            q, k, best = qc, kc, jc
    history.append(best[0])
    for _ in range(iters):
        q, best, improved = q_step(q, k, best)
        if optimize_k and r > 1:
            k, best, k_improved = k_step(q, k, best)
            improved |= k_improved
        history.append(best[0])
        if not improved:
            break
    return SamplingPlan(q, k, best[0], uniform[0], best[1], history)
