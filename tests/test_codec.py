"""Tests for fedsoft.compression.codec: round trips, position-mode choice, strict validation and
fuzzing."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedsoft.compression.codec import (
    BMP,
    CNT,
    IDX,
    MODE_BITMAP,
    MODE_FULL,
    MODE_IMPLICIT,
    MODE_INDEX,
    POS_MODE,
    VALS,
    CodecError,
    LayerSpec,
    decode,
    encode,
    payload_nbytes,
)

PATTERNS = ("empty", "full", "sparse", "half", "dense", "mixed_rows")


def make_mask(rng: np.random.Generator, r: int, n: int, pattern: str) -> np.ndarray:
    """A bool (r, n) mask following a named pattern (mixed_rows: each row empty/full/random)."""
    if pattern == "empty":
        return np.zeros((r, n), dtype=bool)
    if pattern == "full":
        return np.ones((r, n), dtype=bool)
    if pattern == "mixed_rows":
        rows = [
            make_mask(rng, 1, n, rng.choice(["empty", "full", "sparse", "half"]))[0]
            for _ in range(r)
        ]
        return np.stack(rows)
    p = {"sparse": 0.03, "half": 0.5, "dense": 0.9}[pattern]
    return rng.random((r, n)) < p


def make_layers(
    rng: np.random.Generator, shapes: list[tuple[int, int, int]], patterns: list[str]
) -> list[tuple[LayerSpec, np.ndarray, np.ndarray]]:
    layers = []
    for i, ((r, d, k), pattern) in enumerate(zip(shapes, patterns, strict=True)):
        spec = LayerSpec(f"layer{i}", r, d, k)
        mask = make_mask(rng, r, d + k, pattern)
        values = (rng.standard_normal((r, d + k)) * 3).astype(np.float32) * mask
        layers.append((spec, values, mask))
    return layers


def expected_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """What the decoder must return: values rounded through the wire dtype."""
    return values.astype(dtype).astype(np.float32)


def cnt_of(layers) -> np.ndarray:
    return np.concatenate([m.sum(axis=1) for _, _, m in layers]) if layers else np.zeros(0)


@st.composite
def cases(draw, max_layers: int = 4):
    n_layers = draw(st.integers(0, max_layers))
    shapes = [
        (draw(st.integers(1, 4)), draw(st.integers(1, 40)), draw(st.integers(1, 40)))
        for _ in range(n_layers)
    ]
    patterns = [draw(st.sampled_from(PATTERNS)) for _ in range(n_layers)]
    seed = draw(st.integers(0, 2**32 - 1))
    dtype = draw(st.sampled_from(["float32", "float16"]))
    return make_layers(np.random.default_rng(seed), shapes, patterns), dtype


def assert_round_trip(layers, payload, dtype, masks=None, dense=None) -> None:
    specs = [s for s, _, _ in layers]
    shapes = {n: np.asarray(a).shape for n, a in (dense or {}).items()}
    out, dense_out = decode(payload, specs, shapes, dtype=dtype, masks=masks)
    assert len(out) == len(layers)
    for (spec, values, mask), (v2, m2) in zip(layers, out, strict=True):
        assert v2.dtype == np.float32 and m2.dtype == np.bool_
        assert v2.shape == m2.shape == (spec.r, spec.d + spec.k)
        np.testing.assert_array_equal(m2, mask)
        np.testing.assert_array_equal(v2, expected_values(values, dtype))
    assert set(dense_out) == set(shapes)
    for name, arr in (dense or {}).items():
        assert dense_out[name].dtype == np.float32
        np.testing.assert_array_equal(dense_out[name], expected_values(np.asarray(arr), dtype))


# ----------------------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None)
@given(cases())
def test_round_trip_explicit_positions(case) -> None:
    layers, dtype = case
    payload = encode(layers, dtype=dtype, rice=False)
    for m in payload[POS_MODE]:
        event(f"pos_mode {int(m)}")
    assert payload[VALS].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(payload[CNT], cnt_of(layers))
    assert_round_trip(layers, payload, dtype)


@settings(max_examples=60, deadline=None)
@given(cases(), st.booleans())
def test_round_trip_implicit_positions_with_masks(case, with_dense) -> None:
    layers, dtype = case
    dense = {"head": np.linspace(-2, 2, 12).reshape(3, 4)} if with_dense else None
    payload = encode(layers, dense, dtype=dtype, implicit_positions=True)
    assert set(payload) == {VALS, CNT, POS_MODE} | ({"dense/head"} if with_dense else set())
    assert (payload[POS_MODE] == MODE_IMPLICIT).all()
    masks = [m for _, _, m in layers]
    assert_round_trip(layers, payload, dtype, masks=masks, dense=dense)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_index_and_bitmap_modes_both_round_trip(dtype: str) -> None:
    rng = np.random.default_rng(1)
    layers = make_layers(rng, [(4, 50, 30), (3, 7, 9), (2, 20, 20)], ["sparse", "half", "empty"])
    dense = {"head": rng.standard_normal((2, 5)), "bias": rng.standard_normal(2)}
    payload = encode(layers, dense, dtype=dtype, rice=False)
    assert payload[POS_MODE].tolist() == [MODE_INDEX, MODE_BITMAP, MODE_INDEX]
    assert payload[IDX].size == int(layers[0][2].sum()) > 0
    assert payload[BMP].size == math.ceil(3 * 16 / 8)
    assert payload["dense/head"].dtype == np.dtype(dtype)
    assert_round_trip(layers, payload, dtype, dense=dense)


def test_all_empty_masks_round_trip() -> None:
    layers = make_layers(np.random.default_rng(2), [(2, 3, 4), (1, 5, 5)], ["empty", "empty"])
    payload = encode(layers)
    # nothing kept: no position array at all (an empty idx would still cost its framing)
    assert payload[VALS].size == 0 and IDX not in payload and BMP not in payload
    assert_round_trip(layers, payload, "float32")


def test_no_layers_round_trip() -> None:
    payload = encode([], {"head": np.ones(3)})
    out, dense = decode(payload, [], {"head": (3,)})
    assert out == [] and dense["head"].tolist() == [1.0, 1.0, 1.0]


def test_torch_inputs_match_numpy() -> None:
    layers = make_layers(np.random.default_rng(3), [(2, 10, 6)], ["half"])
    spec, values, mask = layers[0]
    head = np.arange(6, dtype=np.float32).reshape(2, 3)
    from_np = encode(layers, {"head": head})
    from_torch = encode(
        [(spec, torch.from_numpy(values).requires_grad_(), torch.from_numpy(mask))],
        {"head": torch.from_numpy(head)},
    )
    assert from_np.keys() == from_torch.keys()
    for key in from_np:
        np.testing.assert_array_equal(from_np[key], from_torch[key])


def test_long_rows_use_uint32_counts_and_bitmap() -> None:
    # d + k = 70000 > 65536: uint16 indices cannot address the row, so bitmap even when sparse
    rng = np.random.default_rng(4)
    spec = LayerSpec("wide", 1, 40000, 30000)
    mask = np.zeros((1, 70000), dtype=bool)
    mask[0, [3, 65535, 65536, 69999]] = True
    values = rng.standard_normal((1, 70000)).astype(np.float32) * mask
    payload = encode([(spec, values, mask)], rice=False)
    assert payload[CNT].dtype == np.uint32
    assert payload[POS_MODE].tolist() == [MODE_BITMAP]
    assert_round_trip([(spec, values, mask)], payload, "float32")


def test_row_of_65536_uses_uint32_counts_and_may_index() -> None:
    spec = LayerSpec("edge", 1, 65535, 1)
    mask = np.zeros((1, 65536), dtype=bool)
    mask[0, [0, 65535]] = True
    values = mask.astype(np.float32)
    payload = encode([(spec, values, mask)], rice=False)
    assert payload[CNT].dtype == np.uint32
    assert payload[POS_MODE].tolist() == [MODE_INDEX]
    assert payload[IDX].tolist() == [0, 65535]
    assert_round_trip([(spec, values, mask)], payload, "float32")


def test_payload_survives_flower_array_record() -> None:
    app = pytest.importorskip("flwr.app")
    rng = np.random.default_rng(9)
    layers = make_layers(rng, [(3, 40, 30), (2, 6, 5), (1, 2, 2)], ["sparse", "half", "empty"])
    dense = {"head": rng.standard_normal((2, 3))}
    for dtype in ("float32", "float16"):
        payload = encode(layers, dense, dtype=dtype)
        record = app.ArrayRecord({key: app.Array(arr) for key, arr in payload.items()})
        received = {key: arr.numpy() for key, arr in record.items()}
        assert_round_trip(layers, received, dtype, dense=dense)


# ----------------------------------------------------------------------------- mode choice


@settings(max_examples=100, deadline=None)
@given(cases(max_layers=3))
def test_position_mode_is_the_smaller_one(case) -> None:
    layers, _ = case
    payload = encode(layers, rice=False)
    idx_total = bmp_total = 0
    for (spec, _, mask), mode in zip(layers, payload[POS_MODE], strict=True):
        kept = int(np.count_nonzero(mask))
        index_bytes = 2 * kept
        bitmap_bytes = math.ceil(spec.r * (spec.d + spec.k) / 8)
        if kept == mask.size:
            assert mode == MODE_FULL  # everything kept: no positions at all
        elif mode == MODE_INDEX:
            assert index_bytes <= bitmap_bytes
            idx_total += index_bytes
        else:
            assert mode == MODE_BITMAP
            assert bitmap_bytes <= index_bytes
            bmp_total += bitmap_bytes
    assert (payload[IDX].nbytes if IDX in payload else 0) == idx_total
    assert (payload[BMP].nbytes if BMP in payload else 0) == bmp_total
    assert payload_nbytes(payload) == sum(a.nbytes for a in payload.values())


# ----------------------------------------------------------------------------- encode errors


def test_encode_rejects_bad_input() -> None:
    layers = make_layers(np.random.default_rng(5), [(2, 3, 3)], ["half"])
    spec, values, mask = layers[0]
    with pytest.raises(ValueError, match="dtype"):
        encode(layers, dtype="bfloat16")
    with pytest.raises(ValueError, match="values shape"):
        encode([(spec, values[:, :5], mask)])
    with pytest.raises(TypeError, match="mask must be bool"):
        encode([(spec, values, mask.astype(np.uint8))])
    bad = values.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        encode([(spec, bad, mask)])
    big = np.where(mask, 1e6, 0.0)
    with pytest.raises(ValueError, match="overflows"):
        encode([(spec, big, mask)], dtype="float16")
    with pytest.raises(ValueError, match="dense"):
        encode(layers, {"head": np.array([np.inf])})
    with pytest.raises(ValueError, match="positive"):
        LayerSpec("x", 0, 3, 3)
    with pytest.raises(TypeError, match="LayerSpec.d"):
        LayerSpec("x", 1, 2.5, 3)


# ----------------------------------------------------------------------------- malformed payloads

SPECS = [LayerSpec("q", 2, 30, 34), LayerSpec("v", 3, 5, 5)]  # index mode, bitmap (30 bits)
DENSE = {"head": (2, 3)}


def base_payload() -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    mask_q = np.zeros((2, 64), dtype=bool)
    mask_q[0, [1, 7, 40]] = True
    mask_q[1, [63]] = True
    mask_v = np.zeros((3, 10), dtype=bool)
    mask_v[0, :6] = True
    mask_v[2, ::2] = True
    masks = [mask_q, mask_v]
    rng = np.random.default_rng(6)
    layers = [(s, rng.standard_normal(m.shape) * m, m) for s, m in zip(SPECS, masks, strict=True)]
    payload = encode(layers, {"head": np.ones((2, 3))}, rice=False)
    assert payload[POS_MODE].tolist() == [MODE_INDEX, MODE_BITMAP]
    return payload, masks


def _set(key: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], None]:
    def mutate(p: dict) -> None:
        p[key] = fn(p[key].copy())

    return mutate


def _assign(key: str, pos: int, value) -> Callable[[dict], None]:
    def fn(a: np.ndarray) -> np.ndarray:
        a[pos] = value
        return a

    return _set(key, fn)


def _delete(key: str) -> Callable[[dict], None]:
    return lambda p: p.pop(key)


def _add(key: str, arr: np.ndarray) -> Callable[[dict], None]:
    return lambda p: p.__setitem__(key, arr)


MALFORMED = {
    "missing cnt": (_delete(CNT), CNT),
    "missing idx": (_delete(IDX), IDX),
    "missing bmp": (_delete(BMP), BMP),
    "unknown key": (_add("extra", np.zeros(1, np.uint8)), "extra"),
    "non-array value": (lambda p: p.__setitem__(CNT, [3, 1, 6, 0, 5]), CNT),
    "vals float64": (_set(VALS, lambda a: a.astype(np.float64)), VALS),
    "vals big-endian": (_set(VALS, lambda a: a.astype(">f4")), VALS),
    "idx int32": (_set(IDX, lambda a: a.astype(np.int32)), IDX),
    "cnt uint32": (_set(CNT, lambda a: a.astype(np.uint32)), CNT),
    "pos_mode int64": (_set(POS_MODE, lambda a: a.astype(np.int64)), POS_MODE),
    "bmp uint16": (_set(BMP, lambda a: a.astype(np.uint16)), BMP),
    "vals 2-D": (_set(VALS, lambda a: a[None, :]), VALS),
    "cnt 2-D": (_set(CNT, lambda a: a[:, None]), CNT),
    "cnt length": (_set(CNT, lambda a: a[:-1]), CNT),
    "count > d+k": (_assign(CNT, 2, 11), CNT),
    "sum cnt != len vals": (_set(VALS, lambda a: np.append(a, np.float32(1))), VALS),
    "idx length": (_set(IDX, lambda a: a[:-1]), IDX),
    "idx out of range": (_assign(IDX, 3, 64), IDX),
    "idx duplicate": (_assign(IDX, 1, 1), IDX),
    "idx decreasing": (_assign(IDX, 2, 5), IDX),
    "bmp length": (_set(BMP, lambda a: np.append(a, np.uint8(0))), BMP),
    "bmp popcount != cnt": (_set(BMP, lambda a: a ^ np.array([0, 0x01, 0, 0], np.uint8)), BMP),
    "bmp padding bits": (_set(BMP, lambda a: a | np.array([0, 0, 0, 0x01], np.uint8)), BMP),
    "pos_mode value": (_assign(POS_MODE, 0, 5), POS_MODE),  # 4 is Rice since format 2
    "pos_mode full with partial counts": (
        lambda p: (_assign(POS_MODE, 0, MODE_FULL)(p), p.pop(IDX)), CNT),
    "pos_mode length": (_set(POS_MODE, lambda a: a[:1]), POS_MODE),
    "pos_mode implicit without masks": (
        lambda p: (_assign(POS_MODE, 1, MODE_IMPLICIT)(p), p.pop(BMP)),
        "masks",
    ),
    "vals NaN": (_assign(VALS, 2, np.nan), VALS),
    "vals Inf": (_assign(VALS, 0, -np.inf), VALS),
    "dense NaN": (_set("dense/head", lambda a: a * np.nan), "dense/head"),
    "dense dtype": (_set("dense/head", lambda a: a.astype(np.float64)), "dense/head"),
    "dense shape": (_set("dense/head", lambda a: a.reshape(3, 2)), "dense/head"),
    "dense missing": (_delete("dense/head"), "dense/head"),
    "dense unknown name": (_add("dense/other", np.zeros(2, np.float32)), "dense/other"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_payload_raises_naming_field(case: str) -> None:
    mutate, field = MALFORMED[case]
    payload, _ = base_payload()
    assert len(decode(payload, SPECS, DENSE)[0]) == 2  # the unmutated base is valid
    mutate(payload)
    with pytest.raises(CodecError) as info:
        decode(payload, SPECS, DENSE)
    assert repr(field) in str(info.value), str(info.value)


def test_unexpected_idx_without_index_mode() -> None:
    payload, _ = base_payload()
    payload[POS_MODE] = np.array([MODE_BITMAP, MODE_BITMAP], np.uint8)
    with pytest.raises(CodecError, match="'idx'"):
        decode(payload, SPECS, DENSE)


def test_index_mode_for_rows_longer_than_uint16() -> None:
    spec = LayerSpec("wide", 1, 60000, 10000)
    payload = {
        VALS: np.zeros(0, np.float32),
        CNT: np.zeros(1, np.uint32),
        POS_MODE: np.array([MODE_INDEX], np.uint8),
        IDX: np.zeros(0, np.uint16),
    }
    with pytest.raises(CodecError, match="'pos_mode'"):
        decode(payload, [spec])


def test_oversized_payload_rejected() -> None:
    payload, _ = base_payload()
    size = payload_nbytes(payload)
    decode(payload, SPECS, DENSE, max_bytes=size)
    with pytest.raises(CodecError, match="'payload'.*max_bytes"):
        decode(payload, SPECS, DENSE, max_bytes=size - 1)


def test_implicit_mode_mask_errors() -> None:
    rng = np.random.default_rng(7)
    layers = make_layers(rng, [(2, 4, 4), (3, 5, 2)], ["half", "mixed_rows"])
    specs = [s for s, _, _ in layers]
    masks = [m for _, _, m in layers]
    payload = encode(layers, implicit_positions=True)
    with pytest.raises(CodecError, match="'masks'"):
        decode(payload, specs)
    with pytest.raises(CodecError, match="'masks'"):
        decode(payload, specs, masks=masks[:1])
    wrong = [m.copy() for m in masks]
    wrong[1][0] = ~wrong[1][0]
    with pytest.raises(CodecError, match=r"'masks\[1\]'"):
        decode(payload, specs, masks=wrong)
    with pytest.raises(CodecError, match=r"'masks\[0\]'"):
        decode(payload, specs, masks=[masks[0].astype(np.uint8), masks[1]])
    with pytest.raises(CodecError, match=r"'masks\[0\]'"):
        decode(payload, specs, masks=[masks[0][:, :-1], masks[1]])


def test_decode_argument_errors() -> None:
    payload, _ = base_payload()
    with pytest.raises(CodecError, match="dtype"):
        decode(payload, SPECS, DENSE, dtype="float64")
    with pytest.raises(CodecError, match="vals"):
        decode(payload, SPECS, DENSE, dtype="float16")
    with pytest.raises(CodecError, match="payload must be a mapping"):
        decode([payload[VALS]], SPECS, DENSE)
    with pytest.raises(CodecError, match="specs"):
        decode(payload, [("q", 2, 30, 34)], DENSE)


def test_decode_does_not_alias_or_modify_payload() -> None:
    payload, _ = base_payload()
    before = {k: v.copy() for k, v in payload.items()}
    out, dense = decode(payload, SPECS, DENSE)
    out[0][0][:] = 7.0
    dense["head"][:] = 7.0
    for key, arr in before.items():
        np.testing.assert_array_equal(payload[key], arr)


# ----------------------------------------------------------------------------- fuzzing

FUZZ_DTYPES = [np.float16, np.float32, np.float64, np.uint8, np.uint16, np.uint32, np.int32]


def fuzz_bases() -> list[dict]:
    """Valid payloads to mutate: mixed index/bitmap + dense, implicit with masks, float16."""
    rng = np.random.default_rng(8)
    mixed = make_layers(rng, [(3, 40, 30), (2, 6, 5), (2, 8, 8)], ["sparse", "mixed_rows", "half"])
    implicit = make_layers(rng, [(2, 6, 6), (3, 4, 3)], ["half", "mixed_rows"])
    small = make_layers(rng, [(4, 20, 30), (1, 3, 2)], ["sparse", "full"])
    dense = {"head": rng.standard_normal((2, 3))}
    out = []
    for layers, kwargs in (
        (mixed, {"dtype": "float32", "rice": False}),
        (implicit, {"dtype": "float32", "implicit_positions": True}),
        (small, {"dtype": "float16", "rice": False}),
    ):
        out.append(
            {
                "payload": encode(layers, dense, **kwargs),
                "specs": [s for s, _, _ in layers],
                "masks": [m for _, _, m in layers],
                "dtype": kwargs["dtype"],
            }
        )
    return out


BASES = fuzz_bases()


def apply_mutation(p: dict[str, np.ndarray], op: str, a: int, b: int, c: int,
                   dtypes: list = FUZZ_DTYPES) -> None:
    """Mutate payload ``p`` in place (``dtypes``: what the dtype / view ops cast to)."""
    keys = sorted(p)
    key = keys[a % len(keys)]
    arr = p[key]
    if op == "flip" and arr.nbytes:
        raw = np.frombuffer(arr.tobytes(), dtype=np.uint8).copy()
        raw[b % raw.size] ^= np.uint8(1 + c % 255)
        p[key] = np.frombuffer(raw.tobytes(), dtype=arr.dtype).reshape(arr.shape)
    elif op == "dtype":
        with np.errstate(all="ignore"):
            p[key] = arr.astype(dtypes[b % len(dtypes)])
    elif op == "view":
        raw = arr.reshape(-1).view(np.uint8)
        new = dtypes[b % len(dtypes)]
        size = np.dtype(new).itemsize
        p[key] = raw[: raw.size - raw.size % size].view(new)
    elif op == "truncate" and arr.ndim == 1:
        p[key] = arr[: b % (arr.shape[0] + 1)]
    elif op == "extend" and arr.ndim == 1:
        extra = np.random.default_rng(c).integers(0, 256, size=(1 + b % 4) * arr.itemsize)
        p[key] = np.concatenate([arr, extra.astype(np.uint8).view(arr.dtype)])
    elif op == "swap":
        other = keys[b % len(keys)]
        p[key], p[other] = p[other], p[key]
    elif op == "nan":
        key = VALS if b % 2 == 0 and VALS in p else key
        target = p[key]
        if isinstance(target, np.ndarray) and target.dtype.kind == "f" and target.size:
            target = target.copy()
            target.reshape(-1)[c % target.size] = np.nan if c % 3 else np.inf
            p[key] = target
    elif op == "delete":
        del p[key]
    elif op == "add":
        p[f"dense/x{b % 3}" if c % 2 else f"k{b % 3}"] = np.zeros(1 + c % 3, np.float32)
    elif op == "reshape":
        p[key] = arr[None]


MUTATION_OPS = "flip flip flip dtype view truncate extend swap nan delete add reshape".split()
MUTATION = st.tuples(
    st.sampled_from(MUTATION_OPS),
    st.integers(0, 2**16),
    st.integers(0, 2**16),
    st.integers(0, 2**16),
)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.integers(0, len(BASES) - 1), st.lists(MUTATION, min_size=1, max_size=3), st.booleans())
def test_fuzzed_payload_raises_codec_error_or_decodes_consistently(base, mutations, masks) -> None:
    case = BASES[base]
    payload = dict(case["payload"])
    for op, a, b, c in mutations:
        if payload:
            apply_mutation(payload, op, a, b, c)
    specs = case["specs"]
    try:
        out, dense = decode(
            payload,
            specs,
            {"head": (2, 3)},
            dtype=case["dtype"],
            masks=case["masks"] if masks else None,
        )
    except CodecError:
        event("rejected")
        return
    event("accepted")
    cnt = payload[CNT].astype(np.int64)
    row = 0
    vals = []
    for spec, (values, mask) in zip(specs, out, strict=True):
        assert values.dtype == np.float32 and mask.dtype == np.bool_
        assert values.shape == mask.shape == (spec.r, spec.d + spec.k)
        np.testing.assert_array_equal(mask.sum(axis=1), cnt[row : row + spec.r])
        assert not values[~mask].any()
        assert np.isfinite(values).all()
        vals.append(values[mask])
        row += spec.r
    np.testing.assert_array_equal(np.concatenate(vals), payload[VALS].astype(np.float32))
    assert set(dense) == {"head"}
    assert dense["head"].shape == (2, 3) and np.isfinite(dense["head"]).all()


def test_full_layers_send_no_positions() -> None:
    rng = np.random.default_rng(3)
    spec = LayerSpec("l", 3, 4, 5)
    values = rng.standard_normal((3, 9)).astype(np.float32)
    payload = encode([(spec, values, np.ones((3, 9), dtype=bool))])
    assert payload[POS_MODE].tolist() == [MODE_FULL] and IDX not in payload and BMP not in payload
    (out, mask), = decode(payload, [spec])[0]
    assert mask.all() and np.array_equal(out, values)
