"""Local training with SOFT's loss (eq. 7): the orthogonality term does what it says."""

import pytest
import torch

from fedsoft import lora
from fedsoft.compression.orthogonality import orth_offdiag
from fedsoft.task.models import build_model, get_spec
from fedsoft.task.train import train_local


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 100, (8, 12), generator=g),
             "attention_mask": torch.ones(8, 12, dtype=torch.long),
             "labels": torch.randint(0, 4, (8,), generator=g)} for _ in range(n)]


def _trained_offdiag(tiny_dir, zeta: float) -> tuple[float, float]:
    model = build_model(get_spec("minilm-l6"), 4, 4, 8.0, source=tiny_dir("bert"), seed=0)
    before = orth_offdiag([(a, b) for _, a, b in lora.get_factors(model)])
    torch.manual_seed(0)
    train_local(model, _batches(10), steps=10, lr=0.02, zeta=zeta)
    after = orth_offdiag([(a, b) for _, a, b in lora.get_factors(model)])
    return before, after


def test_orthogonality_loss_lowers_offdiagonal_energy(tiny_dir):
    before, plain = _trained_offdiag(tiny_dir, 0.0)
    _, soft = _trained_offdiag(tiny_dir, 1.0)
    assert soft < plain and soft < before, (before, plain, soft)


def test_zeta_zero_is_the_task_loss_alone_and_bad_values_are_named(tiny_dir):
    model = build_model(get_spec("minilm-l6"), 4, 4, 8.0, source=tiny_dir("bert"), seed=0)
    res = train_local(model, _batches(2), steps=3, lr=0.01, zeta=0.0)
    assert (res.steps, res.examples, res.orth_loss) == (3, 24, 0.0)
    assert train_local(model, _batches(2), steps=2, lr=0.01, zeta=0.5).orth_loss > 0
    for key, kwargs in (("zeta", {"zeta": -1.0}), ("zeta", {"zeta": float("nan")}),
                        ("lr", {"lr": 0.0})):
        with pytest.raises(ValueError, match=key):
            train_local(model, _batches(1), steps=1, **kwargs)
