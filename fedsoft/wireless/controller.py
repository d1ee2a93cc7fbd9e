"""TSFA online stage of paper A: virtual queue, per-round P3, bandwidth shares (eqs. 30-41)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy.optimize import minimize_scalar

from fedsoft.wireless.arguments import nonneg as _nonneg
from fedsoft.wireless.arguments import pos_int as _pos_int
from fedsoft.wireless.arguments import positive as _positive
from fedsoft.wireless.arguments import real as _real
from fedsoft.wireless.arguments import rho_range as _rho_range
from fedsoft.wireless.bound import BoundConstants
from fedsoft.wireless.channel import ChannelConfig, deadline_admission, equal_finish, round_delay
from fedsoft.wireless.offline_rank import OfflineResult

__all__ = [
    "P3SolverError",
    "VirtualQueue",
    "bandwidth_shares",
    "round_latency",
    "p3_objective",
    "solve_p3_bisection",
    "solve_p3_closed_form",
    "solve_p3_cvxpy",
    "solve_p3_payload",
    "deadline_latency",
    "DEADLINE_RTOL",
    "P3Problem",
    "Decision",
    "TSFAController",
    "OSFAController",
]

Solver = Literal["cvxpy", "bisection", "closed_form"]
DEADLINE_RTOL = 1e-9  # relative slack of the deadline test (rounding of the shares, eq. 39c)


class P3SolverError(RuntimeError):
    """Raised when the convex solver does not return an optimal solution of P3."""


class VirtualQueue:
    """Latency virtual queue of eq. (30): Q(t+1) = max{Q(t) + T^t - T_bar, 0}, Q(0) = q0."""

    def __init__(self, T_bar: float, initial: float = 0.0) -> None:
        self.T_bar = _positive("T_bar", T_bar)
        self._q = _nonneg("initial", initial)

    @property
    def value(self) -> float:
        """Current backlog Q(t) in seconds."""
        return self._q

    def update(self, latency: float) -> float:
        """Apply eq. (30) with the realised round latency T^t (s); returns Q(t+1)."""
        t = _nonneg("latency", latency)
        self._q = max(self._q + t - self.T_bar, 0.0)
        return self._q


def bandwidth_shares(spectral_eff: object) -> np.ndarray:
    """Eq. (41): b_i = (1/Gamma_i) / sum_j (1/Gamma_j) over the scheduled clients.

    Equalises the delays (eq. 6) of clients with the same payload and sums to 1 (eq. 39c).
    """
    g = np.asarray(spectral_eff, dtype=np.float64)
    if g.ndim != 1 or g.size == 0:
        raise ValueError(f"spectral_eff must be a non-empty 1-D array, got shape {g.shape}")
    if not np.all(np.isfinite(g)) or np.any(g <= 0.0):
        raise ValueError(f"spectral_eff must be finite and > 0, got {spectral_eff!r}")
    inv = 1.0 / g
    return inv / inv.sum()


def round_latency(
    rho: float, r: int, d_plus_k_total: int, q: int, S: float, B_tot: float
) -> float:
    """Equalised round delay under eq. (41): T^t(rho) = (1 - rho) r (d+k) q S^t / B_tot (eq. 39).

    ``S`` is S^t = sum_{j in K^t} 1/Gamma_j^t; ``d_plus_k_total`` = sum over layers of d + k.
    """
    rh = _real("rho", rho)
    if not 0.0 <= rh <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho!r}")
    scale = (
        _pos_int("r", r) * _pos_int("d_plus_k_total", d_plus_k_total) * _pos_int("q", q)
        * _positive("S", S) / _positive("B_tot", B_tot)
    )
    return (1.0 - rh) * scale


def p3_objective(
    rho: object, bound: BoundConstants, rank: int, V: float, Q: float, latency_scale: float
) -> np.ndarray | float:
    """Objective (39a): V Phi(r, rho) + Q (1 - rho) c with c = r (d+k) q S^t / B_tot."""
    rho_arr = np.asarray(rho, dtype=np.float64)
    return V * bound.value(rank, rho) + Q * (1.0 - rho_arr) * latency_scale


def _p3_args(
    bound: BoundConstants, V: object, Q: object, latency_scale: object, rho_min: object,
    rho_max: object,
) -> tuple[float, float, float, float]:
    if not isinstance(bound, BoundConstants):
        raise TypeError(f"bound must be a BoundConstants, got {type(bound).__name__}")
    v = _nonneg("V", V)
    qq = _nonneg("Q", Q)
    c = _nonneg("latency_scale", latency_scale)
    lo, hi = _rho_range(rho_min, rho_max)
    return v * bound.kappa_E, qq * c, lo, hi


def solve_p3_bisection(
    bound: BoundConstants,
    V: float,
    Q: float,
    latency_scale: float,
    rho_min: float,
    rho_max: float,
    tol: float = 1e-13,
) -> float:
    """Solve P3 (39) by bisection on the first-order condition (A.11).

    The objective V Phi + Q (1-rho) c is convex (eq. 40), so its minimiser on [rho_min, rho_max]
    is the root of V dPhi/drho = Q c projected onto the interval; Q = 0 gives rho_min.
    """
    a, lam, lo, hi = _p3_args(bound, V, Q, latency_scale, rho_min, rho_max)
    if lam <= 0.0 or hi == lo:
        return lo
    if a <= 0.0:
        return hi

    p = bound.p

    def grad(x: float) -> float:  # V dPhi/drho - Q c, scalar fast path of sparsification_term
        om = 1.0 - x
        f1 = (1.0 + x) / (om * om * om)
        return a * (f1 if p == 1 else 2.0 * (x / (om * om)) * f1) - lam

    if grad(lo) >= 0.0:
        return lo
    if grad(hi) <= 0.0:
        return hi
    left, right = lo, hi
    while right - left > tol:
        mid = 0.5 * (left + right)
        if grad(mid) > 0.0:
            right = mid
        else:
            left = mid
    return 0.5 * (left + right)


def solve_p3_closed_form(
    bound: BoundConstants,
    V: float,
    Q: float,
    latency_scale: float,
    rho_min: float,
    rho_max: float,
) -> float:
    """Closed-form P3 (39) for p = 1: root of (1+rho)/(1-rho)^3 = Q c / (V kappa_E), projected.

    With x = 1 - rho the condition is the cubic m x^3 + x - 2 = 0 (m = Q c / (V kappa_E)),
    which has one real root (Cardano); two Newton steps polish it to machine precision.
    """
    if bound.p != 1:
        raise ValueError(f"closed-form P3 needs bound.p == 1, got {bound.p!r}")
    a, lam, lo, hi = _p3_args(bound, V, Q, latency_scale, rho_min, rho_max)
    if lam <= 0.0 or hi == lo:
        return lo
    if a <= 0.0:
        return hi
    m = lam / a
    pp, qq = 1.0 / m, -2.0 / m
    disc = math.sqrt((qq / 2.0) ** 2 + (pp / 3.0) ** 3)
    x = math.cbrt(-qq / 2.0 + disc) + math.cbrt(-qq / 2.0 - disc)
    for _ in range(2):
        x -= (m * x**3 + x - 2.0) / (3.0 * m * x * x + 1.0)
    return min(max(1.0 - x, lo), hi)


class P3Problem:
    """P3 (39) as a DCP/DPP cvxpy problem built once and re-solved with new parameters.

    With w = 1/(1-rho) = inv_pos(1-rho): rho/(1-rho)^2 = w^2 - w = (w - 1/2)^2 - 1/4. An epigraph
    variable s >= w - 1/2, s >= 0 gives the DCP form min a s^2 - lam rho (p = 1); since w >= 1,
    s = w - 1/2 at the optimum. For p = 2, (rho/(1-rho)^2)^2 = (s^2 - 1/4)^2 and a second
    epigraph u >= s^2 - 1/4, u >= 0 gives min a u^2 - lam rho (the objective increases in u and
    u >= s^2 - 1/4 >= 0, so u = s^2 - 1/4 at the optimum). Here a = V kappa_E and lam = Q c,
    both divided by a + lam for conditioning (the minimiser is unchanged).

    Default solver: SCS with eps_abs = eps_rel = ``eps`` (agrees with bisection to ~1e-10 in rho).
    Clarabel is supported but its interior-point stop leaves |rho - rho*| ~ 1e-6 even at 1e-10
    tolerances (and reports 'inaccurate' at 1e-12), so it is not the default.
    """

    def __init__(self, p: int = 1, solver: str | None = None, eps: float = 1e-10) -> None:
        if isinstance(p, bool) or p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        import cvxpy as cp  # lazy: keeps this module light for the bisection path

        self._cp = cp
        self.p = p
        self.rho = cp.Variable(name="rho")
        s = cp.Variable(nonneg=True, name="s")
        self.a = cp.Parameter(nonneg=True, name="a")
        self.lam = cp.Parameter(nonneg=True, name="lam")
        self.lo = cp.Parameter(name="rho_min")
        self.hi = cp.Parameter(name="rho_max")
        cons = [s >= cp.inv_pos(1.0 - self.rho) - 0.5, self.rho >= self.lo, self.rho <= self.hi]
        if p == 1:
            penalty = cp.square(s)
        else:
            u = cp.Variable(nonneg=True, name="u")
            cons.append(u >= cp.square(s) - 0.25)
            penalty = cp.square(u)
        self.problem = cp.Problem(cp.Minimize(self.a * penalty - self.lam * self.rho), cons)
        if not self.problem.is_dcp(dpp=True):
            raise AssertionError("P3 formulation is not DPP")  # pragma: no cover
        installed = cp.installed_solvers()
        self.solver = solver or ("SCS" if "SCS" in installed else None)
        self.solver_opts: dict[str, float] = {}
        if self.solver == "SCS":
            self.solver_opts = {"eps_abs": eps, "eps_rel": eps, "max_iters": 200_000}
        elif self.solver == "CLARABEL":
            self.solver_opts = {
                "tol_gap_abs": eps, "tol_gap_rel": eps, "tol_feas": eps, "tol_ktratio": eps
            }

    def solve(self, a: float, lam: float, rho_min: float, rho_max: float) -> float:
        """Minimiser of a (rho/(1-rho)^2)^p - lam rho on [rho_min, rho_max]."""
        cp = self._cp
        tot = a + lam
        self.a.value, self.lam.value = a / tot, lam / tot
        self.lo.value, self.hi.value = rho_min, rho_max
        try:
            self.problem.solve(solver=self.solver, **self.solver_opts)
        except cp.error.SolverError as exc:
            raise P3SolverError(f"cvxpy failed on P3 (a={a!r}, lam={lam!r}): {exc}") from exc
        if self.problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or self.rho.value is None:
            raise P3SolverError(
                f"cvxpy status {self.problem.status!r} on P3 (a={a!r}, lam={lam!r})"
            )
        return float(min(max(float(self.rho.value), rho_min), rho_max))


@lru_cache(maxsize=8)
def _cached_problem(p: int, solver: str | None) -> P3Problem:
    return P3Problem(p, solver)


def solve_p3_cvxpy(
    bound: BoundConstants,
    V: float,
    Q: float,
    latency_scale: float,
    rho_min: float,
    rho_max: float,
    solver: str | None = None,
) -> float:
    """Solve P3 (39) with cvxpy (DCP form of ``P3Problem``, cached per (p, solver)).

    ``latency_scale`` is c = r (d+k) q S^t / B_tot so that T^t(rho) = (1 - rho) c. Q = 0 gives
    rho_min (and so does a degenerate interval); V kappa_E = 0 with Q > 0 gives rho_max.
    """
    a, lam, lo, hi = _p3_args(bound, V, Q, latency_scale, rho_min, rho_max)
    if lam <= 0.0 or hi == lo:
        return lo
    if a <= 0.0:
        return hi
    return _cached_problem(bound.p, solver).solve(a, lam, lo, hi)


def solve_p3_payload(
    bound: BoundConstants,
    rank: int,
    V: float,
    Q: float,
    seconds_per_bit: float,
    payload_bits: Callable[[float], float],
    rho_min: float,
    rho_max: float,
    *,
    grid: np.ndarray | None = None,
    grid_bits: np.ndarray | None = None,
    xtol: float = 1e-10,
) -> float:
    """P3 (39) for the real wire payload: min V Phi(r, rho) + Q T(rho), T = bits(rho) S / B_tot.

    ``payload_bits(rho)`` is the encoded size of one client's upload (values, positions,
    counts, head, framing; non-increasing in rho); ``seconds_per_bit`` is S^t / B_tot of the
    round's equal-finish shares. The payload is nonlinear (the position format switches from a
    bitmap to indices, the head is a constant), so the problem is a bounded 1-D minimisation:
    the best point of a grid (``grid`` with its precomputed ``grid_bits``; default 513 points)
    is refined by bounded Brent (scipy ``minimize_scalar``) between its grid neighbours, and the
    better of the two is returned. Q = 0 gives rho_min; V kappa_E = 0 with Q > 0 the rho with
    the smallest payload.
    """
    r = _pos_int("rank", rank)
    v, q, c = _nonneg("V", V), _nonneg("Q", Q), _nonneg("seconds_per_bit", seconds_per_bit)
    lo, hi = _rho_range(rho_min, rho_max)
    if q * c <= 0.0 or hi == lo:
        return lo
    if grid is None:
        grid = np.linspace(lo, hi, 513)
        grid_bits = np.array([float(payload_bits(float(x))) for x in grid])
    elif grid_bits is None or grid_bits.shape != grid.shape:
        raise ValueError("grid_bits must be given with grid, same shape")
    obj = v * np.asarray(bound.value(r, grid)) + q * c * grid_bits
    i = int(np.argmin(obj))
    best_x, best_f = float(grid[i]), float(obj[i])
    a, b = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, grid.size - 1)])
    if b > a:
        def f(x: float) -> float:
            return v * float(bound.value(r, x)) + q * c * float(payload_bits(x))

        res = minimize_scalar(f, bounds=(a, b), method="bounded", options={"xatol": xtol})
        if float(res.fun) < best_f:
            best_x = float(res.x)
    return min(max(best_x, lo), hi)


def deadline_latency(delays: object, deadline_s: float) -> tuple[float, np.ndarray]:
    """PROPOSED (not in paper A): realised round latency under a deadline, and who was late.

    ``delays`` are the true upload delays (eq. 6, true gains) of the clients that uploaded. A
    client slower than ``deadline_s`` (x (1 + ``DEADLINE_RTOL``)) is late: the server stops
    waiting at the deadline and drops its reply, so the round lasts exactly D; otherwise it
    lasts max_i T_i (<= D). With perfect CSI and the outage rule of
    :class:`TSFAController` no client is late. ``deadline_s`` = inf gives max_i T_i (no rule).
    """
    d = np.asarray(delays, dtype=np.float64)
    dl = float(deadline_s)
    late = d > dl * (1.0 + DEADLINE_RTOL)
    if late.any():
        return dl, late
    return (float(d.max()) if d.size else 0.0), late


@dataclass(frozen=True)
class Decision:
    """Per-round output of the online stage (A.11 'one TSFA round').

    With the outage rule (PROPOSED) ``active`` marks the scheduled clients that upload (the
    others have share 0 and spectral efficiency 0), ``outage`` counts the others and
    ``deadline_s`` is the round's deadline D = F T_bar (longer only in a round where no client
    fits: then the strongest client's predicted delay); without it ``active`` is None
    (everyone), ``outage`` 0 and ``deadline_s`` inf.
    """

    round: int
    rho: float
    shares: np.ndarray
    spectral_eff: np.ndarray
    inv_gamma_sum: float
    model_latency: float
    predicted_latency: float
    payload_bits: float | np.ndarray
    queue: float
    objective: float
    active: np.ndarray | None = None
    outage: int = 0
    deadline_s: float = math.inf


@dataclass
class _History:
    rho: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)


class TSFAController:
    """Online stage of TSFA (eqs. 30-41) at a rank fixed before training.

    Each round: ``step(gains)`` solves P3 (39) for rho^t given Q(t) and the CSI of the scheduled
    clients and returns equal-finish bandwidth shares (eq. 41 with ``bandwidth_noise =
    "total"``, the numerical solution of :func:`fedsoft.wireless.channel.equal_finish` with noise
    over
    the allocated band); ``observe(T^t)`` updates the virtual queue (30) with the realised
    latency.

    The payload model is the same everywhere: with ``payload_bits`` (rho -> encoded bits of one
    client's upload at this rank, e.g. :func:`fedsoft.wireless.plan.payload_bits_fn`) P3 is solved
    for that nonlinear payload by :func:`solve_p3_payload` (bounded 1-D search; ``solver`` is
    then not used) and the predicted latency is bits(rho) S / B_tot; without it P3 uses the
    paper's values-only payload (1 - rho) r (d+k) q and ``solver`` (cvxpy, bisection or closed
    form). ``solver_used`` says which.

    An empty queue (Q(t) = 0, round 0 included) makes P3's solution rho_min, a dense round when
    rho_min = 0. ``empty_queue_rho`` replaces it (the ``tsfa-start = "budget"`` rule: the rho
    that meets T_bar on the nominal channel, offline eq. 29 / Lemma 2); None keeps rho_min
    (``"dense"``, P3 as written).

    Outage rule (PROPOSED, not in paper A; ``deadline_factor`` F, None = off, paper A as
    written): P3 is solved for all K scheduled clients as above, giving rho^t; then every
    client whose upload bits(rho^t) cannot finish within D = F T_bar with its equal-finish
    share among the clients that remain (:func:`fedsoft.wireless.channel.deadline_admission`: the
    weakest channels go first, a client that misses D even with the whole band always goes)
    is in outage: it does not upload this round and its band goes to the others. P3 and the
    shares are then re-solved for the remaining set A (S^t over A, eqs. 39 and 41) and rho^t is
    raised, if needed, to the smallest ratio whose equal-finish delay over A is within D. With
    perfect CSI every round then lasts at most D (a round where no client fits keeps the
    strongest one at the smallest ratio that comes closest, and that round's deadline, in
    ``Decision.deadline_s``, becomes its predicted delay). The FedAvg of eq. (5) then
    averages over A only, so the global model leans toward clients with good channels this
    round (a participation bias paper A's random K-of-N scheduling does not have). With
    imperfect CSI the decision uses the estimate; :func:`deadline_latency` says what the
    realised round costs, and that is what ``observe`` feeds to the queue (eq. 30).

    Args:
        rank: r* from the offline stage (``from_offline``) or a user-fixed rank (OSFA).
        bound: surrogate constants of Phi (A.8); only kappa_E and p shape rho^t.
        V: Lyapunov penalty weight (eq. 33), >= 0.
        T_bar: average-latency budget in s (eq. 24c).
        d_plus_k_total: sum over adapted layers of d_l + k_l (payload r (d+k) q).
        channel: ``ChannelConfig`` supplying P, noise, B_tot, the noise model and q.
        rho_min, rho_max: bounds of rho (eq. 39b with a practical cap rho_max < 1).
        solver: "cvxpy" (default), "bisection" or "closed_form" (p = 1 only), values-only P3.
        initial_rho: ratio of round 0 only (overrides ``empty_queue_rho`` there).
        payload_bits: rho -> bits of one client's encoded upload (None = values only).
        empty_queue_rho: ratio sent when Q(t) = 0 (None = rho_min).
        deadline_factor: F of the outage rule, deadline D = F T_bar (None = no rule).
    """

    mode: str = "tsfa"

    def __init__(
        self,
        rank: int,
        bound: BoundConstants,
        *,
        V: float,
        T_bar: float,
        d_plus_k_total: int,
        channel: ChannelConfig,
        rho_min: float = 0.0,
        rho_max: float = 0.99,
        solver: Solver = "cvxpy",
        initial_rho: float | None = None,
        payload_bits: Callable[[float], float] | None = None,
        empty_queue_rho: float | None = None,
        deadline_factor: float | None = None,
    ) -> None:
        if not isinstance(bound, BoundConstants):
            raise TypeError(f"bound must be a BoundConstants, got {type(bound).__name__}")
        if not isinstance(channel, ChannelConfig):
            raise TypeError(f"channel must be a ChannelConfig, got {type(channel).__name__}")
        if solver not in ("cvxpy", "bisection", "closed_form"):
            raise ValueError(
                f"solver must be 'cvxpy', 'bisection' or 'closed_form', got {solver!r}"
            )
        if solver == "closed_form" and bound.p != 1:
            raise ValueError(f"solver='closed_form' needs bound.p == 1, got p={bound.p!r}")
        self.rank = _pos_int("rank", rank)
        self.bound = bound
        self.V = _nonneg("V", V)
        self.queue = VirtualQueue(T_bar)
        self.T_bar = self.queue.T_bar
        self.d_plus_k_total = _pos_int("d_plus_k_total", d_plus_k_total)
        self.channel = channel
        self.rho_min, self.rho_max = _rho_range(rho_min, rho_max)
        self.solver = solver
        self.initial_rho = None if initial_rho is None else self._clip(
            _real("initial_rho", initial_rho))
        self.empty_queue_rho = None if empty_queue_rho is None else self._clip(
            _real("empty_queue_rho", empty_queue_rho))
        self.payload_bits = payload_bits
        self.deadline_factor = None if deadline_factor is None else _positive(
            "deadline_factor", deadline_factor)
        self._grid = np.linspace(self.rho_min, self.rho_max, 513)
        self._grid_bits = (None if payload_bits is None else
                           np.array([float(payload_bits(float(x))) for x in self._grid]))
        self.history = _History()
        self._pending: Decision | None = None
        self._round = 0
        self._latency_sum = 0.0
        self._rho_sum = 0.0
        self._floor_sum = 0.0  # sum of the predicted latency at rho_max (reachability check)
        self.over_budget_rounds = 0  # consecutive observed rounds with average above budget
        self.outage_total = 0  # scheduled clients in outage over observed rounds
        self.scheduled_total = 0  # scheduled clients over observed rounds

    def _clip(self, rho: float) -> float:
        return min(max(rho, self.rho_min), self.rho_max)

    @property
    def solver_used(self) -> str:
        """P3 method in use: ``"1-D bounded (wire payload)"`` or the values-only ``solver``."""
        return "1-D bounded (wire payload)" if self.payload_bits is not None else (
            f"{self.solver} (values-only payload)")

    @classmethod
    def from_offline(
        cls, result: OfflineResult, bound: BoundConstants, **kwargs: object
    ) -> TSFAController:
        """Controller at the offline stage's rank r*; T_bar defaults to the offline budget and
        the first round uses the offline ratio rho*(r*) ("the initial sparsification ratio",
        A.10) unless ``initial_rho`` or ``empty_queue_rho`` is given."""
        kwargs.setdefault("T_bar", result.T_bar)
        if "empty_queue_rho" not in kwargs:
            kwargs.setdefault("initial_rho", result.rho0)
        return cls(result.r_star, bound, **kwargs)  # type: ignore[arg-type]

    @property
    def backlog(self) -> float:
        """Current virtual-queue value Q(t)."""
        return self.queue.value

    @property
    def rounds(self) -> int:
        """Number of observed rounds."""
        return self._round

    @property
    def average_latency(self) -> float:
        """Running time-average of the realised latencies passed to ``observe`` (eq. 24c)."""
        return self._latency_sum / self._round if self._round else 0.0

    @property
    def average_rho(self) -> float:
        """Running time-average of the chosen rho^t over observed rounds."""
        return self._rho_sum / self._round if self._round else 0.0

    @property
    def average_floor_latency(self) -> float:
        """Time-average of the predicted latency at rho_max: the smallest average latency this
        rank could have had on the observed channels (compare with T_bar)."""
        return self._floor_sum / self._round if self._round else 0.0

    @property
    def deadline_s(self) -> float:
        """Round deadline D = F T_bar of the outage rule in s (inf when the rule is off)."""
        return math.inf if self.deadline_factor is None else self.deadline_factor * self.T_bar

    @property
    def outage_rate(self) -> float:
        """Fraction of scheduled clients in outage over the observed rounds."""
        return self.outage_total / self.scheduled_total if self.scheduled_total else 0.0

    def latency_scale(self, inv_gamma_sum: float) -> float:
        """c = r (d+k) q S^t / B_tot, so the values-only latency is T^t = (1 - rho) c (eq. 39)."""
        return round_latency(
            0.0, self.rank, self.d_plus_k_total, self.channel.bits_per_value, inv_gamma_sum,
            self.channel.bandwidth_hz,
        )

    def bits(self, rho: float) -> float:
        """Bits of one client's upload at ``rho`` under the payload model in use."""
        if self.payload_bits is not None:
            return float(self.payload_bits(rho))
        return (1.0 - rho) * self.rank * self.d_plus_k_total * self.channel.bits_per_value

    def _solve(self, c: float, s: float) -> float:
        if self.payload_bits is not None:
            return solve_p3_payload(
                self.bound, self.rank, self.V, self.queue.value, s / self.channel.bandwidth_hz,
                self.payload_bits, self.rho_min, self.rho_max, grid=self._grid,
                grid_bits=self._grid_bits)
        args = (self.bound, self.V, self.queue.value, c, self.rho_min, self.rho_max)
        if self.solver == "cvxpy":
            return solve_p3_cvxpy(*args)
        if self.solver == "closed_form":
            return solve_p3_closed_form(*args)
        return solve_p3_bisection(*args)

    def step(
        self,
        gains: object,
        payload_bits_fn: Callable[[float], float | np.ndarray] | None = None,
    ) -> Decision:
        """Decide rho^t (P3, eq. 39) and shares b^t (eqs. 27-28, 41) from the scheduled
        clients' gains h_i^t as the server knows them (its CSI estimate).

        ``payload_bits_fn`` maps rho to the wire payload in bits (scalar, or one value per
        scheduled client) for the predicted latency (eq. 6 with the round's shares); P3 uses the
        controller's own payload model (``payload_bits`` at construction). Call ``observe``
        with the realised latency before the next ``step``.
        """
        if self._pending is not None:
            raise RuntimeError("observe() must be called after each step() before the next step()")
        h = np.asarray(gains, dtype=np.float64)
        if h.ndim != 1 or h.size == 0:
            raise ValueError(f"gains must be a non-empty 1-D array, got shape {h.shape}")
        if not np.all(np.isfinite(h)) or np.any(h <= 0.0):
            raise ValueError(f"gains must be > 0 for every scheduled client, got {gains!r}")
        snr = self.channel.full_band_snr(h)
        if np.any(np.log2(1.0 + snr) <= 0.0):
            raise ValueError(f"gains must be > 0 for every scheduled client, got {gains!r}")
        s, shares = equal_finish(snr, self.channel.bandwidth_noise)
        gam = self.channel.spectral_eff_at(h, shares)
        c = self.latency_scale(s)
        q_now = self.queue.value
        rho = self._choose_rho(c, s)
        active: np.ndarray | None = None
        if self.deadline_factor is not None:
            rho, s, shares, gam, active = self._outage(h, snr, rho, s, shares, gam,
                                                       payload_bits_fn)
            c = self.latency_scale(s)
        model_t = (1.0 - rho) * c
        per_bit = s / self.channel.bandwidth_hz
        if payload_bits_fn is None:
            bits: float | np.ndarray = self.bits(rho)
            predicted = float(bits) * per_bit
        else:
            raw = payload_bits_fn(rho)
            bits = float(raw) if np.ndim(raw) == 0 else np.asarray(raw, dtype=np.float64)
            sel = slice(None) if active is None else active
            predicted = round_delay(bits if np.ndim(bits) == 0 else bits[sel], shares[sel],
                                    gam[sel], self.channel.bandwidth_hz)
        self._last_floor = self.bits(self.rho_max) * per_bit
        pred_model = self.bits(rho) * per_bit
        obj = float(self.V * self.bound.value(self.rank, rho) + q_now * pred_model)
        outage = 0 if active is None else int(h.size - active.sum())
        deadline = self.deadline_s
        if active is not None and predicted > deadline * (1.0 + DEADLINE_RTOL):
            deadline = predicted  # no client fits: the round waits for the strongest one
        self._pending = Decision(
            self._round, rho, shares, gam, s, model_t, predicted, bits, q_now, obj,
            active, outage, deadline,
        )
        return self._pending

    def _choose_rho(self, c: float, s: float) -> float:
        """rho^t: the initial ratio, the empty-queue rule or P3 (39) for this S^t."""
        if self._round == 0 and self.initial_rho is not None:
            return self.initial_rho  # offline stage's rho*(r*) as the initial ratio (A.10)
        if self.queue.value <= 0.0 and self.empty_queue_rho is not None:
            return self.empty_queue_rho  # tsfa-start = "budget": no dense round on empty queue
        return self._solve(c, s)

    def _deadline_rho(self, bits: Callable[[float], float], per_bit: float, rho: float
                      ) -> float:
        """Smallest ratio in [rho, rho_max] with bits(ratio) x per_bit <= D (bits
        non-increasing in rho); rho_max when none fits."""
        dl = self.deadline_s * (1.0 + DEADLINE_RTOL)
        if bits(rho) * per_bit <= dl:
            return rho
        if bits(self.rho_max) * per_bit > dl:
            return self.rho_max
        lo, hi = rho, self.rho_max
        while hi - lo > 1e-12:
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if bits(mid) * per_bit <= dl else (mid, hi)
        return hi

    def _outage(self, h: np.ndarray, snr: np.ndarray, rho: float, s: float,
                shares: np.ndarray, gam: np.ndarray,
                payload_bits_fn: Callable[[float], float | np.ndarray] | None = None,
                ) -> tuple[float, float, np.ndarray, np.ndarray, np.ndarray]:
        """The outage rule (PROPOSED, class docstring): (rho, S, shares, Gamma, active).

        The deadline test uses the payload the round's latency is predicted with
        (``payload_bits_fn`` when given, its largest client; else the controller's model)."""
        cfg = self.channel

        def bits(x: float) -> float:
            if payload_bits_fn is None:
                return self.bits(x)
            return float(np.max(payload_bits_fn(x)))

        active = deadline_admission(snr, bits(rho), self.deadline_s, cfg.bandwidth_hz,
                                    cfg.bandwidth_noise)
        if not active.all():
            s, sub = equal_finish(snr[active], cfg.bandwidth_noise)
            shares = np.zeros(h.size)
            shares[active] = sub
            gam = np.zeros(h.size)
            gam[active] = cfg.spectral_eff_at(h[active], sub)
            rho = self._choose_rho(self.latency_scale(s), s)  # P3 (39) re-solved over A
        rho = self._deadline_rho(bits, s / cfg.bandwidth_hz, rho)
        return rho, s, shares, gam, active

    def observe(self, latency: float | None = None) -> float:
        """Update Q with the realised round latency (eq. 30); None uses the predicted one."""
        if self._pending is None:
            raise RuntimeError("observe() called without a preceding step()")
        t = self._pending.predicted_latency if latency is None else _nonneg("latency", latency)
        q_next = self.queue.update(t)
        self.history.rho.append(self._pending.rho)
        self.history.latency.append(t)
        self.history.queue.append(q_next)
        self._latency_sum += t
        self._rho_sum += self._pending.rho
        self._floor_sum += self._last_floor
        self.outage_total += self._pending.outage
        self.scheduled_total += int(self._pending.shares.size)
        self._round += 1
        self.over_budget_rounds = (self.over_budget_rounds + 1
                                   if self.average_latency > self.T_bar else 0)
        self._pending = None
        return q_next

    def budget_out_of_reach(self, patience: int = 5, margin: float = 1.05) -> str | None:
        """A message when the realised average latency has exceeded ``margin`` x T_bar for
        ``patience`` consecutive rounds, else None (a run whose budget may be out of reach)."""
        if self.over_budget_rounds < patience or self.average_latency <= margin * self.T_bar:
            return None
        return (f"{self.mode.upper()} latency budget out of reach: the average uplink latency "
                f"{self.average_latency:.4g} s has exceeded the budget T_bar = {self.T_bar:.4g} s "
                f"for {self.over_budget_rounds} rounds (queue Q = {self.backlog:.4g} s); at "
                f"rho_max = {self.rho_max:g} rank {self.rank} would average "
                f"{self.average_floor_latency:.4g} s on these channels")

    def state_dict(self) -> dict[str, object]:
        """JSON-able state between rounds (queue, history, running sums) for checkpoints."""
        if self._pending is not None:
            raise RuntimeError("state_dict() between step() and observe()")
        return {"queue": self.queue.value, "round": self._round,
                "latency_sum": self._latency_sum, "rho_sum": self._rho_sum,
                "floor_sum": self._floor_sum, "over_budget_rounds": self.over_budget_rounds,
                "outage_total": self.outage_total, "scheduled_total": self.scheduled_total,
                "rho": list(self.history.rho), "latency": list(self.history.latency),
                "queue_history": list(self.history.queue)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the same rank, bound and channel are assumed)."""
        try:
            self.queue._q = _nonneg("queue", float(state["queue"]))
            self._round = int(state["round"])
            self._latency_sum = float(state["latency_sum"])
            self._rho_sum = float(state["rho_sum"])
            self._floor_sum = float(state.get("floor_sum", 0.0))
            self.over_budget_rounds = int(state.get("over_budget_rounds", 0))
            self.outage_total = int(state.get("outage_total", 0))
            self.scheduled_total = int(state.get("scheduled_total", 0))
            self.history = _History([float(x) for x in state["rho"]],
                                    [float(x) for x in state["latency"]],
                                    [float(x) for x in state["queue_history"]])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"controller state: malformed checkpoint ({exc})") from exc
        self._pending = None


class OSFAController(TSFAController):
    """One-stage baseline (Sec. V-B): the same online stage at a user-fixed rank, no offline."""

    mode = "osfa"
