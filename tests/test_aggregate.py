"""Eq. (5) aggregation and reply validation."""

import numpy as np
import pytest

from fedsoft.aggregate import ReplyError, check_like, check_weight, weighted_average


def test_weighted_average_matches_manual_sum():
    rng = np.random.default_rng(0)
    arrays = [{"a": rng.standard_normal((3, 4)).astype(np.float32),
               "b": rng.standard_normal(5).astype(np.float32)} for _ in range(3)]
    w = [10.0, 30.0, 60.0]
    out = weighted_average(arrays, w)
    for key in ("a", "b"):
        manual = sum(wi / sum(w) * a[key].astype(np.float64)
                     for wi, a in zip(w, arrays, strict=True))
        np.testing.assert_allclose(out[key], manual, rtol=1e-6)
    same = weighted_average([arrays[0]] * 3, w)
    np.testing.assert_allclose(same["a"], arrays[0]["a"], rtol=1e-6)


def test_bad_weights_and_replies():
    with pytest.raises(ValueError, match="weights"):
        weighted_average([{"a": np.zeros(1)}], [0.0])
    for bad in (0, -1.0, float("nan"), "3", True):
        with pytest.raises(ReplyError, match="num-examples"):
            check_weight(bad)
    ref = {"a": np.zeros((2, 2), np.float32)}
    with pytest.raises(ReplyError, match="shape"):
        check_like(ref, {"a": np.zeros(3, np.float32)})
    with pytest.raises(ReplyError, match="NaN"):
        check_like(ref, {"a": np.full((2, 2), np.inf, np.float32)})
