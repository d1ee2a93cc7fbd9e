"""Server aggregation of named LoRA arrays (eq. 5) and validation of client replies."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


class ReplyError(ValueError):
    """A client's reply cannot be aggregated (keys, shapes, dtype, non-finite, weight)."""


@dataclass
class AcceptedReply:
    """One reply that passed every check: what eq. (5) aggregates and what the round logs."""

    node_id: int
    decoded: dict[str, np.ndarray]
    weight: float
    norm: float  # ||x_i - x_global||_2 (the update-norm bound's quantity)
    nbytes: int  # bytes received (ArrayRecord.count_bytes)
    loss: float | None = None
    train_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


def metric_int(metrics: Mapping[str, object], key: str) -> int:
    """A required integer metric of a reply (an integral float is accepted); ReplyError names
    the key otherwise."""
    if key not in metrics:
        raise ReplyError(f"metrics lack {key!r}")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyError(f"metric {key!r} = {value!r}: not a number")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ReplyError(f"metric {key!r} = {value!r}: not an integer")
    return int(value)


def metric_float(metrics: Mapping[str, object], key: str, *, required: bool = True,
                 minimum: float | None = None) -> float | None:
    """A finite float metric of a reply (None when optional and absent); ReplyError names the
    key for a wrong type, a non-finite value or one below ``minimum``."""
    if key not in metrics:
        if required:
            raise ReplyError(f"metrics lack {key!r}")
        return None
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyError(f"metric {key!r} = {value!r}: not a number")
    out = float(value)
    if not math.isfinite(out):
        raise ReplyError(f"metric {key!r} = {value!r}: not finite")
    if minimum is not None and out < minimum:
        raise ReplyError(f"metric {key!r} = {value!r}: must be >= {minimum}")
    return out


def check_like(reference: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray],
               what: str = "arrays") -> None:
    """Raise ReplyError unless ``arrays`` has exactly the keys, shapes and dtypes of
    ``reference`` (the wire dtype) and finite values."""
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        raise ReplyError(f"{what}: missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    for key, ref in reference.items():
        arr = np.asarray(arrays[key])
        if arr.shape != np.shape(ref):
            raise ReplyError(f"{what}['{key}']: shape {arr.shape} != expected {np.shape(ref)}")
        want = np.asarray(ref).dtype
        if arr.dtype != want:
            raise ReplyError(f"{what}['{key}']: dtype {arr.dtype}, expected the wire dtype {want}")
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
    total = float(w.sum())
    if not np.isfinite(total):
        raise ValueError(f"weighted_average: weights sum to {total}")
    w = w / total
    out: dict[str, np.ndarray] = {}
    for key in arrays[0]:
        acc = np.zeros(np.shape(arrays[0][key]), dtype=np.float64)
        for wi, arr in zip(w, arrays, strict=True):
            acc += wi * np.asarray(arr[key], dtype=np.float64)
        out[key] = acc.astype(np.float32)
    return out
