"""Covariance between clients' LoRA factors lost by separate averaging (eqs. 20-22)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["cov_fro", "cov_matrix"]


def _normalised_weights(weights: Sequence[float] | Tensor, n: int) -> Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != n:
        raise ValueError(f"weights must have one entry per client ({n}), got {w.numel()}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    if float(w.sum()) <= 0:
        raise ValueError(f"weights must have a positive sum, got {w.tolist()}")
    return w / w.sum()


def cov_matrix(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float] | Tensor
) -> Tensor:
    """``Cov(B, A) = sum_i p_i B_i A_i - (sum_i p_i B_i)(sum_i p_i A_i)`` (eqs. 20-22), d x k.

    Computed in float64 in the centred form ``sum_i p_i (B_i - B_bar)(A_i - A_bar)`` (eq. 21),
    which is free of cancellation; ``weights`` are normalised to sum to 1.
    """
    if len(As) != len(Bs):
        raise ValueError(f"As and Bs must have the same length, got {len(As)} and {len(Bs)}")
    if len(As) == 0:
        raise ValueError("As must contain at least one client, got 0")
    p = _normalised_weights(weights, len(As))
    a0, b0 = As[0], Bs[0]
    for i, (a, b) in enumerate(zip(As, Bs, strict=True)):
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            raise TypeError(f"As[{i}] and Bs[{i}] must be torch.Tensor")
        if a.shape != a0.shape or b.shape != b0.shape:
            raise ValueError(
                f"client {i} shapes A {tuple(a.shape)}, B {tuple(b.shape)} differ from client 0 "
                f"A {tuple(a0.shape)}, B {tuple(b0.shape)}"
            )
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"As[{i}] must be r x k and Bs[{i}] d x r, got {tuple(a.shape)}, {tuple(b.shape)}"
            )
        if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
            raise ValueError(f"As[{i}] or Bs[{i}] contains non-finite values")
    with torch.no_grad():
        a_stack = torch.stack([a.detach().double().cpu() for a in As])  # (n, r, k)
        b_stack = torch.stack([b.detach().double().cpu() for b in Bs])  # (n, d, r)
        ac = a_stack - torch.einsum("i,irk->rk", p, a_stack)
        bc = b_stack - torch.einsum("i,idr->dr", p, b_stack)
        return torch.einsum("i,idr,irk->dk", p, bc, ac)


def cov_fro(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float] | Tensor) -> float:
    """``||Cov(B, A)||_F`` of eq. (22): the gap between the ideal average ``sum p_i B_i A_i`` and
    the product of the separately averaged factors (eq. 5). 0 when all clients are equal.
    """
    return float(torch.linalg.matrix_norm(cov_matrix(As, Bs, weights)))
