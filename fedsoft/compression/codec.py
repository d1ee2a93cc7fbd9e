"""Compact wire format for sparse LoRA rank-row updates as a few flat numpy arrays.

Flower serialises every numpy array densely (``np.save``), so zeros are not free: this module
packs the kept entries of all sparse LoRA layers of one client into a handful of flat arrays.

Each LoRA layer with spec ``(r, d, k)`` is given as a "rank rows" matrix ``values`` of shape
``(r, d + k)`` whose row ``j`` is ``[b_j ; a_j]`` (column ``j`` of ``B`` then row ``j`` of ``A``)
and a bool ``mask`` of the same shape (the kept entries). A :class:`~fedsoft.layout.RowsSpec`
block (e.g. the head, classes x hidden) is packed the same way. Eq. (6) of arXiv 2505.00333
charges ``(1 - rho) r (d + k) q`` bits for the values only; the position overhead it leaves out
(PROPOSED-L: at least ``log2 C(r (d + k), kept)`` bits per layer) is what the position modes
below minimise, and ``q`` is the value dtype (:mod:`fedsoft.compression.quantize`).

Layout (all arrays 1-D except the dense tensors; L layers):

========== ================== ============================================================
key        dtype              content
========== ================== ============================================================
vals       float32 / float16  all kept values, layer by layer, row by row, ascending
           / int8 / uint8     position within a row (``values[mask]`` in row-major order);
                              int8 codes, or int4 codes packed two per byte (uint8)
scale      float32            int8 / int4 only: one scale per row of every layer
cnt        uint16 (uint32)    kept count per rank row of the mode 0-3 layers (a Rice
                              segment carries its own); uint32 as soon as one of those
                              rows is longer than 65535
pos_mode   uint8              one per layer: 0 = uint16 within-row indices, 1 = bitmap,
                              2 = implicit (both sides regenerate the mask from a seed),
                              3 = full (every entry kept, e.g. rho = 0: no positions),
                              4 = Rice-coded gaps of the flat positions, count included
                              (:mod:`fedsoft.compression.positions`)
idx        uint16             within-row positions of the index-mode layers, concatenated;
                              present iff the ``pos_mode == 0`` layers keep some entry
bmp        uint8              ``np.packbits`` of each bitmap-mode layer's flattened mask, each
                              layer padded with zero bits to a whole byte; present iff some
                              layer has ``pos_mode == 1``
rice       uint8              the Rice segments of the mode-4 layers, concatenated; present
                              iff some layer has ``pos_mode == 4``
dense/<n>  float32 / float16  small dense tensor ``<n>`` (e.g. the classifier head), own shape
========== ================== ============================================================

Position mode per layer (unless ``implicit_positions``): ``full`` when every entry is kept,
else the smallest of ``2 * kept`` bytes of indices (needs ``d + k <= 65536``),
``ceil(r (d + k) / 8)`` bytes of bitmap and the Rice segment minus the per-row counts it
saves (ties go to the bitmap, then the indices). There is no ``meta``/version array on the wire:
each Flower array costs about 130 bytes of npy header + key (see ``bench/wire_bytes.py``).
``FORMAT_VERSION`` is meant for out-of-band checks (e.g. a Flower ConfigRecord entry); a layout
change must also change keys.

``decode`` validates every field against the caller's layer specs before it builds anything,
and raises ``CodecError`` naming the field and the offending value on any inconsistency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedsoft.compression import positions, quantize
from fedsoft.layout import LayerSpec, RowsSpec

__all__ = [
    "BMP",
    "CNT",
    "DENSE_PREFIX",
    "FORMAT_VERSION",
    "IDX",
    "MODE_BITMAP",
    "MODE_FULL",
    "MODE_IMPLICIT",
    "MODE_INDEX",
    "MODE_RICE",
    "POS_MODE",
    "RICE",
    "SCALE",
    "VALS",
    "CodecError",
    "LayerSpec",
    "RowsSpec",
    "decode",
    "encode",
    "payload_nbytes",
]

FORMAT_VERSION = 2
VALS = "vals"
SCALE = "scale"
CNT = "cnt"
POS_MODE = "pos_mode"
IDX = "idx"
BMP = "bmp"
RICE = "rice"
DENSE_PREFIX = "dense/"
MODE_INDEX = 0
MODE_BITMAP = 1
MODE_IMPLICIT = 2
MODE_FULL = 3
MODE_RICE = 4
_MAX_INDEX_ROW = 1 << 16  # uint16 within-row positions address rows of at most 65536 entries
_MAX_U16_COUNT = (1 << 16) - 1
_FLOAT_WIRE = ("float32", "float16")

Spec = LayerSpec | RowsSpec


class CodecError(ValueError):
    """A payload (or decode argument) is malformed; the message names the field and value."""


def _wire_dtype(dtype: str, error: type[ValueError] = ValueError) -> str:
    if not isinstance(dtype, str) or dtype not in quantize.WIRE_DTYPES:
        raise error(f"dtype must be one of {list(quantize.WIRE_DTYPES)}, got {dtype!r}")
    return dtype


def _count_slots(spec: Spec, mode: int) -> int:
    """Entries of ``cnt`` a layer takes: one per row, none for a Rice layer (its segment
    carries its count)."""
    return 0 if mode == MODE_RICE else spec.r


def _count_dtype(specs: Sequence[Spec], modes: Sequence[int]) -> np.dtype:
    if all(s.row_len <= _MAX_U16_COUNT for s, m in zip(specs, modes, strict=True)
           if m != MODE_RICE):
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _bitmap_bytes(spec: Spec) -> int:
    return -(-spec.size // 8)


def _choose_mode(spec: Spec, kept: int, flat: np.ndarray, rice: bool = True) -> int:
    """Cheapest explicit position mode for one layer (see the module docstring)."""
    if kept == spec.size:
        return MODE_FULL
    sizes = {MODE_BITMAP: _bitmap_bytes(spec)}
    if spec.row_len <= _MAX_INDEX_ROW:
        sizes[MODE_INDEX] = 2 * kept
    if rice:  # the segment carries its count: credit the r (uint16) row counts it saves
        sizes[MODE_RICE] = positions.rice_nbytes(flat, spec.size) - 2 * spec.r
    return min(sizes, key=lambda m: (sizes[m], (MODE_BITMAP, MODE_INDEX, MODE_RICE).index(m)))


def _to_numpy(x: Any) -> np.ndarray:
    """Convert a torch tensor (duck-typed, no torch import) or array-like to numpy."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        if str(getattr(t, "dtype", "")) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def _check_real(arr: np.ndarray, field: str) -> None:
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{field} must hold real numbers, got dtype {arr.dtype}")


def _cast_finite(arr: np.ndarray, dtype: str, field: str) -> np.ndarray:
    """Cast to a float wire dtype; reject NaN/Inf before and after (float16 overflow -> Inf)."""
    try:
        return quantize.quantize(arr, np.zeros(0, np.int64), dtype)[0]
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from err


def encode(
    layers: Sequence[tuple[Spec, Any, Any]],
    dense: Mapping[str, Any] | None = None,
    *,
    dtype: str = "float32",
    implicit_positions: bool | Sequence[bool] = False,
    rice: bool = True,
) -> dict[str, np.ndarray]:
    """Pack sparse rank-row updates (and small dense tensors) into flat wire arrays.

    ``layers`` holds ``(spec, values, mask)`` per LoRA layer (or :class:`RowsSpec` block) with
    ``values`` of shape ``(r, row_len)`` (rank rows ``[b_j ; a_j]``) and bool ``mask`` of the
    same shape; numpy arrays or torch tensors. Only ``values[mask]`` is sent (the decoder
    returns zeros elsewhere), so the value part costs ``sum(mask) * q`` bits as in eq. (6) of
    arXiv 2505.00333, with ``q`` = 32, 16, 8 or 4 (``dtype``; the integer dtypes add one
    float32 scale per row). Positions cost the smallest of uint16 indices, a bitmap and a Rice
    code per layer, or nothing when ``implicit_positions`` (one bool for all layers or one per
    layer: seeded masks, e.g. rlora or fedlodrop; the decoder then needs the masks);
    ``rice=False`` leaves the Rice mode out (the format of version 1). ``dense`` maps names to
    dense tensors sent as ``dense/<name>`` in the same (float) dtype. See the module docstring
    for the layout.
    """
    _wire_dtype(dtype)
    if isinstance(implicit_positions, bool):
        implicit = [implicit_positions] * len(layers) if isinstance(layers, Sequence) else []
    elif (isinstance(implicit_positions, Sequence) and not isinstance(implicit_positions, str)
          and all(isinstance(b, bool) for b in implicit_positions)):
        implicit = list(implicit_positions)
        if isinstance(layers, Sequence) and len(implicit) != len(layers):
            raise ValueError(f"implicit_positions has {len(implicit)} entries for "
                             f"{len(layers)} layers")
    else:
        raise TypeError(f"implicit_positions must be a bool or a sequence of bools, got "
                        f"{implicit_positions!r}")
    if not isinstance(rice, bool):
        raise TypeError(f"rice must be a bool, got {rice!r}")
    if isinstance(layers, Mapping) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of (spec, values, mask), got {type(layers)}")

    specs: list[Spec] = []
    vals_parts: list[np.ndarray] = []
    row_counts: list[np.ndarray] = []
    cnt_parts: list[np.ndarray] = []
    modes: list[int] = []
    idx_parts: list[np.ndarray] = []
    bmp_parts: list[np.ndarray] = []
    rice_parts: list[np.ndarray] = []
    for i, item in enumerate(layers):
        if not isinstance(item, tuple | list) or len(item) != 3:
            raise TypeError(f"layers[{i}] must be a (spec, values, mask) triple, got {item!r}")
        spec, values, mask = item
        if not isinstance(spec, LayerSpec | RowsSpec):
            raise TypeError(f"layers[{i}] spec must be a LayerSpec or RowsSpec, got {spec!r}")
        shape = (spec.r, spec.row_len)
        values = _to_numpy(values)
        mask = _to_numpy(mask)
        field = f"layers[{i}] ({spec.name!r})"
        _check_real(values, f"{field} values")
        if values.shape != shape:
            raise ValueError(f"{field} values shape {values.shape} != (r, d + k) = {shape}")
        if mask.dtype != np.bool_:
            raise TypeError(f"{field} mask must be bool, got dtype {mask.dtype}")
        if mask.shape != shape:
            raise ValueError(f"{field} mask shape {mask.shape} != (r, d + k) = {shape}")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            bad = values[~np.isfinite(values)].ravel()[0]
            raise ValueError(f"{field} values hold a non-finite value {bad!r}")
        counts = mask.sum(axis=1)
        kept = int(counts.sum())
        flat = np.flatnonzero(mask.reshape(-1))
        mode = MODE_IMPLICIT if implicit[i] else _choose_mode(spec, kept, flat, rice)
        if mode == MODE_INDEX:
            idx_parts.append(np.nonzero(mask)[1].astype(np.uint16))
        elif mode == MODE_BITMAP:
            bmp_parts.append(np.packbits(mask.reshape(-1)))
        elif mode == MODE_RICE:
            rice_parts.append(positions.rice_encode(flat, spec.size))
        specs.append(spec)
        vals_parts.append(values[mask].astype(np.float32, copy=False)
                          if dtype not in _FLOAT_WIRE else values[mask])
        row_counts.append(counts)
        if mode != MODE_RICE:
            cnt_parts.append(counts)
        modes.append(mode)

    cnt_dtype = _count_dtype(specs, modes)
    flat_vals = np.concatenate(vals_parts) if vals_parts else np.zeros(0, np.float32)
    all_counts = np.concatenate(row_counts) if row_counts else np.zeros(0, np.int64)
    try:
        codes, scales = quantize.quantize(flat_vals, all_counts, dtype)
    except ValueError as err:
        raise ValueError(f"layer values: {err}") from err
    payload: dict[str, np.ndarray] = {
        VALS: codes,
        CNT: np.concatenate(cnt_parts).astype(cnt_dtype) if cnt_parts else np.zeros(0, cnt_dtype),
        POS_MODE: np.asarray(modes, dtype=np.uint8),
    }
    if scales is not None:
        payload[SCALE] = scales
    if MODE_INDEX in modes and sum(p.size for p in idx_parts):
        payload[IDX] = np.concatenate(idx_parts)
    if MODE_BITMAP in modes:
        payload[BMP] = np.concatenate(bmp_parts)
    if MODE_RICE in modes:
        payload[RICE] = np.concatenate(rice_parts)
    for name, arr in (dense or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"dense names must be non-empty str, got {name!r}")
        if dtype not in _FLOAT_WIRE:
            raise ValueError(f"dense[{name!r}]: dense tensors go as float32 or float16; with "
                             f"dtype {dtype!r} send them as RowsSpec layers (quantised rows)")
        arr = _to_numpy(arr)
        _check_real(arr, f"dense[{name!r}]")
        payload[DENSE_PREFIX + name] = _cast_finite(arr, dtype, f"dense[{name!r}]")
    return payload


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Sum of the arrays' ``nbytes`` (Flower adds about 130 bytes of npy header + key per array)."""
    return int(sum(np.asarray(v).nbytes for v in payload.values()))


def _fail(field: str, message: str) -> CodecError:
    return CodecError(f"field {field!r}: {message}")


def _get_1d(payload: Mapping[str, np.ndarray], key: str, dtype: np.dtype) -> np.ndarray:
    """Fetch a 1-D payload array and check its dtype."""
    arr = payload[key]
    if arr.dtype != dtype:
        raise _fail(key, f"dtype {arr.dtype.str} ({arr.dtype}), expected {dtype}")
    if arr.ndim != 1:
        raise _fail(key, f"ndim {arr.ndim} (shape {arr.shape}), expected a 1-D array")
    return arr


def _get(payload: Mapping[str, np.ndarray], key: str, dtype: np.dtype, length: int) -> np.ndarray:
    """Fetch a 1-D payload array and check its dtype and length."""
    arr = _get_1d(payload, key, dtype)
    if arr.shape[0] != length:
        raise _fail(key, f"length {arr.shape[0]}, expected {length}")
    return arr


def _check_finite(arr: np.ndarray, key: str) -> None:
    finite = np.isfinite(arr)
    if not finite.all():
        pos = int(np.flatnonzero(~finite.ravel())[0])
        raise _fail(key, f"non-finite value {arr.ravel()[pos]!r} at flat position {pos}")


def _check_specs(specs: Sequence[Spec]) -> list[Spec]:
    if isinstance(specs, Mapping) or not isinstance(specs, Sequence):
        raise CodecError(f"specs must be a sequence of LayerSpec, got {type(specs)}")
    out = list(specs)
    for i, s in enumerate(out):
        if not isinstance(s, LayerSpec | RowsSpec):
            raise CodecError(f"specs[{i}] must be a LayerSpec or RowsSpec, got {s!r}")
    return out


def _check_dense_shapes(dense_shapes: Mapping[str, tuple[int, ...]] | None) -> dict:
    if dense_shapes is None:
        return {}
    if not isinstance(dense_shapes, Mapping):
        raise CodecError(f"dense_shapes must be a mapping, got {type(dense_shapes)}")
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in dense_shapes.items():
        if not isinstance(name, str) or not name:
            raise CodecError(f"dense_shapes names must be non-empty str, got {name!r}")
        try:
            shp = tuple(int(n) for n in shape)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"dense_shapes[{name!r}] must be a shape, got {shape!r}") from exc
        if any(n < 0 for n in shp):
            raise CodecError(f"dense_shapes[{name!r}] has a negative size: {shape!r}")
        out[name] = shp
    return out


def _check_keys(
    payload: Mapping[str, np.ndarray], dense_shapes: Mapping[str, tuple[int, ...]], dtype: str
) -> None:
    if not isinstance(payload, Mapping):
        raise CodecError(f"payload must be a mapping of str -> np.ndarray, got {type(payload)}")
    for key, arr in payload.items():
        if not isinstance(key, str):
            raise CodecError(f"payload key {key!r} is not a str")
        if not isinstance(arr, np.ndarray):
            raise _fail(key, f"value of type {type(arr).__name__} is not a numpy array")
        if arr.dtype.hasobject:
            raise _fail(key, f"object dtype {arr.dtype} is not allowed")
    required = {VALS, CNT, POS_MODE} | {DENSE_PREFIX + n for n in dense_shapes}
    if quantize.scaled(dtype):
        required.add(SCALE)
    unknown = sorted(set(payload) - required - {IDX, BMP, RICE})
    if unknown:
        raise _fail(unknown[0], f"unknown payload key (all unknown: {unknown})")
    missing = sorted(required - set(payload))
    if missing:
        raise _fail(missing[0], f"missing payload key (all missing: {missing})")


def _check_modes(payload: Mapping[str, np.ndarray], specs: list[Spec]) -> np.ndarray:
    modes = _get(payload, POS_MODE, np.dtype(np.uint8), len(specs))
    bad = np.flatnonzero(modes > MODE_RICE)
    if bad.size:
        i = int(bad[0])
        raise _fail(POS_MODE, f"value {int(modes[i])} for layer {i} not in {{0, 1, 2, 3, 4}}")
    for i, (s, m) in enumerate(zip(specs, modes, strict=True)):
        if m == MODE_INDEX and s.row_len > _MAX_INDEX_ROW:
            raise _fail(
                POS_MODE,
                f"index mode (0) for layer {i} ({s.name!r}) with d + k = {s.row_len} "
                f"> {_MAX_INDEX_ROW}",
            )
    for key, mode in ((BMP, MODE_BITMAP), (RICE, MODE_RICE)):  # idx: see _check_idx
        used = bool((modes == mode).any())
        if used and key not in payload:
            raise _fail(key, f"missing payload key although pos_mode uses mode {mode}")
        if not used and key in payload:
            raise _fail(key, f"unexpected payload key: no layer has pos_mode {mode}")
    return modes


def _check_masks(
    masks: Sequence[Any] | None,
    specs: list[Spec],
    modes: np.ndarray,
    cnt: dict[int, np.ndarray],
) -> dict[int, np.ndarray]:
    implicit = [i for i, m in enumerate(modes) if m == MODE_IMPLICIT]
    if not implicit:
        return {}
    if masks is None:
        raise _fail("masks", f"None, but layers {implicit} use implicit positions (pos_mode 2)")
    if isinstance(masks, Mapping) or not isinstance(masks, Sequence):
        raise _fail("masks", f"must be a sequence of bool arrays, got {type(masks)}")
    if len(masks) != len(specs):
        raise _fail("masks", f"length {len(masks)}, expected one per layer ({len(specs)})")
    out: dict[int, np.ndarray] = {}
    for i in implicit:
        s = specs[i]
        try:
            m = _to_numpy(masks[i])
        except Exception as exc:  # any conversion failure is a bad argument
            raise _fail(f"masks[{i}]", f"not convertible to an array: {exc}") from exc
        if m.dtype != np.bool_:
            raise _fail(f"masks[{i}]", f"dtype {m.dtype}, expected bool")
        if m.shape != (s.r, s.row_len):
            raise _fail(f"masks[{i}]", f"shape {m.shape}, expected {(s.r, s.row_len)}")
        got = m.sum(axis=1)
        want = cnt[i]
        if not np.array_equal(got, want):
            j = int(np.flatnonzero(got != want)[0])
            raise _fail(
                f"masks[{i}]", f"row {j} keeps {int(got[j])} entries but cnt says {int(want[j])}"
            )
        out[i] = m.copy()
    return out


def _check_idx(
    payload: Mapping[str, np.ndarray],
    specs: list[Spec],
    modes: np.ndarray,
    cnt: dict[int, np.ndarray],
) -> dict[int, np.ndarray]:
    """Validate ``idx``; return the mask of each index-mode layer."""
    layers = [i for i, m in enumerate(modes) if m == MODE_INDEX]
    total = sum(int(cnt[i].sum()) for i in layers)
    if total == 0:  # no index-mode entries: no idx array (an empty one would cost framing)
        if IDX in payload:
            raise _fail(IDX, "unexpected payload key: the index-mode layers keep no entry")
        return {i: np.zeros((specs[i].r, specs[i].row_len), dtype=bool) for i in layers}
    if IDX not in payload:
        raise _fail(IDX, "missing payload key although pos_mode uses mode 0")
    seg_counts = [cnt[i] for i in layers]
    row_counts = np.concatenate(seg_counts)  # per row of the index-mode layers, stacked
    row_lens = np.concatenate([np.full(specs[i].r, specs[i].row_len) for i in layers])
    idx = _get(payload, IDX, np.dtype(np.uint16), int(row_counts.sum())).astype(np.int64)
    lens = np.repeat(row_lens, row_counts)
    over = np.flatnonzero(idx >= lens)
    if over.size:
        p = int(over[0])
        raise _fail(
            IDX, f"index {int(idx[p])} at position {p} out of range for row length {int(lens[p])}"
        )
    row_of = np.repeat(np.arange(row_counts.size), row_counts)
    bad = np.flatnonzero((row_of[1:] == row_of[:-1]) & (np.diff(idx) <= 0))
    if bad.size:
        p = int(bad[0]) + 1
        raise _fail(
            IDX,
            f"indices not strictly increasing within a row: {int(idx[p - 1])} then "
            f"{int(idx[p])} at position {p}",
        )
    out: dict[int, np.ndarray] = {}
    off = 0
    for i, c in zip(layers, seg_counts, strict=True):
        s = specs[i]
        n = int(c.sum())
        mask = np.zeros((s.r, s.row_len), dtype=bool)
        mask[np.repeat(np.arange(s.r), c), idx[off:off + n]] = True
        out[i] = mask
        off += n
    return out


def _check_bmp(
    payload: Mapping[str, np.ndarray],
    specs: list[Spec],
    modes: np.ndarray,
    cnt: dict[int, np.ndarray],
) -> dict[int, np.ndarray]:
    """Validate ``bmp``; return the mask of each bitmap-mode layer."""
    layers = [i for i, m in enumerate(modes) if m == MODE_BITMAP]
    if not layers:
        return {}
    sizes = [_bitmap_bytes(specs[i]) for i in layers]
    bmp = _get(payload, BMP, np.dtype(np.uint8), sum(sizes))
    out: dict[int, np.ndarray] = {}
    off = 0
    for i, nb in zip(layers, sizes, strict=True):
        s = specs[i]
        bits = np.unpackbits(bmp[off : off + nb])
        if bits[s.size :].any():
            raise _fail(
                BMP, f"non-zero padding bits {bits[s.size :].tolist()} after layer {i} ({s.name!r})"
            )
        m = bits[: s.size].reshape(s.r, s.row_len).astype(bool)
        got = m.sum(axis=1)
        want = cnt[i]
        if not np.array_equal(got, want):
            j = int(np.flatnonzero(got != want)[0])
            raise _fail(
                BMP,
                f"layer {i} ({s.name!r}) row {j} has popcount {int(got[j])} but cnt says "
                f"{int(want[j])}",
            )
        out[i] = m
        off += nb
    return out


def _check_rice(
    payload: Mapping[str, np.ndarray],
    specs: list[Spec],
    modes: np.ndarray,
) -> dict[int, np.ndarray]:
    """Validate ``rice``; return the mask of each Rice-mode layer."""
    layers = [i for i, m in enumerate(modes) if m == MODE_RICE]
    if not layers:
        return {}
    data = _get_1d(payload, RICE, np.dtype(np.uint8))
    # the encoder picks Rice only when it beats the bitmap plus the row counts it saves, so an
    # honest array is shorter than this; a longer one is refused before it is unpacked (the
    # reader holds about 70 bytes per input byte)
    limit = sum(_bitmap_bytes(specs[i]) + 2 * specs[i].r + 8 for i in layers)
    if data.size > limit:
        raise _fail(RICE, f"length {data.size} bytes > {limit}, the most an honest encoder "
                          f"sends for these layers")
    reader = positions.RiceReader(data)
    out: dict[int, np.ndarray] = {}
    for i in layers:
        s = specs[i]
        try:
            flat = reader.read(s.size, f"layer {i} ({s.name!r})")
        except positions.PositionError as err:
            raise _fail(RICE, str(err)) from err
        mask = np.zeros(s.size, dtype=bool)
        mask[flat] = True
        out[i] = mask.reshape(s.r, s.row_len)
    try:
        reader.finish("rice")
    except positions.PositionError as err:
        raise _fail(RICE, str(err)) from err
    return out


def _split_counts(payload: Mapping[str, np.ndarray], specs: list[Spec], modes: np.ndarray
                  ) -> dict[int, np.ndarray]:
    """``cnt`` per layer: the row counts of the mode 0-3 layers."""
    slots = [_count_slots(s, int(m)) for s, m in zip(specs, modes, strict=True)]
    cnt = _get(payload, CNT, _count_dtype(specs, [int(m) for m in modes]),
               sum(slots)).astype(np.int64)
    rows: dict[int, np.ndarray] = {}
    off = 0
    for i, (s, m, n) in enumerate(zip(specs, modes, slots, strict=True)):
        if m == MODE_RICE:
            continue
        seg = cnt[off:off + n]
        off += n
        if (seg > s.row_len).any():
            j = int(np.flatnonzero(seg > s.row_len)[0])
            raise _fail(CNT, f"count {int(seg[j])} at row {j} of layer {i} ({s.name!r}) exceeds "
                             f"row length d + k = {s.row_len}")
        rows[i] = seg
        if m == MODE_FULL and np.any(seg != s.row_len):
            j = int(np.flatnonzero(seg != s.row_len)[0])
            raise _fail(CNT, f"layer {i} ({s.name!r}) is in full mode (3) but row {j} keeps "
                             f"{int(seg[j])} of {s.row_len} entries")
    return rows


def decode(
    payload: Mapping[str, np.ndarray],
    specs: Sequence[Spec],
    dense_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    dtype: str = "float32",
    masks: Sequence[np.ndarray] | None = None,
    max_bytes: int | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """Validate and unpack a payload from :func:`encode` against the expected layer specs.

    Returns ``[(values, mask)]`` per spec (float32 ``(r, row_len)`` rank rows ``[b_j ; a_j]``,
    zero off the mask, and the bool mask) and ``{name: float32 array}`` for the dense tensors
    named in ``dense_shapes``. ``masks`` (one per spec) supply the seeded positions of
    implicit-mode layers and are ignored for the others. ``max_bytes`` bounds
    :func:`payload_nbytes` (e.g. the eq. (6) budget of arXiv 2505.00333 plus overhead).
    Every inconsistency raises :class:`CodecError` naming the field and the value; nothing is
    returned unless the whole payload is valid.
    """
    wire = _wire_dtype(dtype, CodecError)
    specs = _check_specs(specs)
    shapes = _check_dense_shapes(dense_shapes)
    _check_keys(payload, shapes, wire)
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int | np.integer):
            raise CodecError(f"max_bytes must be an int, got {max_bytes!r}")
        if max_bytes < 0:
            raise CodecError(f"max_bytes must be >= 0, got {max_bytes!r}")
        total = payload_nbytes(payload)
        if total > max_bytes:
            raise _fail("payload", f"oversized: {total} bytes > max_bytes {max_bytes}")

    modes = _check_modes(payload, specs)
    rows = _split_counts(payload, specs, modes)
    vals = _get_1d(payload, VALS, quantize.wire_array_dtype(wire))
    masks_out: dict[int, np.ndarray] = {}
    for i in np.flatnonzero(modes == MODE_FULL):
        masks_out[int(i)] = np.ones((specs[i].r, specs[i].row_len), dtype=bool)
    masks_out.update(_check_masks(masks, specs, modes, rows))
    masks_out.update(_check_idx(payload, specs, modes, rows))
    masks_out.update(_check_bmp(payload, specs, modes, rows))
    masks_out.update(_check_rice(payload, specs, modes))
    row_counts = np.concatenate([masks_out[i].sum(axis=1) for i in range(len(specs))]) \
        if specs else np.zeros(0, np.int64)
    scales = None
    if quantize.scaled(wire):
        scales = _get(payload, SCALE, np.dtype(np.float32), int(row_counts.size))
    elif wire == "float32" or wire == "float16":
        if vals.shape[0] != int(row_counts.sum()):
            raise _fail(VALS, f"length {vals.shape[0]} != sum of field 'cnt' = "
                              f"{int(row_counts.sum())}")
        _check_finite(vals, VALS)
    try:
        flat = quantize.dequantize(vals, scales, row_counts, wire, VALS)
    except quantize.QuantError as err:
        raise CodecError(str(err)) from err

    dense: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        key = DENSE_PREFIX + name
        arr = payload[key]
        if wire not in _FLOAT_WIRE:
            raise _fail(key, f"dense tensors are not sent with dtype {wire!r}")
        if arr.dtype != quantize.wire_array_dtype(wire):
            raise _fail(key, f"dtype {arr.dtype.str} ({arr.dtype}), expected "
                             f"{quantize.wire_array_dtype(wire)}")
        if arr.shape != shape:
            raise _fail(key, f"shape {arr.shape}, expected {shape}")
        _check_finite(arr, key)
        dense[name] = arr.astype(np.float32)

    # everything is valid: build the outputs
    layers_out: list[tuple[np.ndarray, np.ndarray]] = []
    val_off = 0
    for i, s in enumerate(specs):
        mask = masks_out[i]
        n = int(mask.sum())
        values = np.zeros((s.r, s.row_len), dtype=np.float32)
        values[mask] = flat[val_off:val_off + n]
        val_off += n
        layers_out.append((values, mask))
    return layers_out, dense
