"""Position coding of kept entries: Rice-coded gaps near the log2 C(n, k) floor, with sizes.

The codec (:mod:`fedsoft.compression.codec`) sends the positions of a layer's kept entries in the
cheapest of: uint16 within-row indices, a bitmap, nothing (all kept, or seeded masks) or, here,
a Rice code of the gaps between consecutive flat positions (row-major over the layer). The
information floor of ``k`` positions among ``n`` is ``log2 C(n, k)`` bits (PROPOSED-L of
EQUATIONS.md: the position overhead eq. (6) of arXiv 2505.00333 leaves out); a Rice code with
its parameter chosen per layer comes within a few hundredths of a bit per entry of it when the
gaps are near-geometric, at any density.

One Rice segment (byte aligned, so layers concatenate):

* 1 byte: the Rice parameter ``b`` (``0 <= b <= MAX_RICE_PARAM``) in the low 7 bits, and in
  the high bit whether the segment codes the ``n - k`` *dropped* positions instead (the
  cheaper side when more than half is kept, so the code stays near the floor at any rho);
* the kept count ``k`` as an unsigned LEB128 varint (1 byte below 128, 2 below 16384, ...),
  so a segment is self-delimiting and the codec's uint16 per-row counts stay uint16 however
  large the layer;
* ``ceil(m b / 8)`` bytes (``m`` = the coded side's count): the low ``b`` bits of each of the
  ``m`` gaps, MSB first, zero
  padded;
* ``ceil((m + sum(q)) / 8)`` bytes: the quotients ``q = gap >> b`` in unary (``q`` one bits
  then a zero), zero padded.

Split streams make decoding a handful of vectorised numpy passes (the quotients are the runs
between the zeros of the unary stream), with no per-entry Python loop.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MAX_RICE_PARAM", "PositionError", "RiceReader", "floor_bits", "rice_decode",
           "rice_encode", "rice_expected_bytes", "rice_nbytes", "varint_nbytes"]

MAX_RICE_PARAM = 31


class PositionError(ValueError):
    """A position segment is malformed; the message says what and where."""


def floor_bits(n: int, k: int) -> float:
    """``log2 C(n, k)``: bits any code needs on average for ``k`` positions among ``n``."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got n = {n}, k = {k}")
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _gaps(positions: np.ndarray) -> np.ndarray:
    pos = np.asarray(positions, dtype=np.int64)
    return np.diff(pos, prepend=-1) - 1


def varint_nbytes(value: int) -> int:
    """Bytes of ``value`` as an unsigned LEB128 varint."""
    return max(1, -(-int(value).bit_length() // 7))


def _varint(value: int) -> np.ndarray:
    out = []
    value = int(value)
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return np.array(out, dtype=np.uint8)


def _best_param(gaps: np.ndarray) -> tuple[int, int]:
    """Rice parameter with the fewest low + unary + header bytes (without the count varint),
    and those bytes."""
    n = gaps.size
    if n == 0:
        return 0, 1
    top = max(int(gaps.max()).bit_length(), 0)
    best = (0, -1)
    for b in range(min(top, MAX_RICE_PARAM) + 1):
        size = 1 + -(-n * b // 8) + -(-(n + int((gaps >> b).sum())) // 8)
        if best[1] < 0 or size < best[1]:
            best = (b, size)
    return best


def _complement(positions: np.ndarray, universe: int) -> np.ndarray:
    keep = np.ones(universe, dtype=bool)
    keep[positions] = False
    return np.flatnonzero(keep)


def _sides(positions: np.ndarray, universe: int) -> tuple[bool, np.ndarray]:
    """Which side to code (True: the complement) and its positions: the smaller side."""
    pos = np.asarray(positions, dtype=np.int64)
    if 2 * pos.size > universe:
        return True, _complement(pos, universe)
    return False, pos


def rice_nbytes(positions: np.ndarray, universe: int) -> int:
    """Bytes :func:`rice_encode` will take for these sorted flat positions among ``universe``."""
    return (_best_param(_gaps(_sides(positions, universe)[1]))[1]
            + varint_nbytes(np.asarray(positions).size))


def rice_expected_bytes(n: int, k: int) -> float:
    """Expected Rice segment bytes for ``k`` positions drawn uniformly among ``n`` (geometric
    gaps with p = k / n; E[floor(G / m)] = (1-p)^m / (1 - (1-p)^m)), best parameter. Used to plan
    payloads (TSFA's eq. (6) bits) before anything is encoded; a smooth function of ``k`` (no
    byte rounding), so a 1-D search over rho sees no spurious steps."""
    head = varint_nbytes(k)
    k = min(k, n - k)  # the coded side
    if k <= 0:
        return 1.0 + head
    p = min(k / n, 1.0)
    best = None
    for b in range(MAX_RICE_PARAM + 1):
        m = 1 << b
        stay = (1.0 - p) ** m
        quot = stay / (1.0 - stay) if stay < 1.0 else float("inf")
        size = 2.0 + (k * b + k * (1 + quot)) / 8  # + 1 byte of padding on average
        if best is None or size < best:
            best = size
        if m > n:
            break
    return float(best) + head


def _pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits.astype(np.uint8))


def rice_encode(positions: np.ndarray, universe: int) -> np.ndarray:
    """One Rice segment (uint8) for strictly increasing flat positions in ``[0, universe)``
    (see the module docstring)."""
    pos = np.asarray(positions, dtype=np.int64)
    if pos.size and (np.diff(pos).min(initial=1) <= 0 or pos[0] < 0 or pos[-1] >= universe):
        raise ValueError(f"positions must be strictly increasing and in [0, {universe})")
    flip, side = _sides(pos, universe)
    gaps = _gaps(side)
    b, _ = _best_param(gaps)
    n = gaps.size
    if b:
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        low = ((gaps[:, None] >> shifts) & 1).reshape(-1)
    else:
        low = np.zeros(0, dtype=np.int64)
    quot = gaps >> b
    unary = np.zeros(n + int(quot.sum()), dtype=np.uint8)
    ends = np.cumsum(quot + 1) - 1  # the terminating zero of each code
    starts = ends - quot
    ones = np.repeat(starts, quot) + (np.arange(int(quot.sum())) - np.repeat(
        np.cumsum(quot) - quot, quot))
    unary[ones] = 1
    head = np.array([b | (0x80 if flip else 0)], np.uint8)
    return np.concatenate([head, _varint(pos.size), _pack(low), _pack(unary)])


class RiceReader:
    """Decodes consecutive Rice segments of one uint8 array, validating each one."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.bits = np.unpackbits(data)
        self.zeros = np.flatnonzero(self.bits == 0)
        self.offset = 0  # bytes

    def read(self, universe: int, field: str) -> np.ndarray:
        """The next segment's flat positions (its own count), each in ``[0, universe)``."""
        if self.offset >= self.data.size:
            raise PositionError(f"{field}: segment starts at byte {self.offset}, past the end "
                                f"({self.data.size} bytes)")
        flip = bool(self.data[self.offset] & 0x80)
        param_at = self.offset
        count, self.offset = self._read_varint(self.offset + 1, field)
        if not 0 <= count <= universe:
            raise PositionError(f"{field}: count {count} not in [0, {universe}]")
        if flip:  # the segment codes the dropped positions
            count = universe - count
        b = int(self.data[param_at] & 0x7F)
        if b > MAX_RICE_PARAM:
            raise PositionError(f"{field}: Rice parameter {b} at byte {param_at} > "
                                f"{MAX_RICE_PARAM}")
        low_start = self.offset * 8
        low_bytes = -(-count * b // 8)
        low_end = low_start + count * b
        if (self.offset + low_bytes) > self.data.size:
            raise PositionError(f"{field}: {count} x {b} low bits run past the end of the array")
        self._check_padding(low_end, (self.offset + low_bytes) * 8, field, "low bits")
        un_start = (self.offset + low_bytes) * 8
        if count == 0:
            self.offset += low_bytes
            side = np.zeros(0, dtype=np.int64)
            return _complement(side, universe) if flip else side
        first = int(np.searchsorted(self.zeros, un_start))
        if first + count > self.zeros.size:
            raise PositionError(f"{field}: unary stream ends before {count} codes")
        term = self.zeros[first:first + count]
        un_end = int(term[-1]) + 1
        un_bytes = -(-(un_end - un_start) // 8)
        self._check_padding(un_end, un_start + 8 * un_bytes, field, "unary code")
        quot = np.diff(term, prepend=un_start - 1) - 1
        if b:
            shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
            low_bits = self.bits[low_start:low_end].astype(np.int64).reshape(count, b)
            low = (low_bits << shifts).sum(axis=1)
        else:
            low = np.zeros(count, dtype=np.int64)
        if quot.max() >= universe:  # keeps the shift below from overflowing int64
            raise PositionError(f"{field}: gap quotient {int(quot.max())} >= {universe}")
        gaps = (quot << b) | low
        if gaps.max() >= universe:
            raise PositionError(f"{field}: gap {int(gaps.max())} >= universe {universe}")
        pos = np.cumsum(gaps + 1) - 1
        if pos[-1] >= universe:
            raise PositionError(f"{field}: position {int(pos[-1])} out of range [0, {universe})")
        self.offset = un_start // 8 + un_bytes
        return _complement(pos, universe) if flip else pos

    def _read_varint(self, at: int, field: str) -> tuple[int, int]:
        value, shift = 0, 0
        for i in range(at, min(at + 5, self.data.size)):
            byte = int(self.data[i])
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if i > at and byte == 0:
                    raise PositionError(f"{field}: non-canonical count varint at byte {at}")
                return value, i + 1
        raise PositionError(f"{field}: count varint at byte {at} is truncated or longer than "
                            "5 bytes")

    def _check_padding(self, lo: int, hi: int, field: str, what: str) -> None:
        if self.bits[lo:hi].any():
            raise PositionError(f"{field}: non-zero padding bits after the {what} "
                                f"(bits {lo}..{hi - 1})")

    def finish(self, field: str) -> None:
        """Every byte must belong to a segment."""
        if self.offset != self.data.size:
            raise PositionError(f"{field}: {self.data.size - self.offset} trailing bytes after "
                                f"the last segment")


def rice_decode(data: np.ndarray, universe: int) -> np.ndarray:
    """Positions of a single segment (the inverse of :func:`rice_encode`)."""
    reader = RiceReader(np.asarray(data, dtype=np.uint8))
    out = reader.read(universe, "rice")
    reader.finish("rice")
    return out
