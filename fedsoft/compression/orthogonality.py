"""SOFT orthogonality penalty (eq. 7) and the off-diagonal Gram-energy diagnostic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["gram_matrices", "orth_offdiag", "orth_penalty"]


def gram_matrices(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``(A A^T, B^T B)``, both r x r, for LoRA factors A (r x k) and B (d x r) (eq. 7)."""
    for name, x in (("A", A), ("B", B)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"A rows (rank) {A.shape[0]} != B columns (rank) {B.shape[1]}: "
            f"A shape {tuple(A.shape)}, B shape {tuple(B.shape)}"
        )
    return A @ A.T, B.T @ B


def _offdiag_sq(g: Tensor) -> Tensor:
    return (g**2).sum() - (torch.diagonal(g) ** 2).sum()


def orth_penalty(A: Tensor, B: Tensor) -> Tensor:
    """Eq. (7) penalty ``||AA^T - diag(AA^T)||_F^2 + ||B^TB - diag(B^TB)||_F^2`` (differentiable).

    The loss of eq. (7) is ``task_loss + zeta * sum over layers of orth_penalty(A, B)``.
    """
    ga, gb = gram_matrices(A, B)
    off_a = ga - torch.diag_embed(torch.diagonal(ga))
    off_b = gb - torch.diag_embed(torch.diagonal(gb))
    return (off_a**2).sum() + (off_b**2).sum()


def orth_offdiag(pairs: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Off-diagonal energy / total energy of both Gram matrices of eq. (7), summed over layers.

    ``pairs`` is a sequence of ``(A, B)``. 0 for exactly orthogonal factors, in [0, 1]; 0 when
    every Gram matrix is zero.
    """
    if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], Tensor):
        raise TypeError("pairs must be a sequence of (A, B) tuples, got a single (A, B) tuple")
    if len(pairs) == 0:
        raise ValueError("pairs must contain at least one (A, B) pair, got 0")
    off = 0.0
    total = 0.0
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            if len(pair) != 2:
                raise ValueError(f"pairs[{i}] must be an (A, B) pair, got length {len(pair)}")
            ga, gb = gram_matrices(*pair)
            for g in (ga.double(), gb.double()):
                if not bool(torch.isfinite(g).all()):
                    raise ValueError(f"pairs[{i}] gives non-finite Gram matrices")
                off += float(_offdiag_sq(g).clamp(min=0))
                total += float((g**2).sum())
    return off / total if total > 0 else 0.0
