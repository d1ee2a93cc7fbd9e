"""Frozen-prefix cache: the outputs of the transformer blocks below the lowest LoRA block,
computed once per example, and a forward pass that runs only the blocks above them.

With LoRA on the upper blocks only (``lora-layers``), the embeddings and the lower blocks hold
no trainable parameter, so their output for an example never changes during a run. Computing it
once (``frozen-prefix = "cache"``) leaves each local step and each evaluation with the upper
blocks, the pooler and the head: the same model, several times cheaper on a CPU. The prefix is
computed in eval mode (no dropout below the first LoRA block; the upper blocks keep theirs).
Text models of the BERT family (``bert.*``, ``distilbert.*``) are supported.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["PrefixError", "PrefixModel", "cached_loader", "first_lora_block", "prefix_features"]

# (embeddings module path, blocks ModuleList path) below the task model
_LAYOUTS = (("bert.embeddings", "bert.encoder.layer"),
            ("distilbert.embeddings", "distilbert.transformer.layer"))


class PrefixError(ValueError):
    """The model cannot run with a frozen prefix (layout unknown, or LoRA in block 0)."""


def _task_model(model: nn.Module) -> nn.Module:
    """The transformers task model under peft's wrappers (PeftModel -> LoraModel -> model)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _set(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(_get(root, parent_path), name, value)


def _layout(model: nn.Module) -> tuple[nn.Module, str, str]:
    task = _task_model(model)
    for emb, blocks in _LAYOUTS:
        if isinstance(_get(task, blocks), nn.ModuleList) and _get(task, emb) is not None:
            return task, emb, blocks
    raise PrefixError(f"frozen-prefix = 'cache': {type(task).__name__} is not a BERT-family text "
                      "model (bert.* or distilbert.*); set frozen-prefix = 'off'")


def first_lora_block(model: nn.Module) -> int:
    """Index of the lowest block with a trainable parameter (a LoRA factor)."""
    task, _, blocks = _layout(model)
    layers = _get(task, blocks)
    for i, block in enumerate(layers):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(layers)


class _PassThrough(nn.Module):
    """Stands in for the embeddings: returns the cached hidden states given as inputs_embeds."""

    def forward(self, input_ids: Any = None, inputs_embeds: Any = None, **_: Any) -> torch.Tensor:
        if inputs_embeds is None:
            raise PrefixError("the frozen-prefix model needs cached hidden states (inputs_embeds)")
        return inputs_embeds


class PrefixModel(nn.Module):
    """``model`` run from the cached output of its first ``start`` blocks: each call swaps in a
    pass-through for the embeddings and only the upper blocks, calls the model's own forward
    (its attention masks, pooler and head), then restores it. Parameters are the model's."""

    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        self.model = model
        self.start = int(start)
        self._task, self._emb, self._blocks = _layout(model)
        if self.start < 1:
            raise PrefixError("frozen-prefix = 'cache': LoRA adapts block 0, so there is no "
                              "frozen prefix to cache; set lora-layers to the upper blocks")

    @contextmanager
    def _top_only(self) -> Iterator[None]:
        emb, blocks = _get(self._task, self._emb), _get(self._task, self._blocks)
        _set(self._task, self._emb, _PassThrough())
        _set(self._task, self._blocks, nn.ModuleList(list(blocks)[self.start:]))
        try:
            yield
        finally:
            _set(self._task, self._emb, emb)
            _set(self._task, self._blocks, blocks)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                **kwargs: Any) -> Any:
        with self._top_only():
            return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              **kwargs)


class _Cached(Dataset):
    def __init__(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.hidden, self.mask, self.labels = hidden, mask, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs_embeds": self.hidden[i], "attention_mask": self.mask[i],
                "labels": self.labels[i]}


@torch.no_grad()
def prefix_features(model: nn.Module, start: int, examples: Sequence[Any], collate: Any,
                    length: int, batch_size: int = 64) -> _Cached:
    """Hidden states after block ``start - 1`` (``hidden_states[start]``) of every example,
    right-padded to ``length`` tokens, with the attention masks and labels."""
    was_training = model.training
    model.eval()
    hidden, masks, labels = [], [], []
    try:
        for lo in range(0, len(examples), batch_size):
            batch = collate([examples[i] for i in range(lo, min(lo + batch_size, len(examples)))])
            y = batch.pop("labels")
            out = model(**batch, output_hidden_states=True)
            h = out.hidden_states[start]
            m = batch["attention_mask"]
            pad = length - h.shape[1]
            if pad < 0:
                raise PrefixError(f"sequence length {h.shape[1]} > max-length {length}")
            hidden.append(nn.functional.pad(h, (0, 0, 0, pad)).float())
            masks.append(nn.functional.pad(m, (0, pad)))
            labels.append(y)
    finally:
        model.train(was_training)
    return _Cached(torch.cat(hidden), torch.cat(masks), torch.cat(labels))


_CACHE: dict[tuple, _Cached] = {}
_MAX_ENTRIES = 64
MAX_CACHE_BYTES = 2 << 30  # cached features per process; the oldest entries go first


def _nbytes(c: _Cached) -> int:
    return int(c.hidden.numel() * c.hidden.element_size() + c.mask.numel()
               * c.mask.element_size() + c.labels.numel() * c.labels.element_size())


def cached_loader(key: tuple, model: nn.Module, start: int, examples: Sequence[Any],
                  collate: Any, length: int, batch_size: int, *, shuffle: bool,
                  seed: int) -> DataLoader:
    """A loader over the cached prefix features of ``examples`` (computed on first use for
    ``key``, then kept for this process within ``MAX_CACHE_BYTES``, oldest out first),
    shuffled by a generator seeded with ``seed``."""
    if key not in _CACHE:
        features = prefix_features(model, start, examples, collate, length)
        while _CACHE and (len(_CACHE) >= _MAX_ENTRIES or _nbytes(features) + sum(
                _nbytes(c) for c in _CACHE.values()) > MAX_CACHE_BYTES):
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = features
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(_CACHE[key], batch_size=batch_size, shuffle=shuffle, generator=gen)


def clear_cache() -> None:
    """Forget every cached prefix (e.g. when the model is rebuilt)."""
    _CACHE.clear()
