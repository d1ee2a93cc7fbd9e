"""Conversions between Flower records and numpy dicts, and byte-level checks of received arrays."""

from __future__ import annotations

import io
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord
from numpy.lib import format as npy

from fedsoft.compression import codec, quantize
from fedsoft.layout import head_arrays

if TYPE_CHECKING:
    from fedsoft.compression.update import SparseSettings

__all__ = ["RecordError", "ReplyLayout", "checked_numpy", "npy_nbytes", "to_numpy", "to_record"]

_MAX_HEADER = 4096  # bytes of npy header accepted (np.save writes ~128 for fedsoft's arrays)


class RecordError(ValueError):
    """A received Array/ArrayRecord is malformed or larger than the round expects."""


@dataclass(frozen=True)
class ReplyLayout:
    """What one reply's ArrayRecord may hold, checked before anything is deserialised.

    ``arrays`` maps each allowed key to (allowed dtype names, exact shape or None = any 1-D or
    n-D shape); ``required`` keys must be present; ``max_bytes`` bounds the sum of the arrays'
    serialised sizes, so a small message can never make the server allocate more than it.
    """

    arrays: Mapping[str, tuple[frozenset[str], tuple[int, ...] | None]]
    required: frozenset[str] = field(default_factory=frozenset)
    max_bytes: int = 0

    @classmethod
    def exact(cls, reference: Mapping[str, tuple[str, tuple[int, ...]]]) -> ReplyLayout:
        """Exactly these keys, dtypes and shapes (dense and sketched replies)."""
        arrays = {k: (frozenset({dt}), tuple(shape)) for k, (dt, shape) in reference.items()}
        total = sum(_MAX_HEADER + math.prod(s) * np.dtype(dt).itemsize
                    for dt, s in reference.values())
        return cls(arrays, frozenset(arrays), total)

    @classmethod
    def payload(cls, settings: SparseSettings, global_arrays: Mapping[str, np.ndarray],
                max_bytes: int) -> ReplyLayout:
        """A sparse payload's layout: the codec's keys and dtypes
        (:mod:`fedsoft.compression.codec`) and a whole head in the wire dtype and its own shape
        (a sparse head travels with the LoRA rows), at most ``max_bytes``."""
        wire = quantize.wire_array_dtype(settings.dtype).name
        one_d = {codec.VALS: {wire}, codec.CNT: {"uint16", "uint32"}, codec.POS_MODE: {"uint8"},
                 codec.IDX: {"uint16"}, codec.BMP: {"uint8"}, codec.RICE: {"uint8"}}
        required = {codec.VALS, codec.CNT, codec.POS_MODE}
        if quantize.scaled(settings.dtype):
            one_d[codec.SCALE] = {"float32"}
            required.add(codec.SCALE)
        arrays = {k: (frozenset(v), None) for k, v in one_d.items()}
        if not settings.sparse_head:
            heads = head_arrays(global_arrays)
            arrays.update({codec.DENSE_PREFIX + k: (frozenset({wire}), v.shape)
                           for k, v in heads.items()})
            required |= {codec.DENSE_PREFIX + k for k in heads}
        return cls(arrays, frozenset(required), max_bytes)


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> {name: ndarray} (key order kept). For trusted records (our own)."""
    return {key: arr.numpy() for key, arr in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """{name: ndarray} -> ArrayRecord (key order kept)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(val)) for key, val in arrays.items()})


def npy_nbytes(key: str, arr: object, dtypes: Collection[str],
               shape: tuple[int, ...] | None = None) -> int:
    """Validate one received ``Array`` from its bytes alone and return its payload size.

    Checks, before ``np.load`` allocates anything: numpy serialisation, a well-formed npy header
    of at most 4 KiB, C order, a dtype in ``dtypes`` equal to the Array's declared dtype, the
    declared shape (and ``shape`` if given), and that the data holds exactly
    ``prod(shape) * itemsize`` bytes after the header. Raises :class:`RecordError` naming ``key``.
    """
    if not isinstance(arr, Array):
        raise RecordError(f"array {key!r}: not a Flower Array ({type(arr).__name__})")
    if arr.stype != "numpy.ndarray":
        raise RecordError(f"array {key!r}: serialisation {arr.stype!r}, expected numpy.ndarray")
    data = arr.data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RecordError(f"array {key!r}: data of type {type(data).__name__}, expected bytes")
    head = io.BytesIO(bytes(data[:_MAX_HEADER + 16]))
    try:
        version = npy.read_magic(head)
        if version == (1, 0):
            declared, fortran, dtype = npy.read_array_header_1_0(head, max_header_size=_MAX_HEADER)
        elif version == (2, 0):
            declared, fortran, dtype = npy.read_array_header_2_0(head, max_header_size=_MAX_HEADER)
        else:
            raise RecordError(f"array {key!r}: npy format version {version} not accepted")
    except RecordError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a malformed header
        raise RecordError(f"array {key!r}: malformed npy header ({type(exc).__name__}: "
                          f"{exc})") from None
    if fortran:
        raise RecordError(f"array {key!r}: Fortran-ordered data not accepted")
    if dtype.hasobject or dtype.name not in dtypes or dtype != dtype.newbyteorder("="):
        raise RecordError(f"array {key!r}: dtype {dtype.str} ({dtype.name}), expected one of "
                          f"{sorted(dtypes)}")
    if str(arr.dtype) != dtype.name:
        raise RecordError(f"array {key!r}: declared dtype {arr.dtype!r} != npy header "
                          f"{dtype.name!r}")
    if tuple(arr.shape) != tuple(declared):
        raise RecordError(f"array {key!r}: declared shape {tuple(arr.shape)} != npy header "
                          f"{tuple(declared)}")
    if shape is not None and tuple(declared) != tuple(shape):
        raise RecordError(f"array {key!r}: shape {tuple(declared)}, expected {tuple(shape)}")
    nbytes = math.prod(int(n) for n in declared) * dtype.itemsize  # Python ints: no overflow
    if len(data) != head.tell() + nbytes:
        raise RecordError(f"array {key!r}: {len(data) - head.tell()} data bytes, header "
                          f"declares {nbytes}")
    return nbytes


def checked_numpy(record: object, layout: ReplyLayout,
                  what: str = "reply") -> dict[str, np.ndarray]:
    """Deserialise a received ArrayRecord only after every Array passed :func:`npy_nbytes`
    against ``layout`` (keys, dtypes, shapes, total size)."""
    if not isinstance(record, ArrayRecord):
        raise RecordError(f"{what}: not an ArrayRecord ({type(record).__name__})")
    keys = list(record.keys())
    unknown = sorted(k for k in keys if k not in layout.arrays)
    if unknown:
        raise RecordError(f"{what}: unexpected array keys {unknown[:5]}"
                          + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    missing = sorted(layout.required - set(keys))
    if missing:
        raise RecordError(f"{what}: missing array keys {missing[:5]}")
    total = 0
    for key in keys:
        dtypes, shape = layout.arrays[key]
        total += npy_nbytes(key, record[key], dtypes, shape)
        if layout.max_bytes and total > layout.max_bytes:
            raise RecordError(f"{what}: more than {layout.max_bytes} bytes of arrays (at "
                              f"{key!r})")
    out = {}
    for key in keys:
        value = np.load(io.BytesIO(bytes(record[key].data)), allow_pickle=False)
        out[key] = np.ascontiguousarray(value)
    return out
