"""TSFA offline stage of paper A: rank choice by P2 / Lemma 2 (eqs. 25-29) and bound calibration."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedsoft.wireless.arguments import pos_int as _pos_int
from fedsoft.wireless.arguments import positive as _positive
from fedsoft.wireless.arguments import real as _real
from fedsoft.wireless.arguments import rho_range as _rho_range
from fedsoft.wireless.bound import BoundConstants
from fedsoft.wireless.channel import Channel

__all__ = [
    "InfeasibleLatencyError",
    "RankOption",
    "OfflineResult",
    "Calibration",
    "nominal_inv_gamma_sum",
    "nominal_weights",
    "nominal_seconds_per_bit",
    "budget_rho",
    "rho_star",
    "choose_rank",
    "choose_rank_for_channel",
    "calibrate",
]


class InfeasibleLatencyError(ValueError):
    """Raised when no candidate rank meets the latency budget with rho <= rho_max.

    ``min_budget_s`` is the smallest feasible budget in seconds (smallest nominal delay: the
    smallest rank at rho_max), so callers can restate it in their own units.
    """

    def __init__(self, message: str, min_budget_s: float = float("nan")) -> None:
        super().__init__(message)
        self.min_budget_s = float(min_budget_s)


def nominal_weights(
    mean_spectral_eff: object,
    num_scheduled: int,
    mode: Literal["scaled", "representative"] = "scaled",
    representatives: Sequence[int] | None = None,
) -> np.ndarray:
    """Weights w_i of the offline nominal scheduled set (A.10): K/N for every client
    (``scaled``) or 1 on K representative clients (``representative``, see
    :func:`nominal_inv_gamma_sum`); S = sum_i w_i / Gamma_bar_i with the paper's noise."""
    g = np.asarray(mean_spectral_eff, dtype=np.float64)
    if g.ndim != 1 or g.size == 0:
        raise ValueError(f"mean_spectral_eff must be a non-empty 1-D array, got shape {g.shape}")
    if not np.all(np.isfinite(g)) or np.any(g <= 0.0):
        raise ValueError(f"mean_spectral_eff must be finite and > 0, got {mean_spectral_eff!r}")
    k = _pos_int("num_scheduled", num_scheduled)
    n = g.size
    if k > n:
        raise ValueError(f"num_scheduled must be <= number of clients {n}, got {num_scheduled!r}")
    if mode == "scaled":
        return np.full(n, k / n)
    if mode != "representative":
        raise ValueError(f"mode must be 'scaled' or 'representative', got {mode!r}")
    if representatives is None:
        order = np.argsort(g)
        idx = order[np.round(np.linspace(0, n - 1, k)).astype(int)]
    else:
        idx = np.asarray(representatives)
        if idx.ndim != 1 or idx.size != k or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(
                f"representatives must be {k} integer indices, got {representatives!r}"
            )
        if np.any(idx < 0) or np.any(idx >= n) or np.unique(idx).size != k:
            raise ValueError(f"representatives must be distinct indices in [0, {n}), got {idx!r}")
    w = np.zeros(n)
    w[idx] = 1.0
    return w


def nominal_inv_gamma_sum(
    mean_spectral_eff: object,
    num_scheduled: int,
    mode: Literal["scaled", "representative"] = "scaled",
    representatives: Sequence[int] | None = None,
) -> float:
    """Nominal S = sum_{j in K} 1/Gamma_bar_j of the offline scheduled set (A.10, eq. 25c).

    The paper leaves the nominal set open; two options (PROPOSED-L):

    * ``"scaled"`` (default): all N clients scaled by K/N, S = (K/N) sum_i 1/Gamma_bar_i. This is
      exactly E[S] when K of the N clients are sampled uniformly each round.
    * ``"representative"``: K representative clients. With ``representatives`` given, those
      indices; otherwise the K clients at evenly spaced quantiles of the sorted Gamma_bar.

    ``mean_spectral_eff`` are Gamma_bar_i = log2(1 + P D_i^-kappa / sigma^2) of all N clients.
    """
    w = nominal_weights(mean_spectral_eff, num_scheduled, mode, representatives)
    g = np.asarray(mean_spectral_eff, dtype=np.float64)
    if mode == "scaled":
        return float(num_scheduled / g.size * np.sum(1.0 / g))
    return float(np.sum(1.0 / g[w > 0]))


def nominal_seconds_per_bit(
    channel: Channel,
    num_scheduled: int,
    mode: Literal["scaled", "representative"] = "scaled",
    representatives: Sequence[int] | None = None,
) -> tuple[float, float]:
    """(S, S / B_tot) of the nominal channel (eq. 25c): mean gains, the nominal set's weights
    and the channel's noise model (equal-finish shares; with ``total`` noise S is eq. 29's
    sum_j 1/Gamma_bar_j), so a common payload of ``bits`` takes bits S / B_tot seconds."""
    if not isinstance(channel, Channel):
        raise TypeError(f"channel must be a Channel, got {type(channel).__name__}")
    gains = channel.mean_gains()
    w = nominal_weights(channel.spectral_eff(gains), num_scheduled, mode, representatives)
    s, _ = channel.plan_shares(gains, w)
    return s, s / channel.config.bandwidth_hz


def budget_rho(payload_bits: Callable[[float], float], T_bar: float, seconds_per_bit: float,
               rho_min: float = 0.0, rho_max: float = 0.99) -> float:
    """Smallest rho in [rho_min, rho_max] whose nominal delay payload_bits(rho) S / B_tot meets
    T_bar (Lemma 2 / eq. 29 for any non-increasing payload); just above rho_max if none."""
    lo, hi = _rho_range(rho_min, rho_max)
    per_bit = _positive("seconds_per_bit", seconds_per_bit)
    return _rho_star_payload(lambda x: float(payload_bits(x)) * per_bit,
                             _positive("T_bar", T_bar), lo, hi)


def _nominal_delay(rho: float, rank: int, d_plus_k_total: int, q: int, s: float, b: float) -> float:
    return (1.0 - rho) * rank * d_plus_k_total * q * s / b


def rho_star(
    rank: int,
    *,
    d_plus_k_total: int,
    q: int,
    T_bar: float,
    bandwidth_hz: float,
    inv_gamma_sum: float,
    rho_min: float = 0.0,
) -> float:
    """Lemma 2, eq. (29): rho*(r) = max{rho_min, 1 - T_bar B_tot / (r (d+k) q sum_j 1/Gamma_bar_j)}.

    The smallest rho meeting the nominal delay constraint (25c) with equalised delays (27)-(28);
    Phi is increasing in rho so this is the optimum of P2 for a fixed rank. The value is not
    capped at rho_max (``choose_rank`` marks ranks with rho* > rho_max infeasible).
    """
    r = _pos_int("rank", rank)
    dk = _pos_int("d_plus_k_total", d_plus_k_total)
    qq = _pos_int("q", q)
    tb = _positive("T_bar", T_bar)
    bw = _positive("bandwidth_hz", bandwidth_hz)
    s = _positive("inv_gamma_sum", inv_gamma_sum)
    lo = _real("rho_min", rho_min)
    if not 0.0 <= lo < 1.0:
        raise ValueError(f"rho_min must lie in [0, 1), got {rho_min!r}")
    return max(lo, 1.0 - tb * bw / (r * dk * qq * s))


def _rho_star_payload(delay: Callable[[float], float], T_bar: float, lo: float,
                      hi: float) -> float:
    """Smallest rho in [lo, hi] with delay(rho) <= T_bar (delay non-increasing); > hi if none."""
    if delay(lo) <= T_bar:
        return lo
    if delay(hi) > T_bar:
        return min(1.0 - 1e-9, hi + 1e-6)  # infeasible marker just above rho_max
    a, b = lo, hi
    for _ in range(100):
        mid = 0.5 * (a + b)
        if delay(mid) <= T_bar:
            b = mid
        else:
            a = mid
        if b - a < 1e-12:
            break
    return b


@dataclass(frozen=True)
class RankOption:
    """Offline table row: rank r, rho*(r) (eq. 29), Phi^0(r, rho*), feasibility, nominal delay."""

    rank: int
    rho: float
    phi0: float
    feasible: bool
    nominal_delay: float


@dataclass(frozen=True)
class OfflineResult:
    """Outcome of the offline stage: table r -> RankOption and the chosen rank r* (argmin Phi^0)."""

    table: dict[int, RankOption]
    r_star: int
    rho0: float
    phi0: float
    inv_gamma_sum: float
    T_bar: float


def choose_rank(
    ranks: Sequence[int],
    bound: BoundConstants,
    *,
    d_plus_k_total: int,
    q: int,
    T_bar: float,
    bandwidth_hz: float,
    inv_gamma_sum: float,
    rho_min: float = 0.0,
    rho_max: float = 0.99,
    payload_bits: Callable[[int, float], float] | None = None,
) -> OfflineResult:
    """Exhaustive offline rank search of P2 (eqs. 25-29, A.10).

    For every candidate r: rho*(r) by eq. (29); r is infeasible when rho*(r) > rho_max; otherwise
    J(r) = Phi^0(r, rho*(r)) (A.8 surrogate). r* = argmin over feasible r (smallest r on ties).
    ``d_plus_k_total`` is sum over adapted layers of (d_l + k_l), so the payload is r (d+k) q.
    With ``payload_bits(r, rho)`` (the real encoded size of one client's upload, positions and
    dense head included, non-increasing in rho) rho*(r) is instead the smallest rho whose
    nominal delay payload_bits(r, rho) S / B_tot meets T_bar (bisection; eq. 29 is the
    values-only special case).

    Raises:
        InfeasibleLatencyError: every candidate rank needs rho > rho_max; the message names
            T_bar and the smallest achievable nominal delay (smallest rank at rho_max).
    """
    if not isinstance(bound, BoundConstants):
        raise TypeError(f"bound must be a BoundConstants, got {type(bound).__name__}")
    cand = [_pos_int(f"ranks[{i}]", r) for i, r in enumerate(ranks)]
    if not cand:
        raise ValueError(f"ranks must be non-empty, got {ranks!r}")
    if len(set(cand)) != len(cand):
        raise ValueError(f"ranks must be distinct, got {ranks!r}")
    lo, hi = _rho_range(rho_min, rho_max)
    dk = _pos_int("d_plus_k_total", d_plus_k_total)
    qq = _pos_int("q", q)
    tb = _positive("T_bar", T_bar)
    bw = _positive("bandwidth_hz", bandwidth_hz)
    s = _positive("inv_gamma_sum", inv_gamma_sum)
    table: dict[int, RankOption] = {}
    def delay(rho: float, r: int) -> float:
        if payload_bits is None:
            return _nominal_delay(rho, r, dk, qq, s, bw)
        return float(payload_bits(r, rho)) * s / bw

    for r in sorted(cand):
        if payload_bits is None:
            rho = rho_star(
                r, d_plus_k_total=dk, q=qq, T_bar=tb, bandwidth_hz=bw, inv_gamma_sum=s,
                rho_min=lo,
            )
        else:
            rho = _rho_star_payload(lambda x, r=r: delay(x, r), tb, lo, hi)
        feasible = rho <= hi
        phi0 = float(bound.value(r, min(rho, 1.0 - 1e-12)))
        table[r] = RankOption(r, rho, phi0, feasible, delay(min(rho, hi), r))
    feasible_rows = [row for row in table.values() if row.feasible]
    if not feasible_rows:
        r_min = min(cand)
        best = delay(hi, r_min)
        raise InfeasibleLatencyError(
            f"every candidate rank {sorted(cand)} is infeasible for latency budget T_bar={tb!r} s: "
            f"the smallest achievable nominal delay is {best!r} s (rank {r_min} at "
            f"rho_max={hi!r}), the smallest feasible budget",
            best,
        )
    best_row = min(feasible_rows, key=lambda row: (row.phi0, row.rank))
    return OfflineResult(table, best_row.rank, best_row.rho, best_row.phi0, s, tb)


def choose_rank_for_channel(
    channel: Channel,
    num_scheduled: int,
    ranks: Sequence[int],
    bound: BoundConstants,
    *,
    d_plus_k_total: int,
    T_bar: float,
    rho_min: float = 0.0,
    rho_max: float = 0.99,
    nominal: Literal["scaled", "representative"] = "scaled",
    representatives: Sequence[int] | None = None,
    payload_bits: Callable[[int, float], float] | None = None,
) -> OfflineResult:
    """``choose_rank`` with S from the channel's mean gains (average channel, A.10) and its noise
    model (:func:`nominal_seconds_per_bit`)."""
    if not isinstance(channel, Channel):
        raise TypeError(f"channel must be a Channel, got {type(channel).__name__}")
    cfg = channel.config
    s, _ = nominal_seconds_per_bit(channel, num_scheduled, nominal, representatives)
    return choose_rank(
        ranks,
        bound,
        d_plus_k_total=d_plus_k_total,
        q=cfg.bits_per_value,
        T_bar=T_bar,
        bandwidth_hz=cfg.bandwidth_hz,
        inv_gamma_sum=s,
        rho_min=rho_min,
        rho_max=rho_max,
        payload_bits=payload_bits,
    )


@dataclass(frozen=True)
class Calibration:
    """sigma_bar[r-1] for r = 1..pilot_rank and sigma_max estimated from a pilot run."""

    sigma_bar: np.ndarray
    sigma_max: float
    num_rounds: int
    pilot_rank: int


def calibrate(
    scores_per_round: Sequence[np.ndarray], aggregate: Literal["mean", "max"] = "mean"
) -> Calibration:
    """Estimate sigma_bar_r (eq. 19) and sigma_max (Assumption 6) from SOFT per-rank scores.

    How: run a short pilot with a rank r_pilot >= the largest candidate rank and record, each
    round, the per-rank SOFT scores s_j = ||b_j|| ||a_j|| (A.5). Each entry of
    ``scores_per_round`` is a 1-D array (r_pilot,) or a 2-D array (rows, r_pilot) whose rows are,
    e.g., clients or adapted layers. Every row is sorted in descending order, so column r-1 holds
    the r-th largest score (the r-th surrogate singular value, which A.7 takes as the proxy
    sigma_bar_r ~ min_{j<=r} s_j). sigma_bar[r-1] is that column averaged over all rows and
    rounds (``aggregate="mean"``) or its maximum (``"max"``, the 'sup over t' reading).
    sigma_max is the largest score seen anywhere. This uses one pilot rank for every candidate r
    (an approximation: a rank-r run may spread its energy differently).
    """
    if aggregate not in ("mean", "max"):
        raise ValueError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
    if isinstance(scores_per_round, np.ndarray) and scores_per_round.ndim == 1:
        raise ValueError(
            "scores_per_round must be a sequence of per-round arrays, got one 1-D array"
        )
    rows: list[np.ndarray] = []
    width: int | None = None
    for t, scores in enumerate(scores_per_round):
        a = np.asarray(scores, dtype=np.float64)
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[1] == 0 or a.shape[0] == 0:
            raise ValueError(
                f"scores_per_round[{t}] must be 1-D or 2-D and non-empty, got shape {a.shape}"
            )
        if not np.all(np.isfinite(a)) or np.any(a < 0.0):
            raise ValueError(f"scores_per_round[{t}] must be finite and >= 0, got {scores!r}")
        if width is None:
            width = a.shape[1]
        elif a.shape[1] != width:
            raise ValueError(
                f"scores_per_round[{t}] has {a.shape[1]} ranks, expected {width} (same pilot rank)"
            )
        rows.append(-np.sort(-a, axis=1))
    if not rows or width is None:
        raise ValueError("scores_per_round must contain at least one round")
    stacked = np.concatenate(rows, axis=0)
    sigma_bar = stacked.mean(axis=0) if aggregate == "mean" else stacked.max(axis=0)
    return Calibration(sigma_bar, float(stacked.max()), len(rows), width)
