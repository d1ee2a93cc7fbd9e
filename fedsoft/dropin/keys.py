"""peft state-dict keys <-> fedsoft layout names (``<layer>.lora_A`` / ``.lora_B`` / ``head.*``)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedsoft.layout import A_SUFFIX, B_SUFFIX, HEAD_PREFIX

__all__ = ["KeyMap", "KeyMapError", "PEFT_PAIRS"]

# (A suffix, B suffix, layer-name tag) of the peft keys of one LoRA module, as
# get_peft_model_state_dict names them (adapter name removed): linear / conv, then embedding.
PEFT_PAIRS = ((".lora_A.weight", ".lora_B.weight", ""),
              (".lora_embedding_A", ".lora_embedding_B", ".embedding"))


class KeyMapError(ValueError):
    """A peft state dict that cannot be mapped onto fedsoft's LoRA layout (names the key)."""


@dataclass(frozen=True)
class _Entry:
    peft: str  # the peft key
    name: str  # its fedsoft name
    shape: tuple[int, ...]  # the peft shape (restored on the way back)
    dtype: np.dtype  # the peft dtype (restored on the way back)
    flat: tuple[int, int]  # the fedsoft shape: r x k (A), d x r (B), the peft shape (head)


def _split(key: str) -> tuple[str, str] | None:
    """``(layer name, "A" | "B")`` of a LoRA factor key, None for any other key."""
    for a_suffix, b_suffix, tag in PEFT_PAIRS:
        for suffix, side in ((a_suffix, "A"), (b_suffix, "B")):
            if key.endswith(suffix) and len(key) > len(suffix):
                return key[: -len(suffix)] + tag, side
    return None


class KeyMap:
    """The mapping of one peft state dict (e.g. ``ArrayRecord(get_peft_model_state_dict(m))``)
    onto fedsoft's layout (:mod:`fedsoft.layout`).

    A LoRA module ``X`` with ``X.lora_A.weight`` (``r x k``, conv: ``r x in x kh x kw``, seen as
    ``r x in*kh*kw``) and ``X.lora_B.weight`` (``d x r``, conv: ``d x r x 1 x 1``) becomes the
    layer ``X`` (``X.lora_A`` / ``X.lora_B``), whose rank rows ``[b_j ; a_j]`` are what SOFT
    scores and sparsifies (eqs. 8-10 of paper A); an embedding LoRA (``X.lora_embedding_A``
    ``r x num_embeddings``, ``X.lora_embedding_B`` ``dim x r``) becomes the layer
    ``X.embedding``. Every other key (``modules_to_save`` copies, ``lora_B.bias``, DoRA
    ``lora_magnitude_vector``, biases, ...) becomes ``head.<key>`` (sent whole, or as a sparse
    change at ``head-sparsity``). The way back restores the peft keys, shapes and dtypes in the
    order of the state dict the map was built from (the global ArrayRecord's key order).

    Refused, with :class:`KeyMapError` naming the key: a ``lora_A`` without its ``lora_B`` (or
    the reverse), factors whose ranks disagree or that are not ``r x k`` / ``d x r``, a
    non-float array, a layer whose name would fall under ``head.``, and two keys mapping to
    the same fedsoft name.
    """

    def __init__(self, entries: list[_Entry]) -> None:
        self._entries = entries
        self._by_peft = {e.peft: e for e in entries}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> KeyMap:
        """Build (and validate) the map of a peft state dict of numpy arrays."""
        factors: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
        for key, value in arrays.items():
            if not isinstance(key, str) or not key:
                raise KeyMapError(f"key {key!r}: array names must be non-empty strings")
            value = np.asarray(value)
            if not np.issubdtype(value.dtype, np.floating):
                raise KeyMapError(f"key {key!r}: dtype {value.dtype} is not a float dtype "
                                  "(fedsoft sends float updates only)")
            if value.size == 0:
                raise KeyMapError(f"key {key!r}: empty array of shape {value.shape}")
            split = _split(key)
            if split is not None:
                module, side = split
                factors.setdefault(module, {})[side] = (key, value)
        entries: list[_Entry] = []
        for key, value in arrays.items():
            value = np.asarray(value)
            split = _split(key)
            if split is None:
                name = HEAD_PREFIX + key
                if name.endswith((A_SUFFIX, B_SUFFIX)):
                    raise KeyMapError(f"key {key!r}: a non-LoRA key ending in {A_SUFFIX!r} / "
                                      f"{B_SUFFIX!r} would be read as a LoRA factor")
                entries.append(_Entry(key, name, value.shape, value.dtype, value.shape))
                continue
            module, side = split
            pair = factors[module]
            other = "B" if side == "A" else "A"
            if other not in pair:
                raise KeyMapError(f"key {key!r}: lora_{side} without its lora_{other} "
                                  f"(module {module!r})")
            if module.startswith(HEAD_PREFIX) or module == HEAD_PREFIX.rstrip("."):
                raise KeyMapError(f"key {key!r}: layer name {module!r} falls under "
                                  f"{HEAD_PREFIX!r}, fedsoft's head prefix")
            a = pair["A"][1]
            b = pair["B"][1]
            flat = _factor_shape(key, side, a, b)
            suffix = A_SUFFIX if side == "A" else B_SUFFIX
            entries.append(_Entry(key, module + suffix, value.shape, value.dtype, flat))
        seen: dict[str, str] = {}
        for e in entries:
            if e.name in seen:
                raise KeyMapError(f"key {e.peft!r}: maps to {e.name!r}, as {seen[e.name]!r} does")
            seen[e.name] = e.peft
        return cls(entries)

    @property
    def peft_keys(self) -> list[str]:
        """The peft keys in the order of the state dict the map was built from."""
        return [e.peft for e in self._entries]

    @property
    def names(self) -> list[str]:
        """The fedsoft names, in the same order."""
        return [e.name for e in self._entries]

    @property
    def signature(self) -> str:
        """A short digest of keys, shapes and dtypes (error memory is reset when it changes)."""
        text = ";".join(f"{e.peft}:{e.shape}:{e.dtype.str}" for e in self._entries)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_fedsoft(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """peft arrays (the map's keys and shapes) -> fedsoft names, float32, 2-D factors."""
        keys = set(arrays)
        if keys != set(self._by_peft):
            missing = sorted(set(self._by_peft) - keys)[:3]
            extra = sorted(keys - set(self._by_peft))[:3]
            raise KeyMapError(f"arrays do not match the map: missing {missing}, extra {extra}")
        out: dict[str, np.ndarray] = {}
        for e in self._entries:
            value = np.asarray(arrays[e.peft])
            if value.shape != e.shape:
                raise KeyMapError(f"key {e.peft!r}: shape {value.shape}, expected {e.shape}")
            if not np.issubdtype(value.dtype, np.floating):
                raise KeyMapError(f"key {e.peft!r}: dtype {value.dtype} is not a float dtype")
            out[e.name] = np.ascontiguousarray(value.astype(np.float32, copy=False)
                                               .reshape(e.flat))
        return out

    def to_peft(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """fedsoft-named arrays -> the peft keys, shapes and dtypes, in the map's order."""
        out: dict[str, np.ndarray] = {}
        for e in self._entries:
            if e.name not in arrays:
                raise KeyMapError(f"fedsoft array {e.name!r} (peft key {e.peft!r}) missing")
            value = np.asarray(arrays[e.name])
            if value.size != math.prod(e.shape):
                raise KeyMapError(f"fedsoft array {e.name!r}: {value.size} entries, peft key "
                                  f"{e.peft!r} has shape {e.shape}")
            out[e.peft] = np.ascontiguousarray(value.reshape(e.shape).astype(e.dtype,
                                                                             copy=False))
        return out


def _factor_shape(key: str, side: str, a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """The fedsoft shape of one factor: A as ``r x k``, B as ``d x r`` (``r`` shared)."""
    if a.ndim < 2 or b.ndim < 2:
        bad = a if a.ndim < 2 else b
        raise KeyMapError(f"key {key!r}: LoRA factor of shape {bad.shape}, expected a matrix "
                          "(lora_A r x k, lora_B d x r)")
    r = int(a.shape[0])
    if int(b.shape[1]) != r or any(int(n) != 1 for n in b.shape[2:]):
        raise KeyMapError(f"key {key!r}: lora_A {a.shape} / lora_B {b.shape} do not fit "
                          f"lora_A r x k and lora_B d x r with one rank r")
    if side == "A":
        return r, int(np.prod(a.shape[1:]))
    return int(b.shape[0]), r
