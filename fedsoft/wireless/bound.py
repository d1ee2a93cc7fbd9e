"""Implementable surrogate Phi(r, rho) of paper A's Theorem-1 bound (A.8, eq. 23)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BoundConstants", "sparsification_term"]


def _check_nonneg(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if not math.isfinite(out) or out < 0.0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return out


def _check_rho(rho: object) -> np.ndarray:
    arr = np.asarray(rho, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"rho must be finite, got {rho!r}")
    if np.any(arr < 0.0) or np.any(arr >= 1.0):
        raise ValueError(f"rho must lie in [0, 1), got {rho!r}")
    return arr


def sparsification_term(rho: object, p: int = 1, order: int = 0) -> np.ndarray | float:
    """f(rho)^p with f = rho/(1-rho)^2 (term iv of eq. 23) or its 1st/2nd rho-derivative.

    f' = (1+rho)/(1-rho)^3 and f'' = 2(2+rho)/(1-rho)^4 (cf. eq. 40); for p = 2 the chain rule
    gives (f^2)' = 2 f f' and (f^2)'' = 2 f'^2 + 2 f f''.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    if order not in (0, 1, 2):
        raise ValueError(f"order must be 0, 1 or 2, got {order!r}")
    x = _check_rho(rho)
    one_m = 1.0 - x
    f = x / one_m**2
    f1 = (1.0 + x) / one_m**3
    f2 = 2.0 * (2.0 + x) / one_m**4
    if p == 1:
        out = (f, f1, f2)[order]
    else:
        out = (f * f, 2.0 * f * f1, 2.0 * f1 * f1 + 2.0 * f * f2)[order]
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True, eq=False)
class BoundConstants:
    """Constants of the surrogate bound (A.8, 'implementable surrogate' of eq. 23).

    Phi(r, rho) = kappa_R max(R* - r, 0) sigma_bar_r^2 + kappa_S + kappa_C r sigma_max^2
                  + kappa_E (rho / (1 - rho)^2)^p

    Attributes:
        kappa_R: weight of the rank/approximation error, term (i) (2 L^2 c_r in eq. 23).
        kappa_S: constant partial-participation term (ii) (may also absorb Delta_0 of eq. 25a).
        kappa_C: weight of the covariance term (iii) (6 L^2 (alpha/r)^2 C in eq. 23).
        kappa_E: weight of the sparsification term (iv).
        r_star_ideal: R*, rank of the ideal LoRA update (Assumption 2, eq. 19). The rank term
            is clamped at zero for r >= R* (Eckart-Young: no truncation error left).
        sigma_bar: sigma_bar_r, scalar (same for every r) or 1-D array with sigma_bar[r-1] for
            rank r (e.g. from ``fedsoft.wireless.offline_rank.calibrate``).
        sigma_max: upper bound on the singular values of the LoRA update (Assumption 6).
        p: exponent of rho/(1-rho)^2 in term (iv): 1 (default, eq. 40 form) or 2 (conservative).
            PROPOSED-L.
    """

    kappa_R: float = 1.0
    kappa_S: float = 0.0
    kappa_C: float = 1.0e-3
    kappa_E: float = 1.0
    r_star_ideal: float = 64.0
    sigma_bar: float | np.ndarray = 1.0
    sigma_max: float = 1.0
    p: int = 1
    _sigma_arr: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("kappa_R", "kappa_S", "kappa_C", "kappa_E", "sigma_max"):
            _check_nonneg(name, getattr(self, name))
        if _check_nonneg("r_star_ideal", self.r_star_ideal) < 1.0:
            raise ValueError(f"r_star_ideal must be >= 1, got {self.r_star_ideal!r}")
        if isinstance(self.p, bool) or self.p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {self.p!r}")
        sb = np.array(self.sigma_bar, dtype=np.float64, copy=True)
        if sb.ndim > 1 or sb.size == 0:
            raise ValueError(
                f"sigma_bar must be a scalar or non-empty 1-D array, got {self.sigma_bar!r}"
            )
        if not np.all(np.isfinite(sb)) or np.any(sb < 0.0):
            raise ValueError(f"sigma_bar must be finite and >= 0, got {self.sigma_bar!r}")
        sb.setflags(write=False)
        object.__setattr__(self, "_sigma_arr", sb)

    @property
    def max_rank(self) -> int | None:
        """Largest rank with a sigma_bar value (None when sigma_bar is a scalar)."""
        return None if self._sigma_arr.ndim == 0 else int(self._sigma_arr.size)

    def sigma_bar_at(self, rank: int) -> float:
        """sigma_bar_r used in term (i) for the given rank."""
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if self._sigma_arr.ndim == 0:
            return float(self._sigma_arr)
        if rank > self._sigma_arr.size:
            raise ValueError(
                f"rank={rank} exceeds the {self._sigma_arr.size} per-rank sigma_bar values given"
            )
        return float(self._sigma_arr[rank - 1])

    def rank_terms(self, rank: int) -> float:
        """rho-independent part: terms (i) + (ii) + (iii) of eq. (23) at rank r."""
        sb = self.sigma_bar_at(rank)
        gap = max(self.r_star_ideal - rank, 0.0)
        return self.kappa_R * gap * sb**2 + self.kappa_S + self.kappa_C * rank * self.sigma_max**2

    def value(self, rank: int, rho: object) -> np.ndarray | float:
        """Phi(r, rho) (A.8 surrogate of eq. 23); vectorised over rho in [0, 1)."""
        return self.rank_terms(rank) + self.kappa_E * sparsification_term(rho, self.p, 0)

    def d_rho(self, rho: object) -> np.ndarray | float:
        """dPhi/drho = kappa_E d/drho (rho/(1-rho)^2)^p (independent of r)."""
        return self.kappa_E * sparsification_term(rho, self.p, 1)

    def d2_rho(self, rho: object) -> np.ndarray | float:
        """d^2 Phi/drho^2 (> 0 on [0, 1) when kappa_E > 0, cf. eq. 40)."""
        return self.kappa_E * sparsification_term(rho, self.p, 2)
