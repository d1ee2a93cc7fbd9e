"""Tests of the error-feedback memory (eqs. 10-15)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsoft.compression.error_feedback import SIGNATURE_KEY, ErrorFeedback, ErrorFeedbackError
from fedsoft.compression.sparsifiers import SPARSIFIERS, keep_count


def _x(t: int, shape: tuple[int, int] = (4, 20), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + t)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("name", ["soft", "flasc", "rlora", "hetlora", "fedlodrop"])
def test_invariant_holds_bitwise_over_rounds(name: str) -> None:
    sp = SPARSIFIERS[name]
    d = 8
    keep = keep_count(4, d, 12, 0.7)
    ef = ErrorFeedback("vit-r4")
    for t in range(6):
        for i, layer in enumerate(("q0", "v0")):
            x = _x(t, seed=i)
            e_t = ef.memory.get(layer, torch.zeros_like(x))
            ref = x * 2 + 1  # e.g. the local factors when x is a delta
            out = ef.step(layer, x, lambda u, t=t, ref=ref: sp(u, d, keep, ref=ref, seed=t))
            assert torch.equal(x + e_t, out.values + ef.memory[layer])
            assert int(out.mask.sum()) == keep
            assert torch.all(ef.memory[layer][out.mask] == 0)
    assert ef.reset_reason is None


def test_svd_uses_subtraction() -> None:
    ef = ErrorFeedback("m")
    d = 8
    for t in range(3):
        x = _x(t)
        e_t = ef.memory.get("l", torch.zeros_like(x))
        out = ef.step("l", x, lambda u: SPARSIFIERS["svd"](u, d, 40))
        assert torch.allclose(x + e_t, out.values + ef.memory["l"], atol=1e-6)


def test_memory_obeys_lemma1_bound() -> None:
    """Deterministic top-k is a rho-contraction, so ||e_t||^2 <= 4 rho/(1-rho)^2 X^2 (eq. 15)."""
    rho = 0.8
    shape = (4, 20)
    keep = keep_count(4, 8, 12, rho)
    ef = ErrorFeedback("m")
    x_sq = 0.0
    for t in range(40):
        x = _x(t, shape)
        x_sq = max(x_sq, float((x**2).sum()))
        ef.step("l", x, lambda u: SPARSIFIERS["flasc"](u, 8, keep))
        bound = 2 * rho * (1 + rho) / (1 - rho) ** 2 * x_sq
        assert ef.sq_norm() <= bound


def test_reset_on_shape_change() -> None:
    ef = ErrorFeedback("m")
    ef.step("l", _x(0), lambda u: SPARSIFIERS["flasc"](u, 8, 10))
    ef.step("other", _x(1), lambda u: SPARSIFIERS["flasc"](u, 8, 10))
    assert ef.reset_reason is None
    x = _x(2, (6, 20))  # rank changed 4 -> 6
    out = ef.step("l", x, lambda u: SPARSIFIERS["flasc"](u, 8, 10))
    assert ef.reset_reason is not None and "'l'" in ef.reset_reason
    # the fresh memory started from zero: x == S(x) + e
    assert torch.equal(x, out.values + ef.memory["l"])
    assert "other" in ef.memory
    ef.clear_reset_reason()
    assert ef.reset_reason is None


def test_arrays_round_trip_and_signature_reset() -> None:
    ef = ErrorFeedback("vit-base|r=4")
    for t in range(3):
        ef.step("q0", _x(t), lambda u: SPARSIFIERS["soft"](u, 8, 30))
        ef.step("v0", _x(t, seed=1), lambda u: SPARSIFIERS["soft"](u, 8, 30))
    arrays = ef.to_arrays()
    assert SIGNATURE_KEY in arrays
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    back = ErrorFeedback.from_arrays(arrays, "vit-base|r=4")
    assert back.reset_reason is None and set(back.memory) == {"q0", "v0"}
    for k, v in ef.memory.items():
        assert torch.equal(back.memory[k], v)
    # continuing from the restored memory gives the same result as the original
    x = _x(9)
    a = ef.step("q0", x, lambda u: SPARSIFIERS["soft"](u, 8, 30))
    b = back.step("q0", x, lambda u: SPARSIFIERS["soft"](u, 8, 30))
    assert torch.equal(a.values, b.values)

    other = ErrorFeedback.from_arrays(arrays, "vit-base|r=8")
    assert other.memory == {} and "signature" in (other.reset_reason or "")
    assert other.signature == "vit-base|r=8"


def test_non_finite_raises() -> None:
    ef = ErrorFeedback("m")
    x = _x(0)
    ef.step("l", x, lambda u: SPARSIFIERS["flasc"](u, 8, 10))
    ef.memory["l"][0, 0] = float("inf")
    with pytest.raises(ErrorFeedbackError, match="memory"):
        ef.step("l", x, lambda u: SPARSIFIERS["flasc"](u, 8, 10))
    bad_x = x.clone()
    bad_x[1, 1] = float("nan")
    with pytest.raises(ErrorFeedbackError, match="x"):
        ErrorFeedback("m").step("l", bad_x, lambda u: SPARSIFIERS["flasc"](u, 8, 10))
    arrays = {SIGNATURE_KEY: ErrorFeedback("m").to_arrays()[SIGNATURE_KEY],
              "l": np.full((2, 3), np.nan, dtype=np.float32)}
    with pytest.raises(ErrorFeedbackError, match="'l'"):
        ErrorFeedback.from_arrays(arrays, "m")


def test_bad_inputs_raise() -> None:
    with pytest.raises(TypeError, match="signature"):
        ErrorFeedback(3)  # type: ignore[arg-type]
    ef = ErrorFeedback("m")
    with pytest.raises(ErrorFeedbackError, match="name"):
        ef.step("", _x(0), lambda u: SPARSIFIERS["flasc"](u, 8, 10))
    with pytest.raises(ErrorFeedbackError, match="SparseRows"):
        ef.step("l", _x(0), lambda u: u)  # type: ignore[arg-type,return-value]
