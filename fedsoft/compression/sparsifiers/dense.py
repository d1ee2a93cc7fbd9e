"""Dense (ILoRA, no compression) pass-through sparsifier: keeps every entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedsoft.compression.sparsifiers.base import SparseRows, check_seed, check_sparsify_args, select

__all__ = ["DenseSparsifier"]


@dataclass(frozen=True)
class DenseSparsifier:
    """Identity S(.) (rho = 0 in eqs. 6, 10); requires ``keep == r*(d+k)``."""

    name: ClassVar[str] = "dense"
    positions_from_seed: ClassVar[bool] = True  # all positions: nothing to send

    def mask_from_seed(self, r: int, d: int, k: int, keep: int, seed: int) -> Tensor:
        """All-True (r, d+k) mask; ``keep`` must be r*(d+k)."""
        if keep != r * (d + k):
            raise ValueError(f"keep must equal r*(d+k) = {r * (d + k)} for dense, got {keep}")
        check_seed(seed)
        return torch.ones(r, d + k, dtype=torch.bool)

    def __call__(
        self, rows: Tensor, d: int, keep: int, *, ref: Tensor | None = None, seed: int = 0
    ) -> SparseRows:
        r, _, n = check_sparsify_args(rows, d, keep, ref)
        check_seed(seed)
        if keep != r * n:
            raise ValueError(f"keep must equal r*(d+k) = {r * n} for dense, got {keep}")
        return select(rows, torch.ones_like(rows, dtype=torch.bool))
