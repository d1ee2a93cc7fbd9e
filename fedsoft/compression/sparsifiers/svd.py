"""SVD oracle: best rank-m factors of B A (Eckart-Young) as rank rows, with an exact budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedsoft.compression.sparsifiers.base import (
    SparseRows,
    check_seed,
    check_sparsify_args,
    from_rows,
    rowwise_topk_mask,
)
from fedsoft.compression.sparsifiers.hetlora import prefix_counts

__all__ = ["SVDSparsifier", "low_rank_svd", "svd_factor_rows"]


def low_rank_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``B A`` (d x r times r x k) without forming it: with ``B = Q_B R_B`` and
    ``A^T = Q_A R_A``, ``B A = Q_B (R_B R_A^T) Q_A^T``, so the SVD of the r x r core gives
    ``U = Q_B U_c``, ``Vh = Vh_c Q_A^T``. O((d + k) r^2) instead of O(d k min(d, k)): the same
    singular values and subspaces at LLM layer shapes (d, k in the thousands) in microseconds."""
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    uc, s, vhc = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ uc, s, vhc @ qa.T


def svd_factor_rows(rows: Tensor, d: int) -> Tensor:
    """Balanced SVD factors of ``B A`` as rank rows: row j = ``[sqrt(S_j) U_j ; sqrt(S_j) V_j]``.

    Rows beyond ``min(r, d, k)`` are zero. The product of the first m rows' factors is the best
    rank-m approximation of ``B A``; ``||b'_j|| ||a'_j|| = sigma_j``, the quantity that the
    SOFT score s_j of eq. (8) approximates.
    """
    A, B = from_rows(rows, d)
    r = rows.shape[0]
    compute_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    U, S, Vh = low_rank_svd(B.to(compute_dtype), A.to(compute_dtype))
    m = min(r, S.numel())
    root = S[:m].clamp(min=0).sqrt()
    out = torch.zeros(rows.shape, dtype=compute_dtype, device=rows.device)
    out[:m, :d] = (U[:, :m] * root).T
    out[:m, d:] = root.unsqueeze(1) * Vh[:m]
    return out.to(rows.dtype)


@dataclass(frozen=True)
class SVDSparsifier:
    """Oracle: SVD of B A, keep the top m = keep // (d+k) components whole plus the
    top-magnitude ``keep - m(d+k)`` entries of component m (cf. eq. 8 discussion; the
    O(dkr + min(d,k)^2 max(d,k)) alternative to SOFT). Values are the new factors, not ``rows``.
    """

    name: ClassVar[str] = "svd"
    positions_from_seed: ClassVar[bool] = False

    def __call__(
        self, rows: Tensor, d: int, keep: int, *, ref: Tensor | None = None, seed: int = 0
    ) -> SparseRows:
        r, _, n = check_sparsify_args(rows, d, keep, ref)
        check_seed(seed)
        factors = svd_factor_rows(rows, d)
        mask = rowwise_topk_mask(factors.abs(), prefix_counts(r, n, keep))
        values = torch.where(mask, factors, torch.zeros((), dtype=rows.dtype, device=rows.device))
        return SparseRows(values=values, mask=mask)
