"""LoRA factor get/set: exact round trips, validation that leaves the model untouched."""

import numpy as np
import pytest
import torch

from fedsoft import lora
from fedsoft.aggregate import ReplyError
from fedsoft.task.models import build_model, get_spec


@pytest.fixture
def model(tiny_dir):
    return build_model(get_spec("minilm-l6"), 4, 4, 8.0, source=tiny_dir("bert"), seed=0)


def test_factors_round_trip_exactly(model):
    factors = lora.get_factors(model)
    g = torch.Generator().manual_seed(1)
    new = [(n, torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g))
           for n, a, b in factors]
    lora.set_factors(model, new)
    got = lora.get_factors(model)
    assert [n for n, _, _ in got] == [n for n, _, _ in new]
    for (_, a, b), (_, a2, b2) in zip(new, got, strict=True):
        assert torch.equal(a, a2) and torch.equal(b, b2)
    shapes = lora.factor_shapes(model)
    for s, (_, a, b) in zip(shapes, got, strict=True):
        assert a.shape == (s.r, s.k) and b.shape == (s.d, s.r)


def test_arrays_round_trip_and_stable_names(model, tiny_dir):
    arrays = lora.to_arrays(model)
    rng = np.random.default_rng(0)
    changed = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in arrays.items()}
    lora.from_arrays(model, changed)
    back = lora.to_arrays(model)
    assert list(back) == list(changed)
    assert all(np.array_equal(back[k], changed[k]) for k in back)
    other = build_model(get_spec("minilm-l6"), 4, 4, 8.0, source=tiny_dir("bert"), seed=5)
    assert list(lora.to_arrays(other)) == list(arrays)  # same names on every node
    assert any(k.startswith(lora.HEAD_PREFIX) for k in arrays)


@pytest.mark.parametrize("corrupt", ["missing", "extra", "shape", "nan", "int"])
def test_bad_arrays_rejected_and_model_untouched(model, corrupt):
    before = lora.to_arrays(model)
    bad = {k: v.copy() for k, v in before.items()}
    key = next(iter(bad))
    if corrupt == "missing":
        bad.pop(key)
    elif corrupt == "extra":
        bad["surprise"] = np.zeros(3, np.float32)
    elif corrupt == "shape":
        bad[key] = np.zeros((1, 1), np.float32)
    elif corrupt == "nan":
        bad[key][0, 0] = np.nan
    else:
        bad[key] = bad[key].astype(np.int32)
    with pytest.raises(ReplyError):
        lora.from_arrays(model, bad)
    after = lora.to_arrays(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
