"""Server aggregation of named LoRA arrays (eq. 5) and validation of client replies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


class ReplyError(ValueError):
    """A client's reply cannot be aggregated (keys, shapes, dtype, non-finite, weight)."""


def check_like(reference: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray],
               what: str = "arrays") -> None:
    """Raise ReplyError unless ``arrays`` has exactly the keys and shapes of ``reference``,
    floating dtype and finite values."""
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        raise ReplyError(f"{what}: missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    for key, ref in reference.items():
        arr = np.asarray(arrays[key])
        if arr.shape != np.shape(ref):
            raise ReplyError(f"{what}['{key}']: shape {arr.shape} != expected {np.shape(ref)}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ReplyError(f"{what}['{key}']: dtype {arr.dtype} is not floating point")
        if not np.all(np.isfinite(arr)):
            raise ReplyError(f"{what}['{key}']: contains NaN or Inf")


def check_weight(weight: object, what: str = "num-examples") -> float:
    """A reply's aggregation weight must be a finite number > 0."""
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise ReplyError(f"{what} = {weight!r}: not a number")
    if not np.isfinite(weight) or weight <= 0:
        raise ReplyError(f"{what} = {weight!r}: must be finite and > 0")
    return float(weight)


def weighted_average(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Eq. (5): A = sum_i p~_i A_i, B = sum_i p~_i B_i with p~_i = w_i / sum_j w_j,
    applied to every named array separately (factors are averaged, not their product)."""
    if not arrays:
        raise ValueError("weighted_average: no arrays to aggregate")
    if len(arrays) != len(weights):
        raise ValueError(f"weighted_average: {len(arrays)} arrays but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w <= 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"weighted_average: weights must be finite and > 0, got {w.tolist()}")
    w = w / w.sum()
    out: dict[str, np.ndarray] = {}
    for key in arrays[0]:
        acc = np.zeros(np.shape(arrays[0][key]), dtype=np.float64)
        for wi, arr in zip(w, arrays, strict=True):
            acc += wi * np.asarray(arr[key], dtype=np.float64)
        out[key] = acc.astype(np.float32)
    return out
