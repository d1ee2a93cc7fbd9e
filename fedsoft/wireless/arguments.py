"""Argument checks shared by the channel, bound and controller modules (errors name the field)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["nonneg", "pos_int", "positive", "real", "rho_range"]


def real(name: str, value: object) -> float:
    """``value`` as a finite float; TypeError for non-numbers, ValueError for inf/nan."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def nonneg(name: str, value: object) -> float:
    """Finite float >= 0."""
    out = real(name, value)
    if out < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return out


def positive(name: str, value: object) -> float:
    """Finite float > 0."""
    out = real(name, value)
    if out <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out


def pos_int(name: str, value: object) -> int:
    """Integer >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def rho_range(rho_min: object, rho_max: object) -> tuple[float, float]:
    """(rho_min, rho_max) with 0 <= rho_min <= rho_max < 1 (eq. 39b)."""
    lo = real("rho_min", rho_min)
    hi = real("rho_max", rho_max)
    if not 0.0 <= lo < 1.0:
        raise ValueError(f"rho_min must lie in [0, 1), got {rho_min!r}")
    if not lo <= hi < 1.0:
        raise ValueError(f"rho_max must lie in [rho_min={lo!r}, 1), got {rho_max!r}")
    return lo, hi
