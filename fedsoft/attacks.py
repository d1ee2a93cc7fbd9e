"""Fault injection: hostile client replies (run-config ``attack-partition``/``attack-mode``).

A researcher checks what a server survives by letting one simulated client send, each round,
a reply of one class below instead of its honest one. Every class is something the server
must drop (with its reason logged) while it aggregates the honest replies unchanged:

=============== ==============================================================================
class           the reply
=============== ==============================================================================
empty-data      one Array whose serialised bytes are empty (np.load would raise EOFError)
huge-header     one Array whose npy header declares 2^40 elements, with a few bytes of data
float64         the honest arrays in float64 with values near 1e300 (float32 would make Inf)
huge-values     the honest layout in the wire dtype with finite but huge values (1e19)
garbage         the honest layout with random values at 50x the honest update's scale
num-examples    the honest reply claiming 2^63 - 1 examples (it would own the aggregate)
stale-round     the honest reply labelled with the previous round
bad-metric      the honest reply whose ``train-loss`` and ``train-s`` are lists
nan             the honest layout with NaN values
=============== ==============================================================================

``cycle`` walks through the classes in this order, one per round; ``crash`` makes the client
fail instead (the honest-only reference run). Nothing here is used unless the keys are set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CLASSES", "RawArray", "HostileReply", "attack_class", "hostile_reply"]

CLASSES = ("empty-data", "huge-header", "float64", "huge-values", "garbage", "num-examples",
           "stale-round", "bad-metric", "nan")
GARBAGE_SCALE = 50.0
HUGE_VALUE = 1e19


@dataclass(frozen=True)
class RawArray:
    """An Array given by its fields (dtype, shape, bytes), bypassing numpy serialisation."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass
class HostileReply:
    """What the ClientApp sends instead of its honest reply."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, object]
    raw: dict[str, RawArray] = field(default_factory=dict)  # replaces arrays of the same key


def attack_class(mode: str, server_round: int) -> str:
    """The class a hostile client uses in ``server_round`` (``cycle``: one per round)."""
    if mode == "cycle":
        return CLASSES[(int(server_round) - 1) % len(CLASSES)]
    if mode not in CLASSES:
        raise ValueError(f"attack-mode = {mode!r}: one of 'cycle', 'crash', {CLASSES}")
    return mode


def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    import io

    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                     "shape": shape})
    return buf.getvalue()


def hostile_reply(kind: str, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, object],
                  global_arrays: Mapping[str, np.ndarray], *, seed: int = 0) -> HostileReply:
    """Turn an honest reply (``arrays``, ``metrics``) into one of class ``kind``.

    ``global_arrays`` are the arrays the client received: ``garbage`` scales its noise to the
    honest change (``arrays`` minus ``global_arrays`` where keys and shapes match, else the
    honest values themselves, e.g. a sparse payload of deltas)."""
    rng = np.random.default_rng(seed)
    out = {k: np.array(v, copy=True) for k, v in arrays.items()}
    met = dict(metrics)
    first = next(iter(out))
    if kind == "empty-data":
        a = out[first]
        return HostileReply(out, met, {first: RawArray(a.dtype.name, tuple(a.shape), b"")})
    if kind == "huge-header":
        a = out[first]
        shape = (1 << 40,)
        return HostileReply(out, met, {first: RawArray(
            a.dtype.name, shape, _npy_header(a.dtype.name, shape) + b"\0" * 64)})
    if kind == "float64":
        return HostileReply({k: np.full(v.shape, 1e300, np.float64) if v.dtype.kind == "f"
                             else v for k, v in out.items()}, met)
    if kind in ("huge-values", "garbage", "nan"):
        for key, value in out.items():
            if value.dtype.kind != "f" or value.size == 0:
                continue
            ref = global_arrays.get(key)
            honest = value.astype(np.float64)
            base = np.asarray(ref, np.float64) if ref is not None and np.shape(ref) == \
                value.shape else np.zeros_like(honest)
            if kind == "huge-values":
                new = np.full(value.shape, HUGE_VALUE)
            elif kind == "nan":
                new = honest.copy()
                new.flat[0] = np.nan
            else:
                scale = float(np.std(honest - base)) or 1e-3
                new = base + GARBAGE_SCALE * scale * rng.standard_normal(value.shape)
            out[key] = new.astype(value.dtype)
        return HostileReply(out, met)
    if kind == "num-examples":
        met["num-examples"] = (1 << 63) - 1
        return HostileReply(out, met)
    if kind == "stale-round":
        met["server-round"] = int(met.get("server-round", 1)) - 1
        return HostileReply(out, met)
    if kind == "bad-metric":
        met["train-loss"] = [0.0, 1.0]
        met["train-s"] = [1.0]
        return HostileReply(out, met)
    raise ValueError(f"unknown attack class {kind!r}; known: {CLASSES}")
