"""Independent client sampling (paper B, B.1/B.3): Bernoulli(q_n) per client, 1/q_n weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["check_probabilities", "sample_independent", "unbiased_update"]


def check_probabilities(q: Sequence[float] | np.ndarray, name: str = "q") -> np.ndarray:
    """``q`` as a float array with every entry in (0, 1]."""
    arr = np.asarray(q, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0.0) or np.any(arr > 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {arr.tolist()}")
    return arr


def sample_independent(q: Sequence[float] | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices n with I_n = 1, I_n ~ Bernoulli(q_n) independently (may be empty)."""
    q = check_probabilities(q)
    return np.flatnonzero(rng.random(q.size) < q)


def unbiased_update(
    global_arrays: Mapping[str, np.ndarray],
    deltas: Sequence[Mapping[str, np.ndarray]],
    data_shares: Sequence[float],
    q: Sequence[float],
    server_lr: float = 1.0,
) -> dict[str, np.ndarray]:
    """X_{r+1} = X_r + eta_s sum_{n in K} (a_n / q_n) Delta_n (B.1; E[I_n/q_n] = 1).

    ``deltas``, ``data_shares`` (a_n, over all N clients, summing to 1) and ``q`` are those of
    the participants that replied. With q = 1 for all and every client replying this is FedAvg
    of the deltas. Computed in float64, returned as float32.
    """
    if not len(deltas) == len(data_shares) == len(q):
        raise ValueError(f"{len(deltas)} deltas, {len(data_shares)} shares, {len(q)} q values")
    qs = check_probabilities(q) if len(q) else np.zeros(0)
    a = np.asarray(data_shares, dtype=np.float64)
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"data_shares must be finite and >= 0, got {a.tolist()}")
    out = {}
    for key, value in global_arrays.items():
        acc = np.asarray(value, dtype=np.float64).copy()
        for w, d in zip(a / qs if len(qs) else [], deltas, strict=True):
            acc += server_lr * w * np.asarray(d[key], dtype=np.float64)
        out[key] = acc.astype(np.float32)
    return out
