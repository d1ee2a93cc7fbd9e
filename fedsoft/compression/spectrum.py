"""How well SOFT's per-rank scores (eq. 8) track the spectrum of B A, and kept-energy ratios."""

from __future__ import annotations

import torch
from torch import Tensor

from fedsoft.compression.sparsifiers import SPARSIFIERS, Sparsifier, get_sparsifier
from fedsoft.compression.sparsifiers.base import check_sparsify_args, from_rows, to_rows
from fedsoft.compression.sparsifiers.soft import rank_scores

__all__ = [
    "kept_energy_ratio",
    "kept_product_rel_err",
    "product_energy",
    "soft_scores",
    "svd_proxy_rel_err",
]


def soft_scores(A: Tensor, B: Tensor) -> Tensor:
    """SOFT scores ``s_j = ||b_j|| ||a_j||`` (eq. 8) of A (r x k), B (d x r); shape (r,)."""
    rows = to_rows(A, B)
    return rank_scores(rows, B.shape[0])


def svd_proxy_rel_err(A: Tensor, B: Tensor) -> float:
    """``||sort_desc(s) - sigma_{1..r}(B A)||_2 / ||sigma_{1..r}(B A)||_2`` (eq. 8 proxy quality).

    Singular values beyond ``min(d, k)`` count as 0. Returns 0.0 when both vectors are zero and
    ``inf`` when only the singular values are zero.
    """
    with torch.no_grad():
        s = torch.sort(soft_scores(A, B).double(), descending=True).values
        sig = torch.linalg.svdvals(B.double() @ A.double())
        r = s.numel()
        top = torch.zeros(r, dtype=torch.float64)
        m = min(r, sig.numel())
        top[:m] = sig[:m].cpu()
        num = float(torch.linalg.vector_norm(s.cpu() - top))
        den = float(torch.linalg.vector_norm(top))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def product_energy(rows: Tensor, d: int) -> float:
    """``||B A||_F^2`` of the factors stored in rank rows (eq. 8's left side), as
    ``sum((A A^T) * (B^T B))`` = trace(A A^T B^T B): O((d + k) r^2), B A is never formed."""
    A, B = from_rows(rows, d)
    A, B = A.double(), B.double()
    return float(((A @ A.T) * (B.T @ B)).sum().clamp(min=0.0))


def kept_energy_ratio(
    rows: Tensor, d: int, keep: int, sparsifier: str | Sparsifier = "soft", *, seed: int = 0,
    ref: Tensor | None = None, sent: Tensor | None = None,
) -> float:
    """``||B_hat A_hat||_F^2`` of the kept factors from ``sparsifier`` / the svd oracle's at the
    same budget (best rank-m approximation energy). 1.0 means the oracle's quality.

    ``ref`` is the sparsifier's score reference (SOFT scores the local factors, eq. 8, when it
    sparsifies an update); ``sent`` are the rows that were actually transmitted (e.g. after
    quantisation): when given they are the numerator and ``sparsifier`` is not called again.

    The ratio is not bounded by 1: partially kept rank rows are no longer orthogonal, and for
    non-orthogonal factors cancelling components can be dropped, so the kept product can carry
    more energy than the best rank-m approximation; see :func:`kept_product_rel_err` for the
    approximation error. Returns 1.0 when both energies are 0 and ``inf`` when only the
    oracle's is.
    """
    check_sparsify_args(rows, d, keep)
    sp = get_sparsifier(sparsifier) if isinstance(sparsifier, str) else sparsifier
    with torch.no_grad():
        kept = sent if sent is not None else sp(rows, d, keep, ref=ref, seed=seed).values
        num = product_energy(kept, d)
        den = product_energy(SPARSIFIERS["svd"](rows, d, keep).values, d)
    if den == 0.0:
        return 1.0 if num == 0.0 else float("inf")
    return num / den


def kept_product_rel_err(
    rows: Tensor, d: int, keep: int, sparsifier: str | Sparsifier = "soft", *, seed: int = 0
) -> float:
    """``||B A - B_hat A_hat||_F / ||B A||_F`` for the kept factors of ``sparsifier`` (0 if B A = 0
    and the kept product is 0, ``inf`` if only B A = 0). The svd oracle minimises it over
    whole-component budgets (Eckart-Young).
    """
    check_sparsify_args(rows, d, keep)
    sp = get_sparsifier(sparsifier) if isinstance(sparsifier, str) else sparsifier
    with torch.no_grad():
        A, B = from_rows(rows, d)
        Ah, Bh = from_rows(sp(rows, d, keep, seed=seed).values, d)
        full = B.double() @ A.double()
        num = float(torch.linalg.matrix_norm(full - Bh.double() @ Ah.double()))
        den = float(torch.linalg.matrix_norm(full))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den
