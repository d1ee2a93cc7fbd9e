"""SOFT: per-rank norm scores (eq. 8), proportional per-rank budgets (eq. 9), top-k_j per rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from fedsoft.compression.sparsifiers.base import (
    SparseRows,
    check_int,
    check_seed,
    check_sparsify_args,
    rowwise_topk_mask,
    select,
)

__all__ = ["OVERFLOW_RULES", "SPLITS", "SoftSparsifier", "allocate_budget", "rank_scores",
           "split_counts"]

SPLITS = ("joint", "ab")
OVERFLOW_RULES = ("greedy", "proportional")


def rank_scores(rows: Tensor, d: int) -> Tensor:
    """Surrogate singular values ``s_j = ||b_j||_2 * ||a_j||_2`` of eq. (8), shape (r,).

    ``rows`` are rank rows ``[b_j ; a_j]`` (see
    :func:`fedsoft.compression.sparsifiers.base.to_rows`).
    Under exact orthogonality of the rows of A and the columns of B these are the singular
    values of B A.
    """
    if not isinstance(rows, Tensor) or rows.dim() != 2:
        raise ValueError(f"rows must be a 2-D tensor, got {getattr(rows, 'shape', rows)!r}")
    d = check_int("d", d, minimum=1)
    if d >= rows.shape[1]:
        raise ValueError(f"d must be < rows.shape[1] = {rows.shape[1]}, got {d}")
    return torch.linalg.vector_norm(rows[:, :d], dim=1) * torch.linalg.vector_norm(
        rows[:, d:], dim=1
    )


def allocate_budget(
    scores: Tensor, keep: int, cap: int, *, overflow: str = "greedy"
) -> Tensor:
    """Per-rank budgets ``k_j`` proportional to ``scores`` summing exactly to ``keep`` (eq. 9).

    Rounding is largest remainder (ties: higher score, then lower rank index). Each ``k_j`` is
    capped at ``cap`` (= d+k). ``overflow`` (PROPOSED-L) says where the budget above a cap goes:

    * ``"greedy"``: the excess goes to the next-largest-score ranks in order, each filled up to
      ``cap``;
    * ``"proportional"``: water-filling, i.e. capped ranks get ``cap`` and the rest of the budget
      is shared proportionally among the uncapped ranks.

    If every score is 0 (LoRA initialises B = 0) the allocation is uniform.
    Returns a CPU ``torch.long`` tensor of shape (r,).
    """
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.numel() < 1:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got {scores!r}")
    if overflow not in OVERFLOW_RULES:
        raise ValueError(f"overflow must be one of {OVERFLOW_RULES}, got {overflow!r}")
    cap = check_int("cap", cap, minimum=1)
    r = scores.numel()
    keep = check_int("keep", keep, minimum=0)
    if keep > r * cap:
        raise ValueError(f"keep must be <= r*cap = {r * cap}, got {keep}")
    # r is small: plain numpy avoids per-op torch overhead in this hot path
    s = scores.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"scores must be finite and >= 0, got {scores.tolist()}")
    if keep == 0:
        return torch.zeros(r, dtype=torch.long)
    if s.sum() <= 0.0:
        s = np.ones(r)  # zero-score fallback: uniform allocation
    order = np.argsort(-s, kind="stable")  # descending score, ties by lower index
    if overflow == "proportional":
        quotas = _water_fill(s, order, keep, cap)
    else:
        quotas = keep * s / s.sum()
    base = np.floor(quotas)
    frac = quotas - base
    counts = base.astype(np.int64)
    leftover = min(max(keep - int(counts.sum()), 0), r)
    if leftover:
        winners = order[np.argsort(-frac[order], kind="stable")[:leftover]]
        counts[winners] += 1
    # cap at `cap` and hand the excess (plus any rounding deficit) to the next-largest scores
    excess = int(np.clip(counts - cap, 0, None).sum()) + (keep - int(counts.sum()))
    np.minimum(counts, cap, out=counts)
    if excess > 0:
        room = cap - counts[order]
        before = np.cumsum(room) - room
        counts[order] += np.minimum(np.clip(excess - before, 0, None), room)
    return torch.from_numpy(counts)


def _water_fill(s: np.ndarray, order: np.ndarray, keep: int, cap: int) -> np.ndarray:
    """Proportional quotas with caps: the c largest scores get ``cap``, the rest share the rest."""
    r = s.size
    ss = s[order]
    tail = np.append(np.cumsum(ss[::-1])[::-1], 0.0)  # tail[c] = sum_{l>=c} ss[l]
    remaining = keep - np.arange(r + 1) * float(cap)
    ok = (remaining >= 0) & (remaining * np.append(ss, 0.0) <= cap * tail)
    n_capped = int(np.flatnonzero(ok)[0])
    sorted_quotas = np.zeros(r)
    sorted_quotas[:n_capped] = cap
    if n_capped < r and tail[n_capped] > 0:
        sorted_quotas[n_capped:] = remaining[n_capped] * ss[n_capped:] / tail[n_capped]
    quotas = np.empty(r)
    quotas[order] = sorted_quotas
    return quotas


def split_counts(counts: Tensor, d: int, k: int) -> tuple[Tensor, Tensor]:
    """Split per-rank budgets into ``(k_j^B, k_j^A)``: ``k_j^B = round(k_j d/(d+k))`` (eq. 9, "ab").

    Caps ``k_j^B <= d`` and ``k_j^A <= k`` move the surplus to the other factor.
    """
    counts = counts.to(torch.long)
    kb = torch.round(counts.to(torch.float64) * d / (d + k)).to(torch.long)
    lo = (counts - k).clamp(min=0)
    hi = counts.clamp(max=d)
    kb = torch.maximum(torch.minimum(kb, hi), lo)
    return kb, counts - kb


@dataclass(frozen=True)
class SoftSparsifier:
    """SOFT sparsifier (eqs. 8-9): budget per rank proportional to ``s_j``, top-k_j inside rank j.

    ``split``: ``"joint"`` (top-k_j over ``[b_j; a_j]``) or ``"ab"`` (separate top-k in b_j and
    a_j, see :func:`split_counts`). ``overflow``: cap rule of :func:`allocate_budget`.
    Scores come from ``ref`` (rows of the local factors) when given, else from ``rows``.
    """

    split: str = "joint"
    overflow: str = "greedy"

    name: ClassVar[str] = "soft"
    positions_from_seed: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.overflow not in OVERFLOW_RULES:
            raise ValueError(f"overflow must be one of {OVERFLOW_RULES}, got {self.overflow!r}")

    def budgets(self, rows: Tensor, d: int, keep: int, *, ref: Tensor | None = None) -> Tensor:
        """Per-rank budgets k_j (eq. 9) this sparsifier would use."""
        _, _, n = check_sparsify_args(rows, d, keep, ref)
        scores = rank_scores(ref if ref is not None else rows, d)
        return allocate_budget(scores, keep, n, overflow=self.overflow)

    def __call__(
        self, rows: Tensor, d: int, keep: int, *, ref: Tensor | None = None, seed: int = 0
    ) -> SparseRows:
        _, k, n = check_sparsify_args(rows, d, keep, ref)
        check_seed(seed)
        scores = rank_scores(ref if ref is not None else rows, d)
        counts = allocate_budget(scores, keep, n, overflow=self.overflow)
        magnitude = rows.abs()
        if self.split == "joint":
            mask = rowwise_topk_mask(magnitude, counts)
        else:
            kb, ka = split_counts(counts, d, k)
            mask = torch.cat(
                [rowwise_topk_mask(magnitude[:, :d], kb), rowwise_topk_mask(magnitude[:, d:], ka)],
                dim=1,
            )
        return select(rows, mask)
