"""Tests for the wire format of version 2: Rice-coded positions (fedsoft.compression.positions),
int8 / int4 / float16 value quantisation (fedsoft.compression.quantize) and the codec's Rice
mode, per-row scales and RowsSpec blocks (fedsoft.compression.codec)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedsoft.compression import quantize
from fedsoft.compression.codec import (
    BMP,
    CNT,
    IDX,
    MODE_BITMAP,
    MODE_FULL,
    MODE_IMPLICIT,
    MODE_INDEX,
    MODE_RICE,
    POS_MODE,
    RICE,
    SCALE,
    VALS,
    CodecError,
    decode,
    encode,
    payload_nbytes,
)
from fedsoft.compression.positions import (
    MAX_RICE_PARAM,
    PositionError,
    RiceReader,
    floor_bits,
    rice_decode,
    rice_encode,
    rice_expected_bytes,
    rice_nbytes,
    varint_nbytes,
)
from fedsoft.compression.quantize import (
    QuantError,
    dequantize,
    roundtrip,
    value_bits,
    values_nbytes,
    wire_array_dtype,
)
from fedsoft.layout import LayerSpec, RowsSpec
from tests.test_codec import apply_mutation as codec_mutation

WIRE_DTYPES = quantize.WIRE_DTYPES
INT_DTYPES = quantize.QUANT_DTYPES
FLOAT_DTYPES = tuple(d for d in WIRE_DTYPES if d not in INT_DTYPES)
LEVELS = {"int8": 127, "int4": 7}  # the documented symmetric code range -L..L
POSITION_KEYS = (CNT, IDX, BMP, RICE)
FLIP = 0x80  # high bit of a segment's first byte: the segment codes the dropped positions


def leb128(value: int) -> list[int]:
    """``value`` as an unsigned LEB128 varint (7 bits a byte, low first, high bit = more)."""
    out = []
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return out


def read_leb128(data: np.ndarray, at: int) -> tuple[int, int]:
    """(value, bytes) of the unsigned LEB128 varint at byte ``at``."""
    value = 0
    for i in range(at, data.size):
        value |= (int(data[i]) & 0x7F) << (7 * (i - at))
        if not data[i] & 0x80:
            return value, i + 1 - at
    raise AssertionError("unterminated varint")


def with_count(seg: np.ndarray, count: int, at: int = 0) -> np.ndarray:
    """The segment starting at byte ``at`` with its count varint replaced by ``count``."""
    _, width = read_leb128(seg, at + 1)
    return np.concatenate([seg[:at + 1], np.array(leb128(count), np.uint8),
                           seg[at + 1 + width:]]).astype(np.uint8)


def random_positions(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` sorted flat positions drawn uniformly without replacement among ``n``."""
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


# ================================================================================ positions


@st.composite
def position_sets(draw, max_n: int = 3000, edges: bool = True):
    """(n, sorted positions); without ``edges`` neither empty nor full (0 < k < n)."""
    if not edges:
        n = draw(st.integers(2, max_n))
        k = draw(st.integers(1, n - 1))
    else:
        n = draw(st.integers(1, max_n))
        k = draw(st.one_of(st.integers(0, n),
                           st.sampled_from([0, 1, n - 1, n, n // 2, n // 2 + 1])))
        k = min(max(k, 0), n)
    seed = draw(st.integers(0, 2**32 - 1))
    return n, random_positions(np.random.default_rng(seed), n, k)


def check_round_trip(pos: np.ndarray, n: int) -> np.ndarray:
    enc = rice_encode(pos, n)
    assert enc.dtype == np.uint8 and enc.ndim == 1
    assert enc.size == rice_nbytes(pos, n)
    assert bool(enc[0] & FLIP) == (2 * pos.size > n)  # the complement side above half density
    assert int(enc[0] & 0x7F) <= MAX_RICE_PARAM
    assert read_leb128(enc, 1) == (pos.size, varint_nbytes(pos.size))  # the kept count, always
    out = rice_decode(enc, n)
    assert out.dtype.kind in "iu"
    np.testing.assert_array_equal(out, pos)
    return enc


@settings(max_examples=100, deadline=None)
@given(position_sets())
def test_rice_round_trip_random_sets(case) -> None:
    n, pos = case
    enc = check_round_trip(pos, n)
    event("complement side" if enc[0] & FLIP else "kept side")


def _edge_counts(n: int) -> list[int]:
    return sorted({k for k in (0, 1, n - 1, n, n // 2, (n + 1) // 2, n // 2 + 1) if 0 <= k <= n})


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 64, 1000, 4097])
def test_rice_round_trip_edge_densities(n: int) -> None:
    rng = np.random.default_rng(n)
    for k in _edge_counts(n):
        check_round_trip(random_positions(rng, n, k), n)
        check_round_trip(np.arange(k, dtype=np.int64), n)  # a prefix: all gaps 0
        check_round_trip(np.arange(n - k, n, dtype=np.int64), n)  # a suffix: one long gap
    check_round_trip(np.arange(0, n, 2, dtype=np.int64), n)  # every other entry


def test_rice_empty_and_full_segments_are_header_and_count() -> None:
    for n in (1, 5, 127, 128, 4096, 16383, 16384):
        empty = rice_encode(np.zeros(0, np.int64), n)
        full = rice_encode(np.arange(n), n)
        assert empty.tolist() == [empty[0], 0] and empty.size == rice_nbytes(np.zeros(0), n)
        assert full.size == 1 + varint_nbytes(n) == rice_nbytes(np.arange(n), n)
        assert full[1:].tolist() == leb128(n)
        assert not empty[0] & FLIP and full[0] & FLIP
        assert rice_decode(empty, n).size == 0
        np.testing.assert_array_equal(rice_decode(full, n), np.arange(n))
        assert rice_expected_bytes(n, 0) == empty.size
        assert rice_expected_bytes(n, n) == full.size
    zero = rice_encode(np.zeros(0, np.int64), 0)  # empty universe
    assert zero.size == 2 and rice_decode(zero, 0).size == 0


def test_varint_nbytes_matches_the_encoded_count() -> None:
    for value in (0, 1, 127, 128, 300, 16383, 16384, 2**21 - 1, 2**21, 2**28 - 1, 2**28,
                  2**35 - 1):
        assert varint_nbytes(value) == len(leb128(value)), value
    assert [varint_nbytes(2**(7 * j)) for j in range(5)] == [1, 2, 3, 4, 5]
    rng = np.random.default_rng(0)
    for n, k in ((300, 200), (20000, 130), (20000, 17000), (70000, 16384)):
        pos = random_positions(rng, n, k)
        enc = rice_encode(pos, n)
        assert read_leb128(enc, 1) == (k, varint_nbytes(k))
        np.testing.assert_array_equal(rice_decode(enc, n), pos)


def test_rice_reader_reads_concatenated_segments() -> None:
    rng = np.random.default_rng(1)
    cases = [(n, random_positions(rng, n, k)) for n, k in
             [(100, 3), (64, 64), (1, 0), (5000, 4000), (33, 0), (777, 388), (2, 1)]]
    segments = [rice_encode(p, n) for n, p in cases]
    reader = RiceReader(np.concatenate(segments))
    ends = np.cumsum([s.size for s in segments])
    for (n, p), end in zip(cases, ends, strict=True):
        np.testing.assert_array_equal(reader.read(n, "f"), p)
        assert reader.offset == end
    reader.finish("f")
    with pytest.raises(PositionError, match="f: segment starts at byte .* past the end"):
        reader.read(10, "f")


def test_rice_encode_rejects_bad_positions() -> None:
    for bad, n in (([3, 2], 5), ([1, 1], 5), ([-1, 2], 5), ([0, 5], 5), ([0], 0)):
        with pytest.raises(ValueError, match="strictly increasing"):
            rice_encode(np.array(bad), n)


GRID_N = (4096, 10007, 65536)
GRID_RHO = (0.01, 0.03, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.97, 0.99)


def test_rice_size_near_information_floor_and_expected_bytes() -> None:
    rng = np.random.default_rng(2)
    for n in GRID_N:
        for rho in GRID_RHO:
            k = round(rho * n)
            pos = random_positions(rng, n, k)
            size = rice_encode(pos, n).size
            floor = floor_bits(n, k) / 8 + 2 + varint_nbytes(k)  # + the count itself
            assert size <= 1.05 * floor, (n, k, size, floor)
            expected = rice_expected_bytes(n, k)
            assert abs(expected - size) <= 0.03 * size, (n, k, size, expected)


def test_rice_expected_bytes_is_symmetric_and_non_decreasing_below_half() -> None:
    """Symmetric in k <-> n - k up to the count varint (the kept count is sent either way)."""
    n = 8192
    ks = np.arange(1, n // 2, 97)
    sizes = [rice_expected_bytes(n, int(k)) for k in ks]
    assert all(b >= a for a, b in zip(sizes, sizes[1:], strict=False))
    assert sizes[0] < sizes[-1]
    for k in map(int, ks):
        assert (rice_expected_bytes(n, k) - varint_nbytes(k)
                == rice_expected_bytes(n, n - k) - varint_nbytes(n - k))
    assert rice_expected_bytes(n, 1) + 1 == rice_expected_bytes(n, n - 1)  # 1 vs 2 count bytes


def test_floor_bits_matches_log2_binomial() -> None:
    for n, k in ((1, 0), (1, 1), (10, 3), (100, 50), (4096, 41), (1000, 999)):
        assert floor_bits(n, k) == pytest.approx(math.log2(math.comb(n, k)), abs=1e-6)
        assert floor_bits(n, k) == pytest.approx(floor_bits(n, n - k), abs=1e-9)
    for n, k in ((3, 4), (3, -1)):
        with pytest.raises(ValueError, match="0 <= k <= n"):
            floor_bits(n, k)


def segment_layout(pos: np.ndarray, n: int, enc: np.ndarray) -> tuple[int, int, int]:
    """(low-bit count, unary bit count, coded entries) of a segment, from the documented layout."""
    side = np.setdiff1d(np.arange(n), pos) if enc[0] & FLIP else pos
    gaps = np.diff(side, prepend=-1) - 1
    b = int(enc[0] & 0x7F)
    return side.size * b, side.size + int((gaps >> b).sum()), side.size


@settings(max_examples=60, deadline=None)
@given(position_sets(max_n=600, edges=False), st.integers(0, 2**16))
def test_rice_non_zero_padding_bits_rejected(case, pick) -> None:
    n, pos = case
    enc = rice_encode(pos, n)
    low_bits, unary_bits, _ = segment_layout(pos, n, enc)
    low_bytes = -(-low_bits // 8)
    head = 1 + varint_nbytes(pos.size)  # the parameter byte and the count varint
    assert enc.size == head + low_bytes + -(-unary_bits // 8)  # the layout of the docstring
    pads = [8 * head + low_bits + j for j in range(8 * low_bytes - low_bits)]
    pads += [8 * (head + low_bytes) + unary_bits + j for j in range(-unary_bits % 8)]
    if not pads:
        event("no padding")
        return
    bit = pads[pick % len(pads)]
    bad = enc.copy()
    bad[bit // 8] |= np.uint8(0x80 >> (bit % 8))
    with pytest.raises(PositionError, match=r"rice: non-zero padding bits after the "
                                            r"(low bits|unary code)"):
        rice_decode(bad, n)


@settings(max_examples=40, deadline=None)
@given(position_sets(max_n=400))
def test_rice_truncated_segment_rejected(case) -> None:
    n, pos = case
    enc = rice_encode(pos, n)
    for cut in range(enc.size):
        with pytest.raises(PositionError,
                           match=r"^rice: .*(past the end|ends before|varint .* truncated)"):
            rice_decode(enc[:cut], n)


@settings(max_examples=40, deadline=None)
@given(position_sets(max_n=400), st.integers(1, 3), st.integers(0, 255))
def test_rice_trailing_bytes_rejected(case, extra, byte) -> None:
    n, pos = case
    data = np.concatenate([rice_encode(pos, n), np.full(extra, byte, np.uint8)])
    reader = RiceReader(data)
    np.testing.assert_array_equal(reader.read(n, "seg"), pos)
    with pytest.raises(PositionError, match=f"seg: {extra} trailing bytes after the last segment"):
        reader.finish("seg")
    with pytest.raises(PositionError, match="rice: .*trailing bytes"):
        rice_decode(data, n)


def test_rice_hostile_segments_rejected() -> None:
    for head in (MAX_RICE_PARAM + 1, 0x7F, FLIP | (MAX_RICE_PARAM + 1)):
        data = np.array([head, 1, 0, 0, 0, 0, 0], np.uint8)
        with pytest.raises(PositionError,
                           match=rf"rice: Rice parameter {head & 0x7F} at byte 0 > "
                                 rf"{MAX_RICE_PARAM}"):
            rice_decode(data, 100)
    # a single gap of 999 decoded among 500: the gap runs past the universe
    one = rice_encode(np.array([999]), 1000)
    with pytest.raises(PositionError, match="rice: gap 999 >= universe 500"):
        rice_decode(one, 500)
    # gaps each inside the universe whose sum is not
    two = rice_encode(np.array([300, 700]), 1000)
    with pytest.raises(PositionError, match=r"rice: position 700 out of range \[0, 600\)"):
        rice_decode(two, 600)
    # b = 0, count 1 and the unary code 1110: quotient 3 in a universe of 3
    with pytest.raises(PositionError, match="rice: gap quotient 3 >= 3"):
        rice_decode(np.array([0, 1, 0b11100000], np.uint8), 3)
    # far more codes than the unary stream holds
    seg = rice_encode(np.array([5, 9, 40]), 1000)
    with pytest.raises(PositionError, match="rice: .*(past the end|ends before)"):
        rice_decode(with_count(seg, 400), 1000)
    with pytest.raises(PositionError, match="past the end"):
        rice_decode(np.zeros(0, np.uint8), 4)


def test_rice_count_varint_outside_the_universe_rejected() -> None:
    seg = rice_encode(np.array([1, 4]), 8)
    full = rice_encode(np.arange(6), 8)  # the complement side: the count is still the kept one
    assert full[0] & FLIP and read_leb128(full, 1) == (6, 1)
    for base in (seg, full):
        np.testing.assert_array_equal(rice_decode(with_count(base, read_leb128(base, 1)[0]), 8),
                                      rice_decode(base, 8))
        for count in (9, 100, 128, 300, 2**21, 2**35 - 1):
            bad = with_count(base, count)
            assert bad.size == base.size - 1 + varint_nbytes(count)
            with pytest.raises(PositionError, match=rf"^rice: count {count} not in \[0, 8\]$"):
                rice_decode(bad, 8)


@pytest.mark.parametrize("varint", [
    [],  # the segment ends after its parameter byte
    [0x85],  # a continuation bit and nothing after it
    [0x80, 0x80],
    [0xFF, 0xFF, 0xFF, 0xFF],
])
def test_rice_truncated_count_varint_rejected(varint) -> None:
    data = np.array([0, *varint], np.uint8)
    with pytest.raises(PositionError,
                       match=r"^rice: count varint at byte 1 is truncated or longer than 5 bytes$"):
        rice_decode(data, 100)


@pytest.mark.parametrize("varint", [
    [0x80, 0x80, 0x80, 0x80, 0x80, 0x00],  # six bytes (a canonical one has at most five)
    [0x81, 0x80, 0x80, 0x80, 0x80, 0x01],
    [0xFF] * 7,
])
def test_rice_over_long_count_varint_rejected(varint) -> None:
    data = np.array([0, *varint, 0, 0, 0], np.uint8)  # enough bytes after it
    with pytest.raises(PositionError,
                       match=r"^rice: count varint at byte 1 is truncated or longer than 5 bytes$"):
        rice_decode(data, 100)


@pytest.mark.parametrize("varint", [
    [0x85, 0x00],  # 5 with a trailing zero continuation byte
    [0x80, 0x00],  # 0 in two bytes
    [0x82, 0x80, 0x00],  # 2 in three bytes
    [0x80, 0x80, 0x80, 0x80, 0x00],  # 0 in five bytes
])
def test_rice_non_canonical_count_varint_rejected(varint) -> None:
    value, width = read_leb128(np.array(varint, np.uint8), 0)
    assert width == len(varint) > varint_nbytes(value)  # a valid LEB128 reading, just too long
    canonical = rice_encode(np.arange(value), 100)
    np.testing.assert_array_equal(rice_decode(canonical, 100), np.arange(value))
    # the same segment with the count spelt out in more bytes
    data = np.concatenate([canonical[:1], np.array(varint, np.uint8),
                           canonical[1 + varint_nbytes(value):]]).astype(np.uint8)
    with pytest.raises(PositionError, match=r"^rice: non-canonical count varint at byte 1$"):
        rice_decode(data, 100)


def test_rice_reader_names_the_varint_byte_of_a_later_segment() -> None:
    first = rice_encode(np.array([3, 17, 40]), 64)
    bad = np.concatenate([first, np.array([0, 0x83, 0x00], np.uint8)])
    reader = RiceReader(bad)
    np.testing.assert_array_equal(reader.read(64, "f"), [3, 17, 40])
    with pytest.raises(PositionError, match=rf"^g: non-canonical count varint at byte "
                                            rf"{first.size + 1}$"):
        reader.read(64, "g")


# ================================================================================ quantize


@st.composite
def value_rows(draw, max_rows: int = 8, max_count: int = 20):
    counts = np.array(draw(st.lists(st.integers(0, max_count), min_size=0, max_size=max_rows)),
                      dtype=np.int64)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mags = 10.0 ** rng.uniform(-4, 4, counts.size)
    zero_rows = rng.random(counts.size) < 0.2
    mags[zero_rows] = 0.0
    values = (rng.standard_normal(int(counts.sum())) * np.repeat(mags, counts)).astype(np.float32)
    return values, counts


def row_peaks(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    rows = np.repeat(np.arange(counts.size), counts)
    peak = np.zeros(counts.size, np.float32)
    np.maximum.at(peak, rows, np.abs(values))
    return peak


@settings(max_examples=100, deadline=None)
@given(value_rows(), st.sampled_from(INT_DTYPES))
def test_integer_round_trip_error_at_most_half_a_step(case, dtype) -> None:
    values, counts = case
    codes, scales = quantize.quantize(values, counts, dtype)
    assert codes.dtype == wire_array_dtype(dtype)
    assert codes.nbytes == values_nbytes(values.size, dtype)
    assert scales.dtype == np.float32 and scales.shape == counts.shape
    levels = LEVELS[dtype]
    peak = row_peaks(values, counts)
    np.testing.assert_allclose(scales, peak / np.float32(levels), rtol=1e-6, atol=0)
    out = dequantize(codes, scales, counts, dtype)
    assert out.dtype == np.float32 and out.shape == values.shape
    np.testing.assert_array_equal(out, roundtrip(values, counts, dtype))
    step = np.repeat(scales, counts).astype(np.float64)
    err = np.abs(out.astype(np.float64) - values)
    tol = step / 2 + 4 * np.finfo(np.float32).eps * np.abs(values)
    assert (err <= tol).all(), float((err - tol).max())
    zero_rows = np.repeat(peak == 0, counts)
    assert (scales[peak == 0] == 0).all() and (out[zero_rows] == 0).all()
    # codes lie in -L..L and each non-zero row reaches L at its peak
    live = step > 0
    c = np.zeros(values.size)
    c[live] = np.rint(out[live] / step[live])
    assert (np.abs(c) <= levels).all()
    top = np.zeros(counts.size)
    np.maximum.at(top, np.repeat(np.arange(counts.size), counts), np.abs(c))
    assert (top[peak > 0] == levels).all()


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_zero_and_empty_rows_get_scale_zero(dtype: str) -> None:
    counts = np.array([2, 0, 3, 1], np.int64)
    values = np.array([0.0, -0.0, 0.5, -2.0, 1.0, 0.0], np.float32)
    codes, scales = quantize.quantize(values, counts, dtype)
    assert scales[0] == scales[1] == scales[3] == 0 and scales[2] > 0
    out = dequantize(codes, scales, counts, dtype)
    np.testing.assert_array_equal(out[[0, 1, 5]], np.zeros(3, np.float32))
    assert out[3] == pytest.approx(values[3], rel=1e-6)  # the row's peak: L * (peak / L)


@settings(max_examples=60, deadline=None)
@given(value_rows(), st.sampled_from(WIRE_DTYPES))
def test_quantising_a_round_trip_again_is_idempotent(case, dtype) -> None:
    values, counts = case
    once = roundtrip(values, counts, dtype)
    twice = roundtrip(once, counts, dtype)
    if dtype in INT_DTYPES:
        _, scales = quantize.quantize(values, counts, dtype)
        tol = np.repeat(scales, counts) * 1e-5
        assert (np.abs(twice - once) <= tol).all()
    else:
        np.testing.assert_array_equal(twice, once)
        np.testing.assert_array_equal(once, values.astype(dtype).astype(np.float32))


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_value_sizes(dtype: str) -> None:
    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 3, 10, 11):
        counts = np.array([n], np.int64)
        codes, scales = quantize.quantize(rng.standard_normal(n).astype(np.float32), counts, dtype)
        assert codes.dtype == wire_array_dtype(dtype)
        assert codes.nbytes == values_nbytes(n, dtype) == -(-n * value_bits(dtype) // 8)
        assert (scales is not None) == (dtype in INT_DTYPES) == quantize.scaled(dtype)
    if dtype == "int4":  # two codes per byte
        assert all(values_nbytes(n, dtype) == -(-n // 2) for n in range(20))
        assert 2 * value_bits("int4") == 8 * wire_array_dtype("int4").itemsize
    else:
        assert value_bits(dtype) == 8 * wire_array_dtype(dtype).itemsize
    with pytest.raises(ValueError, match="wire-dtype"):
        value_bits("bfloat16")


def _int_payload(dtype: str, counts=(3, 0, 2)):
    counts = np.array(counts, np.int64)
    values = np.linspace(-1.5, 2.0, int(counts.sum())).astype(np.float32)
    codes, scales = quantize.quantize(values, counts, dtype)
    dequantize(codes, scales, counts, dtype)  # valid as is
    return codes, scales, counts


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_dequantize_rejects_bad_scales(dtype: str) -> None:
    codes, scales, counts = _int_payload(dtype)
    for bad in (np.nan, -0.5, np.inf, -np.inf):
        s = scales.copy()
        s[2] = bad
        with pytest.raises(QuantError, match="field 'scale': value .* at row 2 is not a finite"):
            dequantize(codes, s, counts, dtype)
    for s in (scales[:-1], np.append(scales, np.float32(1)), scales[None, :], None):
        with pytest.raises(QuantError, match="field 'scale': shape .* one per row"):
            dequantize(codes, s, counts, dtype)


def test_dequantize_rejects_bad_int8_codes() -> None:
    codes, scales, counts = _int_payload("int8")
    bad = codes.copy()
    bad[1] = -128
    with pytest.raises(QuantError, match="field 'vals': int8 code -128 at position 1"):
        dequantize(bad, scales, counts, "int8")
    with pytest.raises(QuantError, match="field 'v8': length"):
        dequantize(codes[:-1], scales, counts, "int8", field="v8")


def test_dequantize_rejects_bad_int4_codes() -> None:
    codes, scales, counts = _int_payload("int4", (3, 0, 2))  # 5 codes: odd, one pad nibble
    assert codes.size == values_nbytes(5, "int4")
    bad = codes.copy()
    bad[0] &= 0x0F  # high nibble 0 = code -8
    with pytest.raises(QuantError, match="field 'vals': int4 nibble 0 .* at position 0"):
        dequantize(bad, scales, counts, "int4")
    bad = codes.copy()
    bad[-1] |= 0x03  # the pad nibble after the 5th code
    with pytest.raises(QuantError, match="field 'vals': non-zero pad nibble 3"):
        dequantize(bad, scales, counts, "int4")
    for packed in (codes[:-1], np.append(codes, np.uint8(0x88))):
        with pytest.raises(QuantError, match="field 'vals': .* bytes for 5 int4 codes"):
            dequantize(packed, scales, counts, "int4")


def test_dequantize_rejects_overflow_after_scaling() -> None:
    codes, scales, counts = _int_payload("int8")
    huge = np.full_like(scales, np.finfo(np.float32).max)
    with np.errstate(over="ignore"), pytest.raises(QuantError, match="not finite after scaling"):
        dequantize(codes, huge, counts, "int8")


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_quantize_rejects_non_finite_values(dtype: str) -> None:
    counts = np.array([3], np.int64)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="non-finite"):
            quantize.quantize(np.array([1.0, bad, 2.0], np.float32), counts, dtype)


def test_quantize_float16_overflow_raises() -> None:
    big = float(np.finfo(np.float16).max) * 2
    with pytest.raises(ValueError, match="overflows wire dtype float16"):
        quantize.quantize(np.array([0.5, big], np.float32), np.array([2]), "float16")
    # int8 / int4 scale large values instead of overflowing
    for dtype in INT_DTYPES:
        out = roundtrip(np.array([0.5, big], np.float32), np.array([2]), dtype)
        assert np.isfinite(out).all() and out[1] == pytest.approx(big, rel=1e-6)


# ================================================================================ codec

PATTERNS = ("empty", "full", "sparse", "very_sparse", "half", "dense", "mixed_rows")


def make_mask(rng: np.random.Generator, r: int, n: int, pattern: str) -> np.ndarray:
    if pattern == "empty":
        return np.zeros((r, n), dtype=bool)
    if pattern == "full":
        return np.ones((r, n), dtype=bool)
    if pattern == "mixed_rows":
        rows = [make_mask(rng, 1, n, str(rng.choice(["empty", "full", "sparse", "half"])))[0]
                for _ in range(r)]
        return np.stack(rows)
    p = {"very_sparse": 0.01, "sparse": 0.05, "half": 0.5, "dense": 0.9}[pattern]
    return rng.random((r, n)) < p


def make_layer(rng: np.random.Generator, spec, pattern: str):
    mask = make_mask(rng, spec.r, spec.row_len, pattern)
    mags = 10.0 ** rng.uniform(-3, 2, (spec.r, 1))
    values = (rng.standard_normal(mask.shape) * mags).astype(np.float32) * mask
    return spec, values, mask


@st.composite
def spec_strategy(draw, index: int, max_r: int = 8, max_len: int = 80):
    r = draw(st.integers(1, max_r))
    if draw(st.booleans()):
        return RowsSpec(f"rows{index}", r, draw(st.integers(1, max_len)))
    return LayerSpec(f"layer{index}", r, draw(st.integers(1, max_len // 2)),
                     draw(st.integers(1, max_len // 2)))


@st.composite
def codec_cases(draw, min_layers: int = 0, max_layers: int = 4):
    n = draw(st.integers(min_layers, max_layers))
    specs = [draw(spec_strategy(i)) for i in range(n)]
    patterns = [draw(st.sampled_from(PATTERNS)) for _ in range(n)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    layers = [make_layer(rng, s, p) for s, p in zip(specs, patterns, strict=True)]
    return layers, draw(st.sampled_from(WIRE_DTYPES))


def expected_layers(layers, dtype: str) -> list[np.ndarray]:
    """What decode must return per layer: kept values through the wire dtype, zero elsewhere."""
    kept = np.concatenate([v[m] for _, v, m in layers]) if layers else np.zeros(0, np.float32)
    counts = np.concatenate([m.sum(axis=1) for _, _, m in layers]) if layers else np.zeros(0, int)
    if dtype in INT_DTYPES:
        flat = roundtrip(kept, counts, dtype)
    else:
        flat = kept.astype(dtype).astype(np.float32)
    out, off = [], 0
    for _, _, m in layers:
        v = np.zeros(m.shape, np.float32)
        v[m] = flat[off:off + int(m.sum())]
        off += int(m.sum())
        out.append(v)
    return out


def position_bytes(payload) -> int:
    return sum(payload[k].nbytes for k in POSITION_KEYS if k in payload)


def check_decodes(layers, payload, dtype: str, masks=None) -> None:
    specs = [s for s, _, _ in layers]
    out, dense = decode(payload, specs, dtype=dtype, masks=masks)
    assert dense == {} and len(out) == len(layers)
    for (spec, _, mask), (v, m), want in zip(layers, out, expected_layers(layers, dtype),
                                              strict=True):
        assert v.dtype == np.float32 and m.dtype == np.bool_
        assert v.shape == m.shape == (spec.r, spec.row_len)
        np.testing.assert_array_equal(m, mask)
        np.testing.assert_array_equal(v, want)


def check_wire_layout(layers, payload, dtype: str) -> None:
    modes = payload[POS_MODE].tolist()
    want_cnt = []
    for (_, _, m), mode in zip(layers, modes, strict=True):
        if mode != MODE_RICE:  # a Rice segment carries its own count
            want_cnt.extend(m.sum(axis=1).tolist())
    assert payload[CNT].tolist() == want_cnt  # one count per row of the non-Rice layers
    wide = any(s.row_len > 65535 for (s, _, _), mode in zip(layers, modes, strict=True)
               if mode != MODE_RICE)
    assert payload[CNT].dtype == (np.uint32 if wide else np.uint16)
    assert payload[VALS].dtype == wire_array_dtype(dtype)
    kept = sum(int(m.sum()) for _, _, m in layers)
    assert payload[VALS].nbytes == values_nbytes(kept, dtype)
    rows = sum(s.r for s, _, _ in layers)
    if dtype in INT_DTYPES:
        assert payload[SCALE].dtype == np.float32 and payload[SCALE].shape == (rows,)
    else:
        assert SCALE not in payload
    if MODE_RICE in modes:
        segs = [rice_nbytes(np.flatnonzero(m), s.size)
                for (s, _, m), mode in zip(layers, modes, strict=True) if mode == MODE_RICE]
        assert payload[RICE].dtype == np.uint8 and payload[RICE].size == sum(segs)
    else:
        assert RICE not in payload


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec_cases())
def test_round_trip_with_rice_every_dtype(case) -> None:
    layers, dtype = case
    payload = encode(layers, dtype=dtype)
    for mode in payload[POS_MODE]:
        event(f"pos_mode {int(mode)}")
    check_wire_layout(layers, payload, dtype)
    check_decodes(layers, payload, dtype)
    # each layer's mode is the one it gets alone (all counts fit uint16 here)
    for (spec, values, mask), mode in zip(layers, payload[POS_MODE], strict=True):
        alone = encode([(spec, values, mask)], dtype=dtype)
        assert alone[POS_MODE].tolist() == [mode]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec_cases(), st.data())
def test_round_trip_per_layer_implicit_positions(case, data) -> None:
    layers, dtype = case
    flags = data.draw(st.lists(st.booleans(), min_size=len(layers), max_size=len(layers)))
    payload = encode(layers, dtype=dtype, implicit_positions=flags)
    modes = payload[POS_MODE].tolist()
    assert [m == MODE_IMPLICIT for m in modes] == flags
    masks = [m for _, _, m in layers]
    check_decodes(layers, payload, dtype, masks=masks)
    if any(flags):
        with pytest.raises(CodecError, match="'masks'"):
            decode(payload, [s for s, _, _ in layers], dtype=dtype)


@settings(max_examples=100, deadline=None)
@given(codec_cases(min_layers=1, max_layers=1))
def test_position_mode_is_the_cheapest(case) -> None:
    layers, dtype = case
    (spec, _, mask), = layers
    with_rice = encode(layers, dtype=dtype)
    without = encode(layers, dtype=dtype, rice=False)
    mode = int(with_rice[POS_MODE][0])
    assert MODE_RICE not in without[POS_MODE]  # rice=False is the version-1 format
    kept = int(mask.sum())
    count_bytes = without[CNT].itemsize
    if kept == spec.size:
        assert mode == int(without[POS_MODE][0]) == MODE_FULL
        assert position_bytes(with_rice) == position_bytes(without) == spec.r * count_bytes
        return
    # without Rice: the smaller of bitmap and uint16 indices, plus one count per row
    bitmap = -(-spec.size // 8)
    index = 2 * kept if spec.row_len <= 1 << 16 else math.inf
    assert position_bytes(without) == min(bitmap, index) + spec.r * count_bytes
    # with Rice: its segment alone (it carries the count), taken only when strictly cheaper
    rice_cost = rice_nbytes(np.flatnonzero(mask), spec.size)
    assert position_bytes(with_rice) == min(position_bytes(without), rice_cost)
    if mode == MODE_RICE:
        assert with_rice[CNT].size == 0 and with_rice[CNT].dtype == np.uint16
    assert (mode == MODE_RICE) == (rice_cost < position_bytes(without))
    assert payload_nbytes(with_rice) <= payload_nbytes(without)
    event(f"mode {mode}")
    if mode != MODE_RICE:
        assert with_rice.keys() == without.keys()
        for key in with_rice:
            np.testing.assert_array_equal(with_rice[key], without[key])


def test_sparse_many_row_layer_takes_rice_single_entry_takes_index() -> None:
    rng = np.random.default_rng(4)
    sparse = make_layer(rng, LayerSpec("q", 16, 64, 64), "sparse")
    single = make_layer(rng, RowsSpec("one", 1, 5000), "empty")
    single[2][0, 4321] = True  # one kept entry far into a long row: indices are cheapest
    assert rice_nbytes(np.array([4321]), 5000) > 2 + 2  # 2 bytes of index + 2 of count
    layers = [sparse, single]
    payload = encode(layers, dtype="int8")
    assert payload[POS_MODE].tolist() == [MODE_RICE, MODE_INDEX]
    check_decodes(layers, payload, "int8")
    assert payload_nbytes(payload) < payload_nbytes(encode(layers, dtype="int8", rice=False))


def test_rice_never_makes_the_payload_larger_with_uint32_counts() -> None:
    """A Rice layer larger than 65535 entries takes no ``cnt`` entry, so no uint32 counts."""
    spec = RowsSpec("wide", 2, 40000)  # rows fit uint16 counts, the layer size does not
    mask = np.zeros((2, 40000), dtype=bool)
    mask[0, [5, 100, 2000]] = True
    mask[1, 7] = True
    layers = [(spec, mask.astype(np.float32), mask)]
    with_rice, without = encode(layers), encode(layers, rice=False)
    rice_cost = rice_nbytes(np.flatnonzero(mask), spec.size)
    assert rice_cost < position_bytes(without)  # the segment beats indices + uint16 counts
    assert with_rice[POS_MODE].tolist() == [MODE_RICE]
    assert with_rice[CNT].size == 0 and with_rice[CNT].dtype == np.uint16
    assert position_bytes(with_rice) == rice_cost
    assert payload_nbytes(with_rice) < payload_nbytes(without)
    check_decodes(layers, with_rice, "float32")
    # next to an index-mode layer the counts stay uint16: only non-Rice rows size them
    rng = np.random.default_rng(6)
    small = make_layer(rng, RowsSpec("one", 1, 5000), "empty")
    small[2][0, 4321] = True
    both = [*layers, small]
    payload = encode(both)
    assert payload[POS_MODE].tolist() == [MODE_RICE, MODE_INDEX]
    assert payload[CNT].dtype == np.uint16 and payload[CNT].tolist() == [1]
    assert payload_nbytes(payload) < payload_nbytes(encode(both, rice=False))
    check_decodes(both, payload, "float32")


def test_counts_go_uint32_only_for_a_non_rice_row_longer_than_65535() -> None:
    rng = np.random.default_rng(7)
    long_full = make_layer(rng, RowsSpec("long", 1, 70000), "full")  # full mode: a count 70000
    sparse = make_layer(rng, LayerSpec("q", 8, 64, 64), "sparse")
    payload = encode([sparse, long_full])
    assert payload[POS_MODE].tolist() == [MODE_RICE, MODE_FULL]
    assert payload[CNT].dtype == np.uint32 and payload[CNT].tolist() == [70000]
    check_decodes([sparse, long_full], payload, "float32")
    message = _decode_error(dict(payload, cnt=payload[CNT].astype(np.uint16)),
                            [sparse, long_full], "float32")
    assert message.startswith("field 'cnt': ") and "expected uint32" in message, message


def test_encode_rejects_dense_with_integer_dtype_and_bad_flags() -> None:
    layers = [make_layer(np.random.default_rng(5), LayerSpec("a", 2, 3, 3), "half")]
    for dtype in INT_DTYPES:
        with pytest.raises(ValueError, match="dense.*RowsSpec"):
            encode(layers, {"head": np.ones((2, 2))}, dtype=dtype)
    with pytest.raises(ValueError, match="implicit_positions has 2 entries for 1 layers"):
        encode(layers, implicit_positions=[True, False])
    with pytest.raises(TypeError, match="implicit_positions"):
        encode(layers, implicit_positions=[1])
    with pytest.raises(TypeError, match="rice must be a bool"):
        encode(layers, rice=1)
    for dtype in FLOAT_DTYPES:  # float dtypes still carry dense tensors
        payload = encode(layers, {"head": np.ones((2, 2))}, dtype=dtype)
        _, dense = decode(payload, [layers[0][0]], {"head": (2, 2)}, dtype=dtype)
        np.testing.assert_array_equal(dense["head"], np.ones((2, 2), np.float32))


# ----------------------------------------------------------------------------- hostile payloads


def hostile_base():
    """A valid int8 payload: two Rice layers (one on the complement side), one index layer."""
    rng = np.random.default_rng(11)
    layers = [
        make_layer(rng, LayerSpec("q", 8, 30, 34), "sparse"),
        make_layer(rng, LayerSpec("k", 1, 40, 40), "empty"),
        make_layer(rng, RowsSpec("head", 4, 16), "dense"),
    ]
    layers[1][2][0, 17] = True
    layers[1][1][0, 17] = 0.25
    payload = encode(layers, dtype="int8")
    assert payload[POS_MODE].tolist() == [MODE_RICE, MODE_INDEX, MODE_RICE]
    check_decodes(layers, payload, "int8")
    return payload, layers


def _decode_error(payload, layers, dtype: str = "int8") -> str:
    with pytest.raises(CodecError) as info:
        decode(payload, [s for s, _, _ in layers], dtype=dtype)
    return str(info.value)


def _with(payload, **changes):
    return {**payload, **changes}


HOSTILE = {  # name: (mutation, field the message must name, what it must say)
    "truncated rice": (lambda p: _with(p, rice=p[RICE][:-1]), RICE, "ends before|past the end"),
    "rice cut in half": (lambda p: _with(p, rice=p[RICE][: p[RICE].size // 2]), RICE,
                         "ends before|past the end"),
    "extra rice byte": (lambda p: _with(p, rice=np.append(p[RICE], np.uint8(0))), RICE,
                        "1 trailing bytes after the last segment"),
    "empty rice": (lambda p: _with(p, rice=np.zeros(0, np.uint8)), RICE, "past the end"),
    "rice uint16": (lambda p: _with(p, rice=p[RICE].astype(np.uint16)), RICE, "expected uint8"),
    "rice bad parameter": (
        lambda p: _with(p, rice=np.concatenate([[np.uint8(MAX_RICE_PARAM + 1)], p[RICE][1:]])),
        RICE, f"layer 0 .*Rice parameter {MAX_RICE_PARAM + 1} .*> {MAX_RICE_PARAM}"),
    "rice count = layer size": (lambda p: _with(p, rice=with_count(p[RICE], 8 * 64)), RICE,
                                "layer 0 .*(past the end|ends before)"),
    "rice count > layer size": (lambda p: _with(p, rice=with_count(p[RICE], 8 * 64 + 1)), RICE,
                                r"layer 0 .*count 513 not in \[0, 512\]"),
    "rice count 2**35 - 1": (lambda p: _with(p, rice=with_count(p[RICE], 2**35 - 1)), RICE,
                             rf"layer 0 .*count {2**35 - 1} not in \[0, 512\]"),
    "head rice count > layer size": (
        lambda p: _with(p, rice=with_count(p[RICE], 4 * 16 + 1, _second_segment_at(p))), RICE,
        r"layer 2 \('head'\): count 65 not in \[0, 64\]"),
    "rice count varint truncated": (lambda p: _with(p, rice=p[RICE][:1]), RICE,
                                    "layer 0 .*count varint at byte 1 is truncated"),
    "rice count varint continued past the end": (
        lambda p: _with(p, rice=np.array([p[RICE][0], 0x81], np.uint8)), RICE,
        "layer 0 .*count varint at byte 1 is truncated"),
    "rice count varint over 5 bytes": (
        lambda p: _with(p, rice=_respell_count(p[RICE], 0, [0x80] * 5 + [0x00])), RICE,
        "layer 0 .*count varint at byte 1 .*longer than 5 bytes"),
    "rice count varint non-canonical": (
        lambda p: _with(p, rice=_respell_count(p[RICE], 0, None)), RICE,
        "layer 0 .*non-canonical count varint at byte 1"),
    "head rice count varint non-canonical": (
        lambda p: _with(p, rice=_respell_count(p[RICE], _second_segment_at(p), None)), RICE,
        "layer 2 .*non-canonical count varint at byte"),
    "rice without mode 4": (lambda p: _with(p, pos_mode=np.array([MODE_INDEX] * 3, np.uint8)),
                            RICE, "no layer has pos_mode 4"),
    "missing rice": (lambda p: {k: v for k, v in p.items() if k != RICE}, RICE, "missing"),
    "missing scale": (lambda p: {k: v for k, v in p.items() if k != SCALE}, SCALE, "missing"),
    "scale too short": (lambda p: _with(p, scale=p[SCALE][:-1]), SCALE, "length"),
    "scale too long": (lambda p: _with(p, scale=np.append(p[SCALE], np.float32(1))), SCALE,
                       "length"),
    "scale float64": (lambda p: _with(p, scale=p[SCALE].astype(np.float64)), SCALE, "float32"),
    "scale NaN": (lambda p: _with(p, scale=_put(p[SCALE], 3, np.nan)), SCALE, "nan.* row 3"),
    "scale negative": (lambda p: _with(p, scale=_put(p[SCALE], 0, -1.0)), SCALE, "row 0"),
    "scale inf": (lambda p: _with(p, scale=_put(p[SCALE], 9, np.inf)), SCALE, "inf.* row 9"),
    "vals int8 -128": (lambda p: _with(p, vals=_put(p[VALS], 4, -128)), VALS,
                       "-128 at position 4"),
    "vals uint8": (lambda p: _with(p, vals=p[VALS].view(np.uint8)), VALS, "expected int8"),
    "vals float32": (lambda p: _with(p, vals=p[VALS].astype(np.float32)), VALS, "expected int8"),
    "vals too long": (lambda p: _with(p, vals=np.append(p[VALS], np.int8(1))), VALS, "length"),
    "vals too short": (lambda p: _with(p, vals=p[VALS][:-1]), VALS, "length"),
    "cnt too long": (lambda p: _with(p, cnt=np.append(p[CNT], p[CNT][:1])), CNT, "length"),
    "cnt too short": (lambda p: _with(p, cnt=p[CNT][:-1]), CNT, "length"),
    "cnt uint32": (lambda p: _with(p, cnt=p[CNT].astype(np.uint32)), CNT, "expected uint16"),
}


def _put(arr: np.ndarray, pos: int, value) -> np.ndarray:
    out = arr.copy()
    out[pos] = value
    return out


def _second_segment_at(payload) -> int:
    """Byte offset of the head's Rice segment (after the q layer's) in the hostile base."""
    reader = RiceReader(payload[RICE])
    reader.read(8 * 64, "q")
    return reader.offset


def _respell_count(rice: np.ndarray, at: int, varint: list[int] | None) -> np.ndarray:
    """The segment at byte ``at`` with its count varint replaced by ``varint`` bytes (None: the
    same count with a trailing 0x00 continuation byte, e.g. 0x05 -> 0x85 0x00)."""
    count, width = read_leb128(rice, at + 1)
    if varint is None:
        spelt = leb128(count)
        varint = [*spelt[:-1], spelt[-1] | 0x80, 0x00]
    return np.concatenate([rice[:at + 1], np.array(varint, np.uint8),
                           rice[at + 1 + width:]]).astype(np.uint8)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_payload_raises_naming_field(case: str) -> None:
    mutate, field, pattern = HOSTILE[case]
    payload, layers = hostile_base()
    message = _decode_error(mutate(payload), layers)
    assert message.startswith(f"field {field!r}: "), message
    assert re.search(pattern, message), message


def test_rice_key_without_rice_layer_rejected() -> None:
    payload, layers = hostile_base()
    v1 = encode(layers, dtype="int8", rice=False)
    assert MODE_RICE not in v1[POS_MODE]
    decode(v1, [s for s, _, _ in layers], dtype="int8")
    message = _decode_error(dict(v1, rice=payload[RICE]), layers)
    assert "field 'rice': unexpected payload key: no layer has pos_mode 4" in message


def test_rice_count_disagreeing_with_the_values_rejected() -> None:
    """A Rice segment carries its count: one that disagrees with ``vals`` is rejected."""
    payload, layers = hostile_base()
    specs = [s for s, _, _ in layers]
    flat = np.flatnonzero(layers[0][2])
    kept = int(flat.size)
    assert read_leb128(payload[RICE], 1) == (kept, varint_nbytes(kept))
    assert payload[CNT].tolist() == [1]  # only the index layer's row count
    head = rice_encode(np.flatnonzero(layers[2][2]), specs[2].size)
    n_vals = payload[VALS].size
    # a valid segment of another mask (fewer or more entries) with the values left as they are
    spare = np.setdiff1d(np.arange(specs[0].size), flat)
    for drop, add in ((1, 0), (2, 0), (kept // 2, 0), (0, 1), (0, 3)):
        other = np.union1d(np.delete(flat, np.arange(drop)), spare[:add])
        bad = dict(payload, rice=np.concatenate([rice_encode(other, specs[0].size), head]))
        message = _decode_error(bad, layers)
        assert message.startswith("field 'vals': "), message
        assert re.search(rf"length {n_vals} .*{n_vals - drop + add}", message), message
    # the count edited in place (the rest of the segment unchanged)
    for delta in (-kept, -2, -1, 1, 2, 100):
        bad = dict(payload, rice=with_count(payload[RICE], kept + delta))
        message = _decode_error(bad, layers)
        assert re.match(r"field '(rice|vals)': ", message), message
        # and with the values resized to match: a misreading, or a consistent reading
        vals = payload[VALS]
        bad[VALS] = np.append(vals, np.ones(delta, np.int8)) if delta > 0 else vals[:delta]
        try:
            out, _ = decode(bad, specs, dtype="int8")
        except CodecError as err:
            assert str(err).startswith("field 'rice': "), str(err)
        else:
            assert int(out[0][1].sum()) == kept + delta
            assert sum(int(m.sum()) for _, m in out) == bad[VALS].size


def test_wrong_decode_dtype_rejected() -> None:
    payload, layers = hostile_base()
    for dtype in ("int4", "float32", "float16"):
        message = _decode_error(payload, layers, dtype)
        assert "'vals'" in message or "'scale'" in message, message


# ----------------------------------------------------------------------------- fuzzing

FUZZ_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.uint8, np.uint16, np.uint32,
               np.int32]


def fuzz_bases() -> list[dict]:
    rng = np.random.default_rng(12)
    mixed = [
        make_layer(rng, LayerSpec("q", 6, 20, 24), "sparse"),
        make_layer(rng, RowsSpec("head", 3, 10), "mixed_rows"),
        make_layer(rng, LayerSpec("v", 2, 8, 8), "half"),
        make_layer(rng, RowsSpec("bias", 1, 5), "full"),
        make_layer(rng, RowsSpec("bits", 1, 16), "half"),  # one row near half: bitmap
        make_layer(rng, RowsSpec("one", 1, 40), "empty"),
    ]
    mixed[-1][2][0, 9] = True  # a single kept entry in a single row: indices
    mixed[-1][1][0, 9] = -1.5
    packed = [
        make_layer(rng, LayerSpec("a", 5, 16, 16), "dense"),
        make_layer(rng, RowsSpec("h", 2, 7), "half"),
        make_layer(rng, LayerSpec("b", 4, 30, 30), "very_sparse"),
    ]
    halves = [
        make_layer(rng, LayerSpec("c", 4, 12, 12), "sparse"),
        make_layer(rng, LayerSpec("d", 3, 5, 6), "half"),
    ]
    out = []
    for layers, kwargs in (
        (mixed, {"dtype": "int8"}),
        (packed, {"dtype": "int4"}),
        (packed, {"dtype": "int4", "implicit_positions": [False, True, False]}),
        (halves, {"dtype": "float16"}),
    ):
        payload = encode(layers, **kwargs)
        assert MODE_RICE in payload[POS_MODE].tolist()
        if layers is mixed:
            assert {MODE_BITMAP, MODE_INDEX, MODE_FULL} <= set(payload[POS_MODE].tolist())
        out.append({"payload": payload, "specs": [s for s, _, _ in layers],
                    "masks": [m for _, _, m in layers], "dtype": kwargs["dtype"]})
    return out


BASES = fuzz_bases()


def apply_mutation(p: dict[str, np.ndarray], op: str, a: int, b: int, c: int) -> None:
    """test_codec's mutations (with int8 among the dtypes) plus single-bit flips, position
    mode rewrites and format-2 keys added."""
    keys = sorted(p)
    key = keys[a % len(keys)]
    arr = p[key]
    if op == "bit" and arr.nbytes:
        raw = np.frombuffer(arr.tobytes(), dtype=np.uint8).copy()
        raw[b % raw.size] ^= np.uint8(1 << (c % 8))
        p[key] = np.frombuffer(raw.tobytes(), dtype=arr.dtype).reshape(arr.shape)
    elif op == "mode" and POS_MODE in p and p[POS_MODE].size:
        modes = p[POS_MODE].copy()
        modes.reshape(-1)[b % modes.size] = c % 6
        p[POS_MODE] = modes
    elif op == "add":
        p[(RICE, SCALE, IDX, BMP)[b % 4]] = np.zeros(c % 4, (np.uint8, np.float32)[c % 2])
    elif op not in ("bit", "mode"):
        codec_mutation(p, op, a, b, c, dtypes=FUZZ_DTYPES)


MUTATION_OPS = "flip flip bit bit dtype view truncate extend mode swap delete add reshape".split()
MUTATION = st.tuples(st.sampled_from(MUTATION_OPS), st.integers(0, 2**16),
                     st.integers(0, 2**16), st.integers(0, 2**16))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(BASES) - 1), st.lists(MUTATION, min_size=1, max_size=3),
       st.booleans())
def test_fuzzed_v2_payload_raises_codec_error_or_decodes_consistently(base, mutations,
                                                                       masks) -> None:
    case = BASES[base]
    payload = dict(case["payload"])
    for op, a, b, c in mutations:
        if payload:
            apply_mutation(payload, op, a, b, c)
    specs = case["specs"]
    try:
        with np.errstate(over="ignore"):
            out, dense = decode(payload, specs, dtype=case["dtype"],
                                masks=case["masks"] if masks else None)
    except CodecError:
        event("rejected")
        return
    event("accepted")
    assert dense == {} and len(out) == len(specs)
    modes = payload[POS_MODE].tolist()
    cnt = payload[CNT].astype(np.int64)
    off = 0
    for spec, (values, mask), mode in zip(specs, out, modes, strict=True):
        assert values.dtype == np.float32 and mask.dtype == np.bool_
        assert values.shape == mask.shape == (spec.r, spec.row_len)
        assert np.isfinite(values).all()
        assert not values[~mask].any()
        if mode != MODE_RICE:  # a Rice layer's count is in its segment, not in cnt
            np.testing.assert_array_equal(mask.sum(axis=1), cnt[off:off + spec.r])
            off += spec.r
    assert off == cnt.size
    kept = sum(int(m.sum()) for _, m in out)
    assert payload[VALS].nbytes == values_nbytes(kept, case["dtype"])


def test_fuzz_bases_decode_unmutated() -> None:
    for case in BASES:
        out, _ = decode(case["payload"], case["specs"], dtype=case["dtype"], masks=case["masks"])
        for (_, m), want in zip(out, case["masks"], strict=True):
            np.testing.assert_array_equal(m, want)
    assert {case["dtype"] for case in BASES} >= set(INT_DTYPES)
    assert any(isinstance(s, RowsSpec) for case in BASES for s in case["specs"])
