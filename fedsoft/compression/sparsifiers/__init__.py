"""Sparsifiers of paper A (SOFT and baselines) acting on LoRA rank rows, with a name registry."""

from __future__ import annotations

from typing import Any

from fedsoft.compression.sparsifiers.base import (
    SeededSparsifier,
    SparseRows,
    Sparsifier,
    from_rows,
    keep_count,
    to_rows,
)
from fedsoft.compression.sparsifiers.dense import DenseSparsifier
from fedsoft.compression.sparsifiers.fedlodrop import FedLoDropSparsifier
from fedsoft.compression.sparsifiers.flasc import FlascSparsifier
from fedsoft.compression.sparsifiers.hetlora import HetLoRASparsifier
from fedsoft.compression.sparsifiers.rlora import RLoRASparsifier
from fedsoft.compression.sparsifiers.soft import SoftSparsifier, allocate_budget, rank_scores
from fedsoft.compression.sparsifiers.svd import SVDSparsifier

__all__ = [
    "SPARSIFIERS",
    "DenseSparsifier",
    "FedLoDropSparsifier",
    "FlascSparsifier",
    "HetLoRASparsifier",
    "RLoRASparsifier",
    "SVDSparsifier",
    "SeededSparsifier",
    "SoftSparsifier",
    "SparseRows",
    "Sparsifier",
    "allocate_budget",
    "from_rows",
    "get_sparsifier",
    "keep_count",
    "rank_scores",
    "to_rows",
]

SPARSIFIERS: dict[str, Sparsifier] = {
    s.name: s
    for s in (
        SoftSparsifier(),
        FlascSparsifier(),
        RLoRASparsifier(),
        HetLoRASparsifier(),
        FedLoDropSparsifier(),
        DenseSparsifier(),
        SVDSparsifier(),
    )
}


def get_sparsifier(name: str, **options: Any) -> Sparsifier:
    """Sparsifier registered as ``name``; ``options`` (e.g. ``split="ab"`` for SOFT) build a
    configured instance of the same class.
    """
    if not isinstance(name, str) or name not in SPARSIFIERS:
        raise ValueError(f"sparsifier name must be one of {sorted(SPARSIFIERS)}, got {name!r}")
    if not options:
        return SPARSIFIERS[name]
    try:
        return type(SPARSIFIERS[name])(**options)
    except TypeError as exc:
        raise ValueError(f"bad options {sorted(options)} for sparsifier {name!r}: {exc}") from exc
