"""RLoRA baseline: ``keep`` uniformly random positions drawn from a shared seed."""

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

__all__ = ["RLoRASparsifier", "mask_from_seed"]


def mask_from_seed(r: int, d: int, k: int, keep: int, seed: int) -> Tensor:
    """Bool (r, d+k) CPU mask with ``keep`` uniformly random positions, a pure function of the args.

    The receiver regenerates the positions from ``seed``, so they cost 0 bits in eq. (6).
    """
    n = check_mask_args(r, d, k, keep)
    gen = seed_generator(seed)
    mask = torch.zeros(r * n, dtype=torch.bool)
    mask[torch.randperm(r * n, generator=gen)[:keep]] = True
    return mask.reshape(r, n)


@dataclass(frozen=True)
class RLoRASparsifier(SeededMaskSparsifier):
    """Random-element sparsifier (S(.) in eq. 10); positions from ``seed``, ``ref`` unused."""

    name: ClassVar[str] = "rlora"

    def mask_from_seed(self, r: int, d: int, k: int, keep: int, seed: int) -> Tensor:
        """See :func:`mask_from_seed`."""
        return mask_from_seed(r, d, k, keep, seed)
