"""FLASC baseline: global top-``keep`` entries by magnitude over all rank rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedsoft.compression.sparsifiers.base import SparseRows, check_seed, check_sparsify_args, select

__all__ = ["FlascSparsifier"]


@dataclass(frozen=True)
class FlascSparsifier:
    """Top-``keep`` magnitude over the whole (r, d+k) rows (S(.) of eq. 10); ``ref`` unused."""

    name: ClassVar[str] = "flasc"
    positions_from_seed: ClassVar[bool] = False

    def __call__(
        self, rows: Tensor, d: int, keep: int, *, ref: Tensor | None = None, seed: int = 0
    ) -> SparseRows:
        check_sparsify_args(rows, d, keep, ref)
        check_seed(seed)
        flat = rows.abs().reshape(-1)
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=rows.device)
        if keep:
            mask[torch.topk(flat, keep, largest=True, sorted=False).indices] = True
        return select(rows, mask.reshape(rows.shape))
