"""Local training (AdamW, task loss + SOFT's orthogonality loss, eq. 7) and evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from fedsoft.lora import trainable_factors


@dataclass(frozen=True)
class TrainResult:
    """What one local training call did."""

    loss: float  # mean task loss over the steps
    orth_loss: float  # mean orthogonality penalty (eq. 7), 0 when zeta = 0
    steps: int
    examples: int


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _batches(loader: Iterable, epochs: int, steps: int):
    """Yield ``steps`` batches cycling over the loader, or ``epochs`` full passes if steps = 0."""
    if steps > 0:
        done = 0
        while done < steps:
            empty = True
            for batch in loader:
                empty = False
                yield batch
                done += 1
                if done >= steps:
                    return
            if empty:
                return
    else:
        for _ in range(epochs):
            yield from loader


def train_local(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    epochs: int = 1,
    steps: int = 0,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    zeta: float = 0.0,
    device: torch.device | str = "cpu",
) -> TrainResult:
    """AdamW on the trainable parameters with loss = task + zeta * orthogonality penalty (eq. 7)."""
    from fedsoft.compression.orthogonality import orth_penalty  # SOFT's penalty, eq. (7)

    if not (isinstance(zeta, int | float) and math.isfinite(zeta) and zeta >= 0):
        raise ValueError(f"zeta must be a finite number >= 0, got {zeta!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    device = torch.device(device)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    factors = trainable_factors(model) if zeta > 0 else []
    task_sum, orth_sum, n_steps, n_examples = 0.0, 0.0, 0, 0
    for batch in _batches(loader, epochs, steps):
        batch = _to(batch, device)
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**batch).logits
        loss = F.cross_entropy(logits.float(), labels)
        total = loss
        if factors:
            orth = sum(orth_penalty(a, b) for a, b in factors)
            total = loss + zeta * orth
            orth_sum += float(orth.detach())
        if not torch.isfinite(total):
            raise FloatingPointError(f"local training loss is {float(total)} at step {n_steps}")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        task_sum += float(loss.detach())
        n_steps += 1
        n_examples += int(labels.shape[0])
    model.eval()
    if n_steps == 0:
        raise ValueError("local training saw no batches: the partition is empty")
    return TrainResult(task_sum / n_steps, orth_sum / n_steps, n_steps, n_examples)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: Iterable, device: torch.device | str = "cpu"
) -> tuple[float, float, int]:
    """Mean cross-entropy loss, accuracy and example count on ``loader``."""
    device = torch.device(device)
    model.to(device)
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in loader:
        batch = _to(batch, device)
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**batch).logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += int(labels.shape[0])
    if count == 0:
        return math.nan, math.nan, 0
    return loss_sum / count, correct / count, count
