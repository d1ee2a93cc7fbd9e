"""FedLoDrop baseline: random whole rank components (plus one random partial row) from a seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedsoft.compression.sparsifiers.base import (
    SeededMaskSparsifier,
    check_mask_args,
    seed_generator,
)

__all__ = ["FedLoDropSparsifier", "mask_from_seed"]


def mask_from_seed(r: int, d: int, k: int, keep: int, seed: int) -> Tensor:
    """Bool (r, d+k) CPU mask: m = keep // (d+k) random whole rows plus, when keep is not a
    multiple of d+k, ``keep - m(d+k)`` random positions of one more random row; a pure
    function of the arguments (positions cost 0 bits in eq. 6).
    """
    n = check_mask_args(r, d, k, keep)
    gen = seed_generator(seed)
    m, rem = divmod(keep, n)
    perm = torch.randperm(r, generator=gen)
    mask = torch.zeros(r, n, dtype=torch.bool)
    mask[perm[:m]] = True
    if rem:
        mask[perm[m], torch.randperm(n, generator=gen)[:rem]] = True
    return mask


@dataclass(frozen=True)
class FedLoDropSparsifier(SeededMaskSparsifier):
    """Random rank-component dropout with an exact budget (S(.) in eq. 10); ``ref`` unused."""

    name: ClassVar[str] = "fedlodrop"

    def mask_from_seed(self, r: int, d: int, k: int, keep: int, seed: int) -> Tensor:
        """See :func:`mask_from_seed`."""
        return mask_from_seed(r, d, k, keep, seed)
