"""Batch collation (tokenised text or resized, normalised images) and seeded DataLoaders."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODALITIES = ("text", "image", "causal-lm")

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{field} must be an int >= 1, got {value!r}")
    return int(value)


def _triple(field: str, value: Any, positive: bool) -> torch.Tensor:
    try:
        vals = [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{field} must be a sequence of 3 floats, got {value!r}") from exc
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{field} must hold 3 finite floats, got {value!r}")
    if positive and min(vals) <= 0:
        raise ValueError(f"{field} entries must be > 0, got {value!r}")
    return torch.tensor(vals, dtype=torch.float32).view(1, 3, 1, 1)


def _labels(batch: Sequence[dict[str, Any]]) -> torch.Tensor:
    try:
        return torch.tensor([int(ex["label"]) for ex in batch], dtype=torch.long)
    except KeyError as exc:
        raise ValueError("every example needs a 'label' field") from exc


def _to_chw(img: Any) -> torch.Tensor:
    """One image (PIL, HxW / HxWxC / CxHxW array or tensor, or {bytes|path}) -> float (3,H,W)."""
    if isinstance(img, dict):  # datasets Image(decode=False)
        from PIL import Image

        src = io.BytesIO(img["bytes"]) if img.get("bytes") else img.get("path")
        if src is None:
            raise ValueError("image dict needs 'bytes' or 'path'")
        img = Image.open(src)
    if hasattr(img, "convert") and hasattr(img, "mode"):  # PIL image
        arr = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8))
        return arr.permute(2, 0, 1).to(torch.float32) / 255.0
    x = torch.as_tensor(np.asarray(img)) if not isinstance(img, torch.Tensor) else img
    if x.dtype == torch.bool:
        x = x.to(torch.float32)
    elif not torch.is_floating_point(x):
        x = x.to(torch.float32) / 255.0  # integer pixels are 0..255
    else:
        x = x.to(torch.float32)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    elif x.ndim == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3):
        x = x.permute(2, 0, 1)  # HWC -> CHW
    elif x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(f"image must be HxW, HxWxC or CxHxW with C in 1/3/4, got {tuple(x.shape)}")
    if x.shape[0] == 4:
        x = x[:3]
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    if not torch.isfinite(x).all():
        raise ValueError("image has non-finite pixel values")
    return x


def make_collate(
    modality: str,
    *,
    tokenizer: Any = None,
    max_length: int = 64,
    image_size: int = 224,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    packing: bool = False,
) -> Collate:
    """Collate function turning a list of ``{text|image, label}`` rows into model tensors.

    causal-lm: rows of :mod:`fedsoft.task.instructions` (``prefix``, ``input``, ``suffix``,
    ``response``) -> :func:`causal_collate`.

    text: ``tokenizer(texts, padding=True, truncation=True, max_length)`` tensors plus
    ``labels``. image: each image -> RGB float in [0, 1], bilinear (antialiased) resize to
    ``image_size`` x ``image_size`` with ``F.interpolate``, ``(x - mean) / std`` ->
    ``pixel_values`` (N, 3, S, S) plus ``labels``.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if modality == "causal-lm":
        return causal_collate(tokenizer, max_length, packing=packing)
    if modality == "text":
        if tokenizer is None or not callable(tokenizer):
            raise ValueError(f"tokenizer must be a callable tokenizer for text, got {tokenizer!r}")
        length = _positive_int("max_length", max_length)

        def collate_text(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            if not batch:
                raise ValueError("batch is empty")
            texts = [ex.get("text") for ex in batch]
            bad = [t for t in texts if not isinstance(t, str)]
            if bad:
                raise TypeError(f"field 'text' must hold str, got {type(bad[0]).__name__}")
            enc = tokenizer(
                texts, padding=True, truncation=True, max_length=length, return_tensors="pt"
            )
            out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
            out["labels"] = _labels(batch)
            return out

        return collate_text

    size = _positive_int("image_size", image_size)
    mean = _triple("image_mean", image_mean, positive=False)
    std = _triple("image_std", image_std, positive=True)

    def collate_image(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("batch is empty")
        imgs = []
        for ex in batch:
            if "image" not in ex:
                raise ValueError("every example needs an 'image' field")
            x = _to_chw(ex["image"]).unsqueeze(0)
            if x.shape[-2:] != (size, size):
                x = F.interpolate(
                    x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
                )
            imgs.append(x)
        pixels = (torch.cat(imgs) - mean) / std
        return {"pixel_values": pixels, "labels": _labels(batch)}

    return collate_image


def causal_collate(tokenizer: Any, max_length: int, *, packing: bool = False) -> Collate:
    """Instruction rows -> ``input_ids``, ``attention_mask``, ``labels`` (right-padded).

    Each row is the text ``prefix + input + suffix + " " + response``, tokenised as one string
    (so every boundary is tokenised as in running text), with ``[bos]`` in front when the
    tokenizer has one distinct from eos and ``eos`` at the end. Labels are -100 on every token
    that starts before the response, so the loss is on the response and its eos only. Over
    ``max_length`` tokens the input is cut (at a token boundary), then the response's tail
    (``complete`` is then 0 for that row, and its exact match does not count). A template
    longer than ``max_length`` with no room for one response token is a ValueError.
    ``packing`` concatenates the batch into one row with ``position_ids`` (no padding;
    ``transformers.DataCollatorWithFlattening``, -100 at every boundary). ``n_examples`` and
    ``complete`` (popped before the forward pass) describe the rows in either layout.
    """
    if tokenizer is None or not callable(tokenizer):
        raise ValueError(f"tokenizer must be a callable tokenizer, got {tokenizer!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a causal-LM tokenizer must be a fast tokenizer (token offsets)")
    length = _positive_int("max_length", max_length)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("a causal-LM tokenizer needs an eos token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id
    lead = [bos] if bos is not None and bos != eos else []

    @functools.lru_cache(maxsize=1 << 16)
    def tokens(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return tuple(enc["input_ids"]), tuple(start for start, _ in enc["offset_mapping"])

    def split(head: str, tail: str) -> tuple[list[int], int]:
        """The ids of head + tail, and how many of them start before the tail."""
        ids, starts = tokens(head + tail)
        return list(ids), sum(1 for st in starts if st < len(head))

    def encode(ex: dict[str, Any]) -> tuple[list[int], list[int], bool]:
        try:
            parts = [ex["prefix"], ex["input"], ex["suffix"], ex["response"]]
        except KeyError as exc:
            raise ValueError(f"an instruction row needs {exc.args[0]!r}") from None
        if not all(isinstance(p, str) for p in parts):
            raise TypeError("instruction fields must hold str")
        prefix, inp, suffix, resp = parts
        inp = inp[: 8 * length]  # characters: a long input is cut anyway, tokenise its head
        answer = " " + resp.strip()
        room = length - len(lead) - 1  # eos
        ids, n_prompt = split(prefix + inp + suffix, answer)
        if len(ids) > room and inp:  # cut the input at a token boundary, then re-tokenise
            in_ids, in_starts = tokens(inp)
            keep = len(in_ids)
            for _ in range(8):  # joining may merge a token or two at the cut: re-check
                keep = max(keep - (len(ids) - room), 0)
                cut = in_starts[keep] if keep < len(in_ids) else len(inp)
                ids, n_prompt = split(prefix + inp[:cut] + suffix, answer)
                if len(ids) <= room or keep == 0:
                    break
        if n_prompt + 1 > room:
            raise ValueError(
                f"max-length = {length}: the prompt template alone takes {n_prompt + len(lead)} "
                f"tokens, leaving no room for the response; use max-length >= "
                f"{n_prompt + len(lead) + 8} or prompt-template = 'short'")
        complete = len(ids) <= room
        ids = lead + (ids + [eos] if complete else ids[: room + 1])  # cut: no eos to score
        n_prompt += len(lead)
        return ids, [-100] * n_prompt + ids[n_prompt:], complete

    flatten = None
    if packing:
        from transformers import DataCollatorWithFlattening

        flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)

    def collate_causal(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("batch is empty")
        rows = [encode(ex) for ex in batch]
        if flatten is not None:
            out = flatten([{"input_ids": x, "labels": y} for x, y, _ in rows],
                          return_tensors="pt")
            out = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        else:
            width = max(len(x) for x, _, _ in rows)
            out = {
                "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x, _, _ in rows]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x))
                                                for x, _, _ in rows]),
                "labels": torch.tensor([y + [-100] * (width - len(y)) for _, y, _ in rows]),
            }
        out["n_examples"] = torch.tensor(len(rows))
        out["complete"] = torch.tensor([c for _, _, c in rows], dtype=torch.bool)
        return out

    return collate_causal


def make_loader(
    ds: Any,
    collate: Collate,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    *,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A ``DataLoader`` over ``ds``; shuffling is driven by a generator seeded with ``seed``."""
    bs = _positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if len(ds) == 0:
        raise ValueError("ds is empty (len(ds) == 0)")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(
        ds,
        batch_size=bs,
        shuffle=bool(shuffle),
        collate_fn=collate,
        generator=gen,
        drop_last=drop_last,
        num_workers=num_workers,
    )
