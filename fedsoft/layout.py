"""LoRA array layout: the names of a factor dict (``<layer>.lora_A`` r x k, ``<layer>.lora_B``
d x r, ``head.*``), per-layer shapes (eq. 1 of arXiv 2505.00333) and per-layer seeds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["A_SUFFIX", "B_SUFFIX", "HEAD_PREFIX", "LayerSpec", "RowsSpec", "head_arrays",
           "head_specs", "layer_seed", "layer_specs", "rows_spec"]

A_SUFFIX = ".lora_A"
B_SUFFIX = ".lora_B"
HEAD_PREFIX = "head."


def _check_spec(spec: object, fields: tuple[str, ...]) -> None:
    """A spec's ``name`` is a str and ``fields`` positive ints (stored as Python ints)."""
    cls = type(spec).__name__
    if not isinstance(spec.name, str):
        raise TypeError(f"{cls}.name must be a str, got {spec.name!r}")
    for field in fields:
        value = getattr(spec, field)
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{cls}.{field} must be an int, got {value!r}")
        if value <= 0:
            raise ValueError(f"{cls}.{field} must be positive, got {value!r}")
        object.__setattr__(spec, field, int(value))


@dataclass(frozen=True)
class LayerSpec:
    """One LoRA layer: ``B`` is ``d x r`` and ``A`` is ``r x k``, rank rows have length ``d + k``.

    The per-layer payload of eq. (6) (arXiv 2505.00333) is ``(1 - rho) r (d + k) q`` bits.
    """

    name: str
    r: int
    d: int
    k: int

    def __post_init__(self) -> None:
        _check_spec(self, ("r", "d", "k"))

    @property
    def row_len(self) -> int:
        """Length ``d + k`` of one rank row ``[b_j ; a_j]``."""
        return self.d + self.k

    @property
    def size(self) -> int:
        """Number of entries ``r (d + k)`` of the rank-rows matrix."""
        return self.r * (self.d + self.k)



@dataclass(frozen=True)
class RowsSpec:
    """A dense tensor seen as ``r`` rows of ``row_len`` entries for the codec (e.g. the head,
    classes x hidden), sparsified and quantised like a LoRA layer's rank rows."""

    name: str
    r: int
    row_len: int

    def __post_init__(self) -> None:
        _check_spec(self, ("r", "row_len"))

    @property
    def size(self) -> int:
        """Number of entries ``r * row_len``."""
        return self.r * self.row_len

    @property
    def shape(self) -> tuple[int, int]:
        return (self.r, self.row_len)


def rows_spec(name: str, shape: tuple[int, ...]) -> RowsSpec:
    """A tensor of ``shape`` as rows: a matrix by its rows, a vector as one row, higher ranks
    by their first axis."""
    shape = tuple(int(n) for n in shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return RowsSpec(name, rows, max(int(np.prod(shape)) // max(rows, 1), 1))


def head_specs(arrays: Mapping[str, np.ndarray]) -> list[RowsSpec]:
    """The head tensors as rows (names without ``head.``, see :func:`rows_spec`)."""
    return [rows_spec(name, np.shape(value)) for name, value in head_arrays(arrays).items()]


def layer_specs(arrays: Mapping[str, np.ndarray]) -> list[LayerSpec]:
    """LoRA layer specs in array order from ``<layer>.lora_A`` (r x k) / ``.lora_B`` (d x r)."""
    specs = []
    for key, a in arrays.items():
        if key.endswith(A_SUFFIX):
            name = key[: -len(A_SUFFIX)]
            b = arrays[name + B_SUFFIX]
            specs.append(LayerSpec(name, int(a.shape[0]), int(b.shape[0]), int(a.shape[1])))
    return specs


def head_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The densely federated head parameters (names without the ``head.`` prefix)."""
    return {k[len(HEAD_PREFIX):]: v for k, v in arrays.items() if k.startswith(HEAD_PREFIX)}


def layer_seed(seed: int, server_round: int, node_id: int, layer: int) -> int:
    """Shared seed of one (run, round, node, layer) for seeded positions (rlora, fedlodrop)."""
    words = [seed, server_round, node_id & 0xFFFFFFFF, (node_id >> 32) & 0xFFFFFFFF, layer]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)
