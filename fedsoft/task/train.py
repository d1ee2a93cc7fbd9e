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


def task_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
              ) -> torch.Tensor:
    """Cross-entropy of a classifier (labels (N,)) or of a causal LM (labels (N, T), next-token
    prediction, -100 = not scored: the prompt, padding and packing boundaries)."""
    if labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction=reduction)
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])  # one copy, in the model's dtype
    return F.cross_entropy(shifted.float(), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction=reduction)


def _examples(batch: dict[str, torch.Tensor], labels: torch.Tensor) -> int:
    batch.pop("complete", None)
    n = batch.pop("n_examples", None)
    return int(labels.shape[0]) if n is None else int(n)


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
        count = _examples(batch, labels)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**batch).logits
        loss = task_loss(logits, labels)
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
        n_examples += count
    model.eval()
    if n_steps == 0:
        raise ValueError("local training saw no batches: the partition is empty")
    return TrainResult(task_sum / n_steps, orth_sum / n_steps, n_steps, n_examples)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: Iterable, device: torch.device | str = "cpu"
) -> tuple[float, float, int]:
    """Mean cross-entropy loss, accuracy and example count on ``loader``.

    Causal LM (token labels): the loss is per response token (its exp is the perplexity) and
    the accuracy is the exact match of the greedy answer. Greedy decoding reproduces the
    reference response (and its eos) exactly iff every teacher-forced argmax over the
    response equals the next reference token, so one forward pass measures it exactly. A row
    whose response was cut by ``max-length`` (no eos scored: ``complete`` is 0) never counts
    as a match. Packed batches are refused: a packed row is many examples.
    """
    device = torch.device(device)
    model.to(device)
    model.eval()
    loss_sum, correct, count, tokens = 0.0, 0, 0, 0
    for batch in loader:
        batch = _to(batch, device)
        labels = batch.pop("labels")
        n_rows = batch.pop("n_examples", None)
        complete = batch.pop("complete", None)
        if n_rows is not None and int(n_rows) != labels.shape[0]:
            raise ValueError("evaluate needs unpacked batches (packing = true is for training)")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**batch).logits
        loss_sum += float(task_loss(logits, labels, reduction="sum"))
        if labels.dim() == 1:
            correct += int((logits.float().argmax(-1) == labels).sum())
            tokens += int(labels.shape[0])
        else:
            target = labels[:, 1:]
            scored = target != -100
            hit = ((logits[:, :-1].argmax(-1) == target) | ~scored).all(dim=1)
            hit &= scored.any(dim=1)
            if complete is not None:
                hit &= complete
            correct += int(hit.sum())
            tokens += int(scored.sum())
        count += int(labels.shape[0])
    if count == 0 or tokens == 0:
        return math.nan, math.nan, 0
    return loss_sum / tokens, correct / count, count
