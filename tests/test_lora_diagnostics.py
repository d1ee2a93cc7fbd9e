"""Tests of the orthogonality penalty (eq. 7), covariance (eqs. 20-22) and spectrum diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from fedsoft.compression.covariance import cov_fro, cov_matrix
from fedsoft.compression.orthogonality import orth_offdiag, orth_penalty
from fedsoft.compression.sparsifiers import to_rows
from fedsoft.compression.spectrum import (
    kept_energy_ratio,
    kept_product_rel_err,
    soft_scores,
    svd_proxy_rel_err,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(r: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    qb, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    qa, _ = torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64))
    scale_b = torch.rand(r, generator=g, dtype=torch.float64) * 3 + 0.1
    scale_a = torch.rand(r, generator=g, dtype=torch.float64) * 3 + 0.1
    return (qa * scale_a).T, qb * scale_b


def _random(r: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(r, k, generator=g), torch.randn(d, r, generator=g)


# ---------------------------------------------------------------- eq. (7)


def test_orth_penalty_zero_for_orthogonal_positive_otherwise() -> None:
    A, B = _orthogonal(4, 12, 10, 0)
    assert float(orth_penalty(A, B)) < 1e-20
    assert orth_offdiag([(A, B)]) < 1e-15
    A2, B2 = _random(4, 12, 10, 1)
    pen = orth_penalty(A2, B2)
    # independent computation: sum of squared off-diagonal Gram entries
    ga, gb = A2 @ A2.T, B2.T @ B2
    off = [(g[i, j] ** 2) for g in (ga, gb) for i in range(4) for j in range(4) if i != j]
    assert torch.allclose(pen, torch.stack(off).sum(), rtol=1e-5)
    assert float(pen) > 0 and 0 < orth_offdiag([(A2, B2), (A, B)]) < 1


def test_gradient_steps_lower_offdiag() -> None:
    A0, B0 = _random(4, 16, 12, 2)
    A = (A0 * 0.3).requires_grad_(True)
    B = (B0 * 0.3).requires_grad_(True)
    before = orth_offdiag([(A.detach(), B.detach())])
    opt = torch.optim.Adam([A, B], lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        orth_penalty(A, B).backward()
        opt.step()
    after = orth_offdiag([(A.detach(), B.detach())])
    assert A.grad is not None and after < 0.5 * before


def test_orth_bad_inputs() -> None:
    with pytest.raises(ValueError, match="rank"):
        orth_penalty(torch.zeros(3, 5), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="pairs"):
        orth_offdiag([])
    with pytest.raises(ValueError, match="A must be 2-D"):
        orth_penalty(torch.zeros(3), torch.zeros(4, 3))


# ---------------------------------------------------------------- eqs. (20)-(22)


def test_cov_fro_matches_definition_and_centred_form() -> None:
    g = _gen(3)
    n, r, d, k = 5, 3, 7, 6
    As = [torch.randn(r, k, generator=g, dtype=torch.float64) for _ in range(n)]
    Bs = [torch.randn(d, r, generator=g, dtype=torch.float64) for _ in range(n)]
    w = torch.rand(n, generator=g, dtype=torch.float64) * 10
    p = w / w.sum()
    ideal = sum(p[i] * Bs[i] @ As[i] for i in range(n))
    a_bar = sum(p[i] * As[i] for i in range(n))
    b_bar = sum(p[i] * Bs[i] for i in range(n))
    raw = ideal - b_bar @ a_bar  # eq. (20)
    centred = sum(p[i] * (Bs[i] - b_bar) @ (As[i] - a_bar) for i in range(n))  # eq. (21)
    assert torch.allclose(raw, centred, rtol=1e-10, atol=1e-12)
    assert torch.allclose(cov_matrix(As, Bs, w.tolist()), raw, rtol=1e-10, atol=1e-12)
    assert math.isclose(cov_fro(As, Bs, w), float(torch.linalg.matrix_norm(raw)), rel_tol=1e-10)
    # weights are normalised
    assert math.isclose(cov_fro(As, Bs, w * 7), cov_fro(As, Bs, p), rel_tol=1e-12)


def test_cov_fro_zero_when_clients_equal() -> None:
    A, B = _random(3, 6, 5, 4)
    val = cov_fro([A] * 4, [B] * 4, [0.1, 0.2, 0.3, 0.4])
    assert val <= 1e-12 * float(torch.linalg.matrix_norm(B @ A))
    # a single client has no covariance
    assert cov_fro([A], [B], [1.0]) == 0.0


def test_cov_bad_inputs() -> None:
    A, B = _random(3, 6, 5, 4)
    with pytest.raises(ValueError, match="weights"):
        cov_fro([A, A], [B, B], [1.0, -1.0])
    with pytest.raises(ValueError, match="weights"):
        cov_fro([A, A], [B, B], [1.0])
    with pytest.raises(ValueError, match="same length"):
        cov_fro([A, A], [B], [1.0, 1.0])
    with pytest.raises(ValueError, match="client 1"):
        cov_fro([A, A[:2]], [B, B], [1.0, 1.0])


# ---------------------------------------------------------------- spectrum


def test_svd_proxy_rel_err() -> None:
    A, B = _orthogonal(5, 14, 9, 5)
    assert svd_proxy_rel_err(A, B) < 1e-10
    sig = torch.linalg.svdvals(B @ A)[:5]
    assert torch.allclose(torch.sort(soft_scores(A, B), descending=True).values, sig)
    A2, B2 = _random(5, 14, 9, 6)
    assert svd_proxy_rel_err(A2, B2) > 1e-3
    # r > min(d, k): the extra singular values count as zero
    A3, B3 = _random(6, 4, 5, 7)
    assert math.isfinite(svd_proxy_rel_err(A3, B3))
    assert svd_proxy_rel_err(torch.zeros(2, 3), torch.zeros(4, 2)) == 0.0


def test_kept_energy_ratio() -> None:
    d, k = 10, 8
    n = d + k
    A, B = _orthogonal(6, d, k, 8)
    rows = to_rows(A, B)
    assert math.isclose(kept_energy_ratio(rows, d, 3 * n, "svd"), 1.0, rel_tol=1e-12)
    assert math.isclose(kept_energy_ratio(rows, d, 6 * n, "soft"), 1.0, rel_tol=1e-9)
    assert 0 < kept_energy_ratio(rows, d, 3 * n, "soft") < math.inf
    # strongly decaying scores: SOFT keeps whole top components, i.e. the oracle's energy
    g = _gen(9)
    qb, _ = torch.linalg.qr(torch.randn(d, 6, generator=g, dtype=torch.float64))
    qa, _ = torch.linalg.qr(torch.randn(k, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([1e-3, 1e3, 1e-6, 1.0, 1e-9, 1e6], dtype=torch.float64)
    rows2 = to_rows((qa * s.sqrt()).T, qb * s.sqrt())
    assert math.isclose(kept_energy_ratio(rows2, d, 2 * n, "soft"), 1.0, rel_tol=1e-9)
    with pytest.raises(ValueError, match="keep"):
        kept_energy_ratio(rows, d, 7 * n)


def test_kept_product_rel_err() -> None:
    d, k = 10, 8
    n = d + k
    A, B = _orthogonal(6, d, k, 10)
    rows = to_rows(A, B)
    sig = torch.linalg.svdvals(B @ A)
    oracle = kept_product_rel_err(rows, d, 3 * n, "svd")
    assert math.isclose(oracle, float(sig[3:].norm() / sig.norm()), rel_tol=1e-9)
    assert kept_product_rel_err(rows, d, 6 * n, "dense") < 1e-12
    assert kept_product_rel_err(rows, d, 3 * n, "soft") < kept_product_rel_err(
        rows, d, 3 * n, "rlora", seed=1
    )
