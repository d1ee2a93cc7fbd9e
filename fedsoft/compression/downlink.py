"""Compressed downlink: the server broadcasts the change of a reference model that clients hold,
top-k sparsified and quantised with a server-side error memory (the unsent residual).

Bidirectional compression in the error-feedback style of eqs. (10)-(14) of arXiv 2505.00333,
applied by the server to what it broadcasts (PROPOSED: the paper compresses the uplink only).
The server keeps the true global model ``x_t`` (what aggregation produces) and a broadcast
reference ``xh_t`` that synchronised clients hold. Each round

    inc_t = D(E(S(x_{t-1} - xh_{t-1})))        xh_t = xh_{t-1} + inc_t

with ``S`` the top-k of every block's change at ``downlink-sparsity``, ``E``/``D`` the codec at
``wire-dtype``; the residual ``x - xh`` is the server's error memory, sent in later rounds. The
server applies its own decoded payload, so a client one round behind reconstructs ``xh_t``
bit for bit. A client that last synchronised ``s`` rounds ago (``s`` within ``history``) gets
``xh_t - xh_s`` in float32 at the union of the increments' positions (the client's
``xh_s + (xh_t - xh_s)`` equals ``xh_t`` up to one float32 rounding per entry, about 1e-7
relative; the next full refresh removes it), or the whole ``xh_t`` when that is smaller; a
client the server has no reference for gets the whole ``xh_t`` (a full refresh), and so does
a client whose last message got no reply (it may or may not hold that round). Clients train
from ``xh_t``; replies that are changes are added to ``x_{t-1}`` (whole-model replies get the
residual ``x - xh`` added back), so nothing the clients learned is lost to the broadcast's
compression.

Blocks: each LoRA layer as rank rows ``[b_j ; a_j]`` (:class:`~fedsoft.layout.LayerSpec`) and
each head tensor as rows (:class:`~fedsoft.layout.RowsSpec`), in array order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedsoft.compression import codec, quantize
from fedsoft.compression.sparsifiers import from_rows, to_rows
from fedsoft.compression.update import topk_mask
from fedsoft.config import check_sparsity
from fedsoft.layout import (
    A_SUFFIX,
    B_SUFFIX,
    HEAD_PREFIX,
    LayerSpec,
    RowsSpec,
    head_specs,
    layer_specs,
)

__all__ = ["Broadcast", "DownlinkError", "Outgoing", "apply_change", "encode_change",
           "payload_dtype"]

_DTYPE_OF_VALS = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                  np.dtype(np.int8): "int8", np.dtype(np.uint8): "int4"}


class DownlinkError(ValueError):
    """A broadcast change cannot be applied (malformed, or not for the reference held)."""


def _blocks(arrays: Mapping[str, np.ndarray]) -> list[LayerSpec | RowsSpec]:
    return [*layer_specs(arrays), *head_specs(arrays)]


def _block_rows(arrays: Mapping[str, np.ndarray], spec: LayerSpec | RowsSpec) -> np.ndarray:
    if isinstance(spec, LayerSpec):
        a = torch.from_numpy(np.asarray(arrays[spec.name + A_SUFFIX], np.float32))
        b = torch.from_numpy(np.asarray(arrays[spec.name + B_SUFFIX], np.float32))
        return to_rows(a, b).numpy()
    return np.asarray(arrays[HEAD_PREFIX + spec.name], np.float32).reshape(spec.shape)


def _add_rows(out: dict[str, np.ndarray], spec: LayerSpec | RowsSpec, rows: np.ndarray) -> None:
    if isinstance(spec, LayerSpec):
        da, db = from_rows(torch.from_numpy(rows), spec.d)
        ka, kb = spec.name + A_SUFFIX, spec.name + B_SUFFIX
        out[ka] = (out[ka] + da.numpy()).astype(np.float32)
        out[kb] = (out[kb] + db.numpy()).astype(np.float32)
    else:
        key = HEAD_PREFIX + spec.name
        out[key] = (out[key] + rows.reshape(out[key].shape)).astype(np.float32)


def encode_change(change: Mapping[str, np.ndarray], sparsity: float | None, dtype: str
                  ) -> dict[str, np.ndarray]:
    """Codec payload of ``change`` (arrays with the model's keys): per block the top-k of
    ``|change|`` at ``sparsity``, or (``sparsity=None``) exactly its non-zero entries."""
    layers = []
    for spec in _blocks(change):
        rows = _block_rows(change, spec)
        if sparsity is None:
            mask = rows != 0
        else:
            keep = int(round((1.0 - check_sparsity(sparsity, "downlink-sparsity")) * spec.size))
            mask = topk_mask(torch.from_numpy(rows), keep).numpy()
        layers.append((spec, np.where(mask, rows, np.float32(0)), mask))
    return codec.encode(layers, dtype=dtype)


def payload_dtype(payload: Mapping[str, np.ndarray]) -> str:
    """The wire dtype of a change payload, from its ``vals`` array."""
    vals = payload.get(codec.VALS)
    if not isinstance(vals, np.ndarray) or vals.dtype not in _DTYPE_OF_VALS:
        got = None if not isinstance(vals, np.ndarray) else vals.dtype
        raise DownlinkError(f"downlink payload: field 'vals' has dtype {got}, expected one of "
                            f"{sorted(str(d) for d in _DTYPE_OF_VALS)}")
    return _DTYPE_OF_VALS[vals.dtype]


def apply_change(reference: Mapping[str, np.ndarray], payload: Mapping[str, np.ndarray],
                 dtype: str | None = None) -> dict[str, np.ndarray]:
    """``reference + decoded change`` (new arrays; ``reference`` is not modified). The payload
    is validated against the reference's layout; any problem raises :class:`DownlinkError`."""
    dtype = payload_dtype(payload) if dtype is None else dtype
    specs = _blocks(reference)
    try:
        rows, _ = codec.decode(payload, specs, dtype=dtype)
    except codec.CodecError as err:
        raise DownlinkError(f"downlink payload: {err}") from err
    out = {k: np.array(v, dtype=np.float32) for k, v in reference.items()}
    for spec, (values, _) in zip(specs, rows, strict=True):
        _add_rows(out, spec, values)
    return out


@dataclass(frozen=True)
class Outgoing:
    """What one client is sent: ``arrays`` (the model, or a change payload) and ``base``, the
    round of the reference the change applies to (None: ``arrays`` is the whole model)."""

    arrays: dict[str, np.ndarray]
    base: int | None


class Broadcast:
    """Server side of the compressed downlink (see the module docstring)."""

    def __init__(self, sparsity: float, dtype: str = "float32", history: int = 4) -> None:
        self.sparsity = check_sparsity(sparsity, "downlink-sparsity")
        self.dtype = quantize.check_dtype(dtype)
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"downlink-history = {history!r}: must be an int >= 1")
        self.history = history
        self.reference: dict[str, np.ndarray] | None = None
        self.snapshots: dict[int, dict[str, np.ndarray]] = {}
        self.round: int | None = None
        self.increment: dict[str, np.ndarray] | None = None  # payload xh_{t-1} -> xh_t

    def advance(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        """Move the reference toward ``global_arrays`` (x_{t-1}) for round ``server_round``."""
        current = {k: np.asarray(v, np.float32) for k, v in global_arrays.items()}
        if self.reference is None or set(self.reference) != set(current) or any(
                self.reference[k].shape != v.shape for k, v in current.items()):
            self.reference = {k: v.copy() for k, v in current.items()}
            self.snapshots = {}
            self.increment = None
        else:
            change = {k: current[k] - self.reference[k] for k in current}
            self.increment = encode_change(change, self.sparsity, self.dtype)
            self.reference = apply_change(self.reference, self.increment, self.dtype)
        self.round = int(server_round)
        self.snapshots[self.round] = self.reference
        for old in sorted(self.snapshots)[:-(self.history + 1)]:  # rounds t - history .. t
            del self.snapshots[old]

    def residual(self, global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``x - xh``: what the broadcast has not yet delivered (the server's error memory)."""
        if self.reference is None:
            raise DownlinkError("no reference yet: call advance() first")
        return {k: np.asarray(v, np.float32) - self.reference[k]
                for k, v in global_arrays.items()}

    def outgoing(self, last_sync: int | None, full_nbytes: int,
                 nbytes=codec.payload_nbytes) -> Outgoing:
        """What a client whose last synchronised round is ``last_sync`` receives this round:
        the increment (one round behind), the exact change since ``last_sync`` (within the
        history), or the whole reference when that is no larger (``full_nbytes``)."""
        if self.reference is None or self.round is None:
            raise DownlinkError("no reference yet: call advance() first")
        if last_sync is None or last_sync not in self.snapshots or last_sync >= self.round:
            return Outgoing(self.reference, None)
        if last_sync == self.round - 1 and self.increment is not None:
            payload = self.increment
        else:
            base = self.snapshots[last_sync]
            payload = encode_change({k: self.reference[k] - base[k] for k in self.reference},
                                    None, "float32")
        if nbytes(payload) >= full_nbytes:
            return Outgoing(self.reference, None)
        return Outgoing(payload, int(last_sync))
