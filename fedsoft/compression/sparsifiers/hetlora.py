"""HetLoRA baseline: keep the lowest rank indices (whole rows), exact budget via a partial row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedsoft.compression.sparsifiers.base import (
    SparseRows,
    check_seed,
    check_sparsify_args,
    rowwise_topk_mask,
    select,
)

__all__ = ["HetLoRASparsifier", "prefix_counts"]


def prefix_counts(r: int, n: int, keep: int) -> Tensor:
    """Per-row counts ``[n]*m + [keep - m n] + [0]*...`` with ``m = keep // n`` (long, CPU)."""
    m, rem = divmod(keep, n)
    counts = torch.zeros(r, dtype=torch.long)
    counts[:m] = n
    if m < r:
        counts[m] = rem
    return counts


@dataclass(frozen=True)
class HetLoRASparsifier:
    """Rows 0..m-1 whole (m = keep // (d+k)) plus the top-magnitude rest of row m (eq. 10's S)."""

    name: ClassVar[str] = "hetlora"
    positions_from_seed: ClassVar[bool] = False
    # rows above the client's rank are never sent: no error memory for them (it would grow
    # without bound, ErrorFeedback.step(sent_rows_only=True))
    memory_sent_rows_only: ClassVar[bool] = True

    def __call__(
        self, rows: Tensor, d: int, keep: int, *, ref: Tensor | None = None, seed: int = 0
    ) -> SparseRows:
        r, _, n = check_sparsify_args(rows, d, keep, ref)
        check_seed(seed)
        return select(rows, rowwise_topk_mask(rows.abs(), prefix_counts(r, n, keep)))
