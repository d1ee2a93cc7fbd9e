"""Rank-rows representation of LoRA factors and the sparsifier contract (eqs. 6, 8-10, 13)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from fedsoft.config import check_sparsity

__all__ = [
    "MAX_SEED",
    "SparseRows",
    "SeededSparsifier",
    "Sparsifier",
    "check_int",
    "check_mask_args",
    "check_seed",
    "check_sparsify_args",
    "from_rows",
    "keep_count",
    "rowwise_topk_mask",
    "seed_generator",
    "select",
    "to_rows",
]

MAX_SEED = 2**63 - 1


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """Return ``value`` as an int, raising TypeError/ValueError that name the field ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_seed(seed: object) -> int:
    """Validate a sparsifier seed (an int in [0, 2**63 - 1])."""
    seed = check_int("seed", seed, minimum=0)
    if seed > MAX_SEED:
        raise ValueError(f"seed must be <= {MAX_SEED}, got {seed}")
    return seed


def _check_matrix(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (nan/inf)")
    return x


def to_rows(A: Tensor, B: Tensor) -> Tensor:
    """Stack LoRA factors into rank rows ``[B.T, A]`` of shape (r, d+k).

    Row j is ``[b_j ; a_j]``: column j of B (d x r) followed by row j of A (r x k); this is the
    per-rank grouping of eqs. (8)-(9) and the concatenation of eq. (13).
    """
    _check_matrix("A", A)
    _check_matrix("B", B)
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"A rows (rank) {A.shape[0]} != B columns (rank) {B.shape[1]}: "
            f"A shape {tuple(A.shape)}, B shape {tuple(B.shape)}"
        )
    if A.dtype != B.dtype:
        raise TypeError(f"A dtype {A.dtype} != B dtype {B.dtype}")
    if A.device != B.device:
        raise ValueError(f"A device {A.device} != B device {B.device}")
    return torch.cat([B.T, A], dim=1)


def from_rows(rows: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`to_rows`: split (r, d+k) rank rows into ``(A (r x k), B (d x r))``."""
    _check_matrix("rows", rows)
    d = check_int("d", d, minimum=1)
    if d >= rows.shape[1]:
        raise ValueError(f"d must be < rows.shape[1] = {rows.shape[1]} (so k >= 1), got {d}")
    A = rows[:, d:].contiguous()
    B = rows[:, :d].T.contiguous()
    return A, B


def keep_count(r: int, d: int, k: int, sparsity: float) -> int:
    """Number of kept entries ``round((1 - sparsity) * r * (d + k))`` (payload of eq. 6).

    ``sparsity`` is the fraction of entries set to zero (rho in eqs. 6 and 9), in [0, 1).
    """
    r = check_int("r", r, minimum=1)
    d = check_int("d", d, minimum=1)
    k = check_int("k", k, minimum=1)
    sparsity = check_sparsity(sparsity)
    return int(round((1.0 - sparsity) * r * (d + k)))


@dataclass(frozen=True)
class SparseRows:
    """Output of a sparsifier: ``values`` (r, d+k), zero outside ``mask`` (bool, (r, d+k))."""

    values: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.values, Tensor) or not isinstance(self.mask, Tensor):
            raise TypeError("values and mask must be torch.Tensor")
        if self.mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool, got {self.mask.dtype}")
        if self.values.shape != self.mask.shape or self.values.dim() != 2:
            raise ValueError(
                f"values shape {tuple(self.values.shape)} and mask shape "
                f"{tuple(self.mask.shape)} must be equal and 2-D"
            )

    @property
    def nnz(self) -> int:
        """Number of transmitted entries (mask.sum())."""
        return int(self.mask.sum())

    def factors(self, d: int) -> tuple[Tensor, Tensor]:
        """The kept factors ``(A_hat, B_hat)`` (eq. 10) recovered from the sparse rows."""
        return from_rows(self.values, d)


@runtime_checkable
class Sparsifier(Protocol):
    """S(.) of eqs. (10)/(14) acting on rank rows; keeps exactly ``keep`` entries.

    ``positions_from_seed``: True when the kept positions are a pure function of
    (shape, keep, seed), so positions cost 0 bits on the wire.
    ``ref``: rank rows of the local factors used for per-rank scores when ``rows`` is a delta.
    """

    name: ClassVar[str]
    positions_from_seed: ClassVar[bool]

    def __call__(
        self, rows: Tensor, d: int, keep: int, *, ref: Tensor | None = None, seed: int = 0
    ) -> SparseRows: ...


@runtime_checkable
class SeededSparsifier(Sparsifier, Protocol):
    """A sparsifier whose positions the receiver regenerates with ``mask_from_seed``."""

    def mask_from_seed(self, r: int, d: int, k: int, keep: int, seed: int) -> Tensor: ...


def check_sparsify_args(
    rows: Tensor, d: int, keep: int, ref: Tensor | None = None
) -> tuple[int, int, int]:
    """Validate sparsifier arguments; return ``(r, k, n)`` with ``n = d + k``."""
    _check_matrix("rows", rows)
    d = check_int("d", d, minimum=1)
    r, n = rows.shape
    if r < 1:
        raise ValueError(f"rows must have at least one rank row, got shape {tuple(rows.shape)}")
    if d >= n:
        raise ValueError(f"d must be < rows.shape[1] = {n} (so k >= 1), got {d}")
    keep = check_int("keep", keep, minimum=0)
    if keep > r * n:
        raise ValueError(f"keep must be <= r*(d+k) = {r * n}, got {keep}")
    if ref is not None:
        _check_matrix("ref", ref)
        if ref.shape != rows.shape:
            raise ValueError(
                f"ref shape {tuple(ref.shape)} must equal rows shape {tuple(rows.shape)}"
            )
    return r, n - d, n


def check_mask_args(r: int, d: int, k: int, keep: int) -> int:
    """Validate ``mask_from_seed`` shape arguments; return ``n = d + k``."""
    r = check_int("r", r, minimum=1)
    d = check_int("d", d, minimum=1)
    k = check_int("k", k, minimum=1)
    keep = check_int("keep", keep, minimum=0)
    if keep > r * (d + k):
        raise ValueError(f"keep must be <= r*(d+k) = {r * (d + k)}, got {keep}")
    return d + k


def seed_generator(seed: int) -> torch.Generator:
    """CPU generator seeded with ``seed`` (device-independent positions)."""
    return torch.Generator(device="cpu").manual_seed(check_seed(seed))


def select(rows: Tensor, mask: Tensor) -> SparseRows:
    """SparseRows keeping ``rows`` exactly on ``mask`` and 0 elsewhere."""
    mask = mask.to(device=rows.device)
    zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
    return SparseRows(values=torch.where(mask, rows, zero), mask=mask)


class SeededMaskSparsifier:
    """Base of the sparsifiers whose kept positions are a pure function of a shared seed
    (rlora, fedlodrop): the receiver regenerates the mask, so positions cost 0 bits (eq. 6).
    Subclasses implement ``mask_from_seed``; ``ref`` is unused."""

    positions_from_seed: ClassVar[bool] = True

    def mask_from_seed(self, r: int, d: int, k: int, keep: int, seed: int) -> Tensor:
        raise NotImplementedError

    def __call__(
        self, rows: Tensor, d: int, keep: int, *, ref: Tensor | None = None, seed: int = 0
    ) -> SparseRows:
        r, k, _ = check_sparsify_args(rows, d, keep, ref)
        return select(rows, self.mask_from_seed(r, d, k, keep, seed))


def rowwise_topk_mask(magnitude: Tensor, counts: Tensor) -> Tensor:
    """Bool mask keeping the ``counts[j]`` largest entries of row j of ``magnitude`` (finite).

    Vectorised, no loop over rows: row j is padded with ``kmax - counts[j]`` ``+inf`` sentinels
    (and ``-inf`` filler), one unsorted ``topk(kmax)`` runs over all rows, and the sentinel hits
    are dropped; exactly ``counts[j]`` real entries of row j survive.
    """
    r, n = magnitude.shape
    device = magnitude.device
    counts = counts.to(device=device, dtype=torch.long)
    if counts.numel() != r or bool((counts < 0).any()) or bool((counts > n).any()):
        raise ValueError(f"counts must be {r} integers in [0, {n}], got {counts.tolist()}")
    kmax = int(counts.max()) if r else 0
    if kmax <= 0:
        return torch.zeros((r, n), dtype=torch.bool, device=device)
    pad = kmax - counts
    width = int(pad.max())
    if width == 0:
        idx = torch.topk(magnitude, kmax, dim=1, largest=True, sorted=False).indices
        return torch.zeros((r, n), dtype=torch.bool, device=device).scatter_(1, idx, True)
    inf = torch.tensor(float("inf"), dtype=magnitude.dtype, device=device)
    sentinel = torch.where(torch.arange(width, device=device).unsqueeze(0) < pad.unsqueeze(1),
                           inf, -inf)
    padded = torch.cat([magnitude, sentinel], dim=1)
    idx = torch.topk(padded, kmax, dim=1, largest=True, sorted=False).indices
    full = torch.zeros((r, n + width), dtype=torch.bool, device=device).scatter_(1, idx, True)
    return full[:, :n].contiguous()
