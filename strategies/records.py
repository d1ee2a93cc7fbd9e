"""Conversions between Flower records and the numpy dicts fedsoft works on."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> {name: ndarray} (key order kept)."""
    return {key: arr.numpy() for key, arr in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """{name: ndarray} -> ArrayRecord (key order kept)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(val)) for key, val in arrays.items()})
