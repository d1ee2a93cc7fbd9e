"""Tests of the rank-rows representation, SOFT's allocation and the six sparsifiers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsoft.compression.sparsifiers import (
    SPARSIFIERS,
    SeededSparsifier,
    SoftSparsifier,
    Sparsifier,
    allocate_budget,
    from_rows,
    get_sparsifier,
    keep_count,
    rank_scores,
    to_rows,
)
from fedsoft.compression.sparsifiers.base import rowwise_topk_mask
from fedsoft.compression.sparsifiers.soft import split_counts

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
PARTIAL = [n for n in SPARSIFIERS if n != "dense"]
MASK_TYPE = [n for n in SPARSIFIERS if n != "svd"]


def _rows(r: int, n: int, seed: int, kind: str = "gauss") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, n, generator=g, dtype=torch.float64)
    if kind == "ties":
        x = torch.round(x)  # many equal magnitudes and zeros
    return x


@st.composite
def cases(draw):
    r = draw(st.integers(1, 8))
    d = draw(st.integers(1, 12))
    k = draw(st.integers(1, 12))
    sparsity = draw(st.floats(0.0, 0.999, allow_nan=False))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["gauss", "ties"]))
    rows = _rows(r, d + k, seed, kind)
    return rows, d, k, keep_count(r, d, k, sparsity), seed


def _orthogonal_factors(
    scores: torch.Tensor, d: int, k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A with orthogonal rows, B with orthogonal columns, ||b_j|| ||a_j|| = scores[j] (QR)."""
    g = torch.Generator().manual_seed(seed)
    r = scores.numel()
    qb, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    qa, _ = torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64))
    split = torch.rand(r, generator=g, dtype=torch.float64) + 0.5  # unbalanced norms
    B = qb * (scores * split).sqrt()
    A = (qa * (scores / split).sqrt()).T
    return A, B


# ---------------------------------------------------------------- representation


def test_rows_round_trip_and_layout() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 5, generator=g)
    B = torch.randn(4, 3, generator=g)
    rows = to_rows(A, B)
    assert rows.shape == (3, 9)
    assert torch.equal(rows[1, :4], B[:, 1]) and torch.equal(rows[1, 4:], A[1])
    A2, B2 = from_rows(rows, 4)
    assert torch.equal(A2, A) and torch.equal(B2, B)
    assert torch.equal(to_rows(A2, B2), rows)


@given(r=st.integers(1, 50), d=st.integers(1, 300), k=st.integers(1, 300),
       sparsity=st.floats(0.0, 0.9999))
def test_keep_count_matches_rounding(r: int, d: int, k: int, sparsity: float) -> None:
    n = keep_count(r, d, k, sparsity)
    assert n == round((1 - sparsity) * r * (d + k))
    assert 0 <= n <= r * (d + k)


def test_registry() -> None:
    assert set(SPARSIFIERS) == {"soft", "flasc", "rlora", "hetlora", "fedlodrop", "dense", "svd"}
    for name, sp in SPARSIFIERS.items():
        assert isinstance(sp, Sparsifier) and sp.name == name
        assert get_sparsifier(name) is sp
    assert SPARSIFIERS["rlora"].positions_from_seed and SPARSIFIERS["fedlodrop"].positions_from_seed
    assert not SPARSIFIERS["soft"].positions_from_seed
    assert not SPARSIFIERS["flasc"].positions_from_seed
    assert isinstance(SPARSIFIERS["rlora"], SeededSparsifier)
    assert get_sparsifier("soft", split="ab") == SoftSparsifier(split="ab")


# ---------------------------------------------------------------- properties of all sparsifiers


@SETTINGS
@given(case=cases())
def test_every_sparsifier_keeps_exactly_keep(case) -> None:
    rows, d, k, keep, seed = case
    r, n = rows.shape
    for name in PARTIAL + ["soft_ab"]:
        sp = SoftSparsifier(split="ab") if name == "soft_ab" else SPARSIFIERS[name]
        out = sp(rows, d, keep, seed=seed)
        assert out.mask.dtype == torch.bool and out.mask.shape == rows.shape
        assert int(out.mask.sum()) == keep == out.nnz, name
        assert torch.all(out.values[~out.mask] == 0), name
        if name != "svd":
            assert torch.equal(out.values[out.mask], rows[out.mask]), name
        again = sp(rows, d, keep, seed=seed)
        assert torch.equal(again.mask, out.mask) and torch.equal(again.values, out.values), name
    dense = SPARSIFIERS["dense"](rows, d, r * n)
    assert bool(dense.mask.all()) and torch.equal(dense.values, rows)


@SETTINGS
@given(case=cases())
def test_seeded_masks_are_regenerable(case) -> None:
    rows, d, k, keep, seed = case
    r = rows.shape[0]
    for name in ("rlora", "fedlodrop"):
        sp = SPARSIFIERS[name]
        assert isinstance(sp, SeededSparsifier)
        out = sp(rows, d, keep, seed=seed)
        assert torch.equal(out.mask, sp.mask_from_seed(r, d, k, keep, seed))
        # positions do not depend on the values
        assert torch.equal(sp(rows * 3 + 1, d, keep, seed=seed).mask, out.mask)


def test_seeded_masks_change_with_seed() -> None:
    masks = {SPARSIFIERS["rlora"].mask_from_seed(4, 8, 8, 30, s).numpy().tobytes()
             for s in range(5)}
    assert len(masks) > 1


def test_fedlodrop_keeps_whole_random_rows() -> None:
    r, d, k = 6, 5, 7
    n = d + k
    keep = 2 * n + 3
    mask = SPARSIFIERS["fedlodrop"].mask_from_seed(r, d, k, keep, seed=11)
    per_row = sorted(mask.sum(dim=1).tolist())
    assert per_row == [0, 0, 0, 3, n, n]


def test_hetlora_keeps_lowest_ranks() -> None:
    rows = _rows(5, 10, 3)
    d, n = 4, 10
    keep = 2 * n + 4
    out = SPARSIFIERS["hetlora"](rows, d, keep)
    assert out.mask[:2].all() and not out.mask[3:].any()
    assert int(out.mask[2].sum()) == 4
    top4 = torch.topk(rows[2].abs(), 4).indices
    assert bool(out.mask[2, top4].all())


def test_flasc_is_global_topk() -> None:
    rows = _rows(4, 9, 5)
    keep = 11
    out = SPARSIFIERS["flasc"](rows, 3, keep)
    thresh = torch.topk(rows.abs().flatten(), keep).values.min()
    assert bool((rows.abs()[out.mask] >= thresh).all())
    assert bool((rows.abs()[~out.mask] <= thresh).all())


@SETTINGS
@given(r=st.integers(1, 6), n=st.integers(1, 20), seed=st.integers(0, 10_000),
       ties=st.booleans(), data=st.data())
def test_rowwise_topk_mask_exact_counts(r, n, seed, ties, data) -> None:
    mag = _rows(r, n, seed, "ties" if ties else "gauss").abs()
    counts = torch.tensor(data.draw(st.lists(st.integers(0, n), min_size=r, max_size=r)))
    mask = rowwise_topk_mask(mag, counts)
    assert torch.equal(mask.sum(dim=1), counts)
    for j in range(r):  # kept entries dominate dropped ones within each row
        kept, dropped = mag[j][mask[j]], mag[j][~mask[j]]
        if kept.numel() and dropped.numel():
            assert kept.min() >= dropped.max()


# ---------------------------------------------------------------- SOFT allocation (eq. 9)


def _largest_remainder(scores: list[float], keep: int) -> list[int]:
    """Independent reference: proportional quotas, floor, then +1 by largest fraction."""
    total = sum(scores)
    q = [keep * s / total for s in scores]
    base = [math.floor(x) for x in q]
    left = keep - sum(base)
    order = sorted(range(len(q)), key=lambda j: (-(q[j] - base[j]), -scores[j], j))
    for j in order[:left]:
        base[j] += 1
    return base


@SETTINGS
@given(scores=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=12),
       frac=st.floats(0.0, 1.0), cap=st.integers(1, 40),
       overflow=st.sampled_from(["greedy", "proportional"]))
def test_allocation_sums_exactly_and_respects_caps(scores, frac, cap, overflow) -> None:
    r = len(scores)
    keep = int(frac * r * cap)
    counts = allocate_budget(torch.tensor(scores, dtype=torch.float64), keep, cap,
                             overflow=overflow)
    assert int(counts.sum()) == keep
    assert bool((counts >= 0).all()) and bool((counts <= cap).all())
    s = scores if sum(scores) > 0 else [1.0] * r
    for i in range(r):  # monotone in the score
        for j in range(r):
            if s[i] > s[j]:
                assert counts[i] >= counts[j]


@SETTINGS
@given(scores=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=12),
       frac=st.floats(0.0, 1.0))
def test_allocation_is_largest_remainder_when_no_cap_binds(scores, frac) -> None:
    r = len(scores)
    cap = 10_000  # never binds
    keep = int(frac * 500)
    counts = allocate_budget(torch.tensor(scores, dtype=torch.float64), keep, cap)
    total = sum(scores)
    for j in range(r):
        q = keep * scores[j] / total
        assert math.floor(q) - 1e-9 <= counts[j] <= math.ceil(q) + 1e-9
    # identical to the reference whenever fractional parts are distinct
    fracs = [keep * s / total % 1 for s in scores]
    if len({round(f, 9) for f in fracs}) == r:
        assert counts.tolist() == _largest_remainder(scores, keep)


def test_allocation_caps_redistribute() -> None:
    scores = [1.0, 100.0, 10.0, 0.1]
    cap, keep = 10, 18  # rank 1's proportional share (16.2) exceeds the cap
    plain = _largest_remainder(scores, keep)
    assert plain[1] > cap
    greedy = allocate_budget(torch.tensor(scores), keep, cap, overflow="greedy").tolist()
    # rank 1 capped; its excess goes to the next-largest score (rank 2); others unchanged
    assert greedy[1] == cap and greedy[0] == plain[0] and greedy[3] == plain[3]
    assert greedy[2] == plain[2] + plain[1] - cap
    prop = allocate_budget(torch.tensor(scores), keep, cap, overflow="proportional").tolist()
    # water-filling: the uncapped ranks share keep - cap proportionally
    rest = _largest_remainder([scores[0], scores[2], scores[3]], keep - cap)
    assert prop == [rest[0], cap, rest[1], rest[2]]


def test_zero_scores_fall_back_to_uniform() -> None:
    counts = allocate_budget(torch.zeros(5), 13, 100)
    assert int(counts.sum()) == 13 and int(counts.max() - counts.min()) <= 1
    # LoRA at init: B = 0, so every score is zero; SOFT still keeps `keep` entries spread evenly
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 6, generator=g)
    B = torch.zeros(5, 4)
    rows = to_rows(A, B)
    out = SPARSIFIERS["soft"](rows, 5, 20)
    per_rank = out.mask.sum(dim=1)
    assert int(per_rank.sum()) == 20 and int(per_rank.max() - per_rank.min()) <= 1


def test_soft_mask_counts_follow_scores_of_ref() -> None:
    g = torch.Generator().manual_seed(2)
    factors = torch.randn(6, 14, generator=g) * torch.tensor([5.0, 1, 3, 0.2, 2, 1]).unsqueeze(1)
    delta = torch.randn(6, 14, generator=g)
    d, keep = 6, 30
    out = SPARSIFIERS["soft"](delta, d, keep, ref=factors)
    expected = allocate_budget(rank_scores(factors, d), keep, 14)
    assert torch.equal(out.mask.sum(dim=1), expected)
    assert not torch.equal(expected, allocate_budget(rank_scores(delta, d), keep, 14))
    # inside each rank the kept entries are the largest-magnitude ones of that rank
    for j in range(6):
        kept = delta[j].abs()[out.mask[j]]
        dropped = delta[j].abs()[~out.mask[j]]
        if kept.numel() and dropped.numel():
            assert kept.min() >= dropped.max()


def test_soft_ab_split_counts() -> None:
    g = torch.Generator().manual_seed(4)
    d, k = 3, 9
    rows = torch.randn(5, d + k, generator=g)
    rows[:, :d] *= 100  # B much larger than A: joint top-k would take B first
    sp = SoftSparsifier(split="ab")
    keep = 31
    out = sp(rows, d, keep)
    counts = sp.budgets(rows, d, keep)
    kb, ka = split_counts(counts, d, k)
    assert torch.equal(out.mask[:, :d].sum(dim=1), kb)
    assert torch.equal(out.mask[:, d:].sum(dim=1), ka)
    assert bool((kb <= d).all()) and bool((ka <= k).all())
    assert torch.equal(kb + ka, counts)


# ---------------------------------------------------------------- SOFT vs SVD oracle


def test_soft_scores_equal_singular_values_for_orthogonal_factors() -> None:
    scores = torch.tensor([0.7, 3.0, 0.05, 1.5, 0.3], dtype=torch.float64)
    A, B = _orthogonal_factors(scores, d=20, k=16, seed=7)
    s = rank_scores(to_rows(A, B), 20)
    sig = torch.linalg.svdvals(B @ A)[:5]
    assert torch.allclose(torch.sort(s, descending=True).values, sig, rtol=1e-5, atol=0)
    assert torch.allclose(s, scores, rtol=1e-10)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_soft_keeps_same_components_as_svd(m: int) -> None:
    # strongly decaying scores in shuffled rank order
    scores = torch.tensor([1e-2, 1e4, 1e-6, 1e0, 1e-4, 1e2], dtype=torch.float64)
    d, k = 12, 10
    A, B = _orthogonal_factors(scores, d, k, seed=3)
    rows = to_rows(A, B)
    keep = m * (d + k)
    soft = SPARSIFIERS["soft"](rows, d, keep)
    oracle = SPARSIFIERS["svd"](rows, d, keep)
    top = torch.argsort(scores, descending=True)[:m]
    expected = torch.zeros(6, dtype=torch.bool)
    expected[top] = True
    assert torch.equal(soft.mask.all(dim=1), expected)
    assert not soft.mask[~expected].any()
    As, Bs = from_rows(soft.values, d)
    Ao, Bo = from_rows(oracle.values, d)
    prod_soft, prod_oracle = Bs @ As, Bo @ Ao
    err = torch.linalg.matrix_norm(prod_soft - prod_oracle) / torch.linalg.matrix_norm(prod_oracle)
    assert float(err) < 1e-5


def test_svd_oracle_is_best_rank_m() -> None:
    g = torch.Generator().manual_seed(9)
    d, k, r = 9, 7, 4
    rows = torch.randn(r, d + k, generator=g, dtype=torch.float64)
    A, B = from_rows(rows, d)
    out = SPARSIFIERS["svd"](rows, d, 2 * (d + k))
    Ak, Bk = from_rows(out.values, d)
    sig = torch.linalg.svdvals(B @ A)
    err = torch.linalg.matrix_norm(B @ A - Bk @ Ak) ** 2
    assert torch.allclose(err, (sig[2:] ** 2).sum(), rtol=1e-8)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_with_field_name() -> None:
    rows = _rows(3, 8, 0)
    soft = SPARSIFIERS["soft"]
    with pytest.raises(ValueError, match="sparsity"):
        keep_count(3, 4, 4, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        keep_count(3, 4, 4, float("nan"))
    with pytest.raises(ValueError, match="keep"):
        soft(rows, 4, 25)
    with pytest.raises(ValueError, match="keep"):
        soft(rows, 4, -1)
    with pytest.raises(TypeError, match="keep"):
        soft(rows, 4, 2.5)
    with pytest.raises(ValueError, match="d must"):
        soft(rows, 8, 3)
    bad = rows.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="rows"):
        SPARSIFIERS["flasc"](bad, 4, 3)
    with pytest.raises(ValueError, match="ref"):
        soft(rows, 4, 3, ref=rows[:2])
    with pytest.raises(ValueError, match="seed"):
        SPARSIFIERS["rlora"](rows, 4, 3, seed=-1)
    with pytest.raises(ValueError, match="keep"):
        SPARSIFIERS["dense"](rows, 4, 3)
    with pytest.raises(ValueError, match="flasc"):
        get_sparsifier("topk")
    with pytest.raises(ValueError, match="split"):
        SoftSparsifier(split="both")
    with pytest.raises(ValueError, match="rank"):
        to_rows(torch.zeros(3, 4), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="rows"):
        from_rows(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="scores"):
        allocate_budget(torch.tensor([1.0, -1.0]), 1, 3)


def test_low_rank_svd_matches_the_full_svd_of_the_product():
    from fedsoft.compression.sparsifiers.base import to_rows
    from fedsoft.compression.sparsifiers.svd import low_rank_svd
    from fedsoft.compression.spectrum import product_energy

    gen = torch.Generator().manual_seed(3)
    B = torch.randn(300, 6, generator=gen, dtype=torch.float64)
    A = torch.randn(6, 200, generator=gen, dtype=torch.float64)
    U, S, Vh = low_rank_svd(B, A)
    full = torch.linalg.svdvals(B @ A)[:6]
    assert torch.allclose(S, full, rtol=1e-10)
    assert torch.allclose((U * S) @ Vh, B @ A, atol=1e-9)
    assert torch.allclose(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-10)
    energy = float(torch.linalg.matrix_norm(B @ A) ** 2)
    assert product_energy(to_rows(A, B), 300) == pytest.approx(energy, rel=1e-10)
