"""Value quantisation for the wire: float32 / float16 casts and int8 / int4 codes with one
float32 scale per row, plus the exact round trip the error memory needs (eqs. 10-14).

Eq. (6) of arXiv 2505.00333 charges ``q`` bits per kept value; ``wire-dtype`` picks ``q``:
32 (``float32``), 16 (``float16``), 8 (``int8``) or 4 (``int4``). Integer codes are symmetric,
``c = rint(v / s)`` with ``s = max|v| / L`` over the kept values of one row (``L`` = 127 for
int8, 7 for int4), deterministic round-to-nearest-even. The rounding error is not lost: the
client puts ``u - Q(S(u))`` into its error memory, so the telescoping identity of eq. (14)
holds for every dtype (nearest rounding with error feedback has no long-run bias, which is what
stochastic rounding would otherwise buy). int4 codes are packed two per byte as ``c + 8``
(``1..15``; the pad nibble of an odd count is 0).
"""

from __future__ import annotations

import numpy as np

__all__ = ["QUANT_DTYPES", "WIRE_DTYPES", "QuantError", "dequantize", "quantize", "roundtrip",
           "scaled", "value_bits", "values_nbytes", "wire_array_dtype"]

WIRE_DTYPES = ("float32", "float16", "int8", "int4")
QUANT_DTYPES = ("int8", "int4")
_LEVELS = {"int8": 127, "int4": 7}
_BITS = {"float32": 32, "float16": 16, "int8": 8, "int4": 4}
_ARRAY_DTYPE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                "int8": np.dtype(np.int8), "int4": np.dtype(np.uint8)}


class QuantError(ValueError):
    """Malformed quantised values or scales; the message names the field and value."""


def check_dtype(dtype: str) -> str:
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise ValueError(f"wire-dtype = {dtype!r}: must be one of {list(WIRE_DTYPES)}")
    return dtype


def value_bits(dtype: str) -> int:
    """``q`` of eq. (6): bits per kept value on the wire."""
    return _BITS[check_dtype(dtype)]


def scaled(dtype: str) -> bool:
    """Whether ``dtype`` sends a per-row scale beside its codes."""
    return check_dtype(dtype) in QUANT_DTYPES


def wire_array_dtype(dtype: str) -> np.dtype:
    """numpy dtype of the ``vals`` array for ``dtype`` (int4: packed uint8)."""
    return _ARRAY_DTYPE[check_dtype(dtype)]


def values_nbytes(count: int, dtype: str) -> int:
    """Bytes of ``count`` values in ``dtype`` (scales not included)."""
    return -(-count * value_bits(dtype) // 8)


def _row_ids(counts: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(counts.size), counts)


def quantize(values: np.ndarray, counts: np.ndarray, dtype: str
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes (the ``vals`` array) and per-row scales (None for float dtypes) of a flat float
    vector whose consecutive rows hold ``counts`` values. Rejects non-finite input and float16
    overflow."""
    check_dtype(dtype)
    values = np.asarray(values)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = values[~np.isfinite(values)].ravel()[0]
        raise ValueError(f"values hold a non-finite value {bad!r}")
    if dtype not in QUANT_DTYPES:
        wire = _ARRAY_DTYPE[dtype]
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(values, dtype=wire)
        if not np.isfinite(out).all():
            bad = values[~np.isfinite(out)].ravel()[0]
            raise ValueError(f"value {bad!r} overflows wire dtype {wire}")
        return out, None
    counts = np.asarray(counts, dtype=np.int64)
    v = values.astype(np.float32, copy=False)
    levels = _LEVELS[dtype]
    peak = np.zeros(counts.size, dtype=np.float32)
    rows = _row_ids(counts)
    if v.size:
        np.maximum.at(peak, rows, np.abs(v))
    scales = (peak / np.float32(levels)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    codes = np.clip(np.rint(v / safe[rows]), -levels, levels).astype(np.int8)
    if dtype == "int4":
        return _pack4(codes), scales
    return codes, scales


def _pack4(codes: np.ndarray) -> np.ndarray:
    nib = (codes.astype(np.int16) + 8).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    return (nib[0::2] << 4 | nib[1::2]).astype(np.uint8)


def _unpack4(packed: np.ndarray, count: int, field: str) -> np.ndarray:
    if packed.size != -(-count // 2):
        raise QuantError(f"field {field!r}: {packed.size} bytes for {count} int4 codes, "
                         f"expected {-(-count // 2)}")
    nib = np.empty(2 * packed.size, dtype=np.uint8)
    nib[0::2], nib[1::2] = packed >> 4, packed & 0x0F
    if count % 2 and nib[-1] != 0:
        raise QuantError(f"field {field!r}: non-zero pad nibble {int(nib[-1])}")
    nib = nib[:count]
    bad = np.flatnonzero(nib == 0)
    if bad.size:
        raise QuantError(f"field {field!r}: int4 nibble 0 (code -8) at position "
                         f"{int(bad[0])}; codes are -7..7")
    return nib.astype(np.int16) - 8


def dequantize(codes: np.ndarray, scales: np.ndarray | None, counts: np.ndarray, dtype: str,
               field: str = "vals") -> np.ndarray:
    """float32 values from :func:`quantize`'s output, validated (codes in range, scales finite
    and >= 0, one scale per row, the result finite)."""
    check_dtype(dtype)
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if dtype not in QUANT_DTYPES:
        if codes.size != total:
            raise QuantError(f"field {field!r}: length {codes.size} != {total} kept entries")
        out = codes.astype(np.float32)
    else:
        if scales is None or scales.shape != (counts.size,):
            got = None if scales is None else scales.shape
            raise QuantError(f"field 'scale': shape {got}, expected ({counts.size},), one per "
                             f"row")
        if not np.isfinite(scales).all() or (scales < 0).any():
            j = int(np.flatnonzero(~np.isfinite(scales) | (scales < 0))[0])
            raise QuantError(f"field 'scale': value {scales[j]!r} at row {j} is not a finite "
                             f"number >= 0")
        if dtype == "int4":
            c = _unpack4(codes, total, field)
        else:
            if codes.size != total:
                raise QuantError(f"field {field!r}: length {codes.size} != {total} kept "
                                 f"entries")
            c = codes.astype(np.int16)
            if (c == -128).any():
                p = int(np.flatnonzero(c == -128)[0])
                raise QuantError(f"field {field!r}: int8 code -128 at position {p}; codes "
                                 f"are -127..127")
        with np.errstate(over="ignore"):  # reported below as a QuantError
            out = c.astype(np.float32) * scales.astype(np.float32)[_row_ids(counts)]
    if not np.isfinite(out).all():
        p = int(np.flatnonzero(~np.isfinite(out))[0])
        raise QuantError(f"field {field!r}: value at position {p} is not finite after "
                         f"scaling")
    return out


def roundtrip(values: np.ndarray, counts: np.ndarray, dtype: str) -> np.ndarray:
    """What the receiver reconstructs from ``values`` (float32): the sender's error memory
    takes ``values - roundtrip(values)`` so nothing is lost to rounding."""
    codes, scales = quantize(values, counts, dtype)
    return dequantize(codes, scales, counts, dtype)
