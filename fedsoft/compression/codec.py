"""Compact wire format for sparse LoRA rank-row updates as a few flat numpy arrays.

Flower serialises every numpy array densely (``np.save``), so zeros are not free: this module
packs the kept entries of all sparse LoRA layers of one client into a handful of flat arrays.

Each LoRA layer with spec ``(r, d, k)`` is given as a "rank rows" matrix ``values`` of shape
``(r, d + k)`` whose row ``j`` is ``[b_j ; a_j]`` (column ``j`` of ``B`` then row ``j`` of ``A``)
and a bool ``mask`` of the same shape (the kept entries). Eq. (6) of arXiv 2505.00333 charges
``(1 - rho) r (d + k) q`` bits for the values only; the position overhead it leaves out
(PROPOSED-L: about ``log2(r (d + k))`` bits per kept entry) is what the position modes below
minimise.

Layout (all arrays 1-D except the dense tensors; L layers, R = sum of ranks):

========== ================== ============================================================
key        dtype              content
========== ================== ============================================================
vals       float32 / float16  all kept values, layer by layer, row by row, ascending
                              position within a row (``values[mask]`` in row-major order)
cnt        uint16 (uint32)    kept count per (layer, rank row), length R; uint32 as soon as
                              one layer has ``d + k > 65535``
pos_mode   uint8              one per layer: 0 = uint16 within-row indices, 1 = bitmap,
                              2 = implicit (both sides regenerate the mask from a seed),
                              3 = full (every entry kept, e.g. rho = 0: no positions)
idx        uint16             within-row positions of the index-mode layers, concatenated;
                              present iff some layer has ``pos_mode == 0``
bmp        uint8              ``np.packbits`` of each bitmap-mode layer's flattened mask, each
                              layer padded with zero bits to a whole byte; present iff some
                              layer has ``pos_mode == 1``
dense/<n>  float32 / float16  small dense tensor ``<n>`` (e.g. the classifier head), own shape
========== ================== ============================================================

Position mode per layer (unless ``implicit_positions``): ``full`` when every entry is kept,
else the smaller of ``2 * kept`` bytes of
indices and ``ceil(r (d + k) / 8)`` bytes of bitmap (ties go to the bitmap); index mode needs
``d + k <= 65536``. There is no ``meta``/version array on the wire: each Flower array costs
about 130 bytes of npy header + key, which would push the MiniLM shape at 90% sparsity below
1.5x smaller than COO (see ``bench/wire_bytes.py``). ``FORMAT_VERSION`` is meant for
out-of-band checks (e.g. a Flower ConfigRecord entry); a layout change must also change keys.

``decode`` validates every field against the caller's layer specs before it builds anything,
and raises ``CodecError`` naming the field and the offending value on any inconsistency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedsoft.layout import LayerSpec

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
    "POS_MODE",
    "VALS",
    "CodecError",
    "LayerSpec",
    "decode",
    "encode",
    "payload_nbytes",
]

FORMAT_VERSION = 1
VALS = "vals"
CNT = "cnt"
POS_MODE = "pos_mode"
IDX = "idx"
BMP = "bmp"
DENSE_PREFIX = "dense/"
MODE_INDEX = 0
MODE_BITMAP = 1
MODE_IMPLICIT = 2
MODE_FULL = 3
_MAX_INDEX_ROW = 1 << 16  # uint16 within-row positions address rows of at most 65536 entries
_MAX_U16_COUNT = (1 << 16) - 1
_WIRE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


class CodecError(ValueError):
    """A payload (or decode argument) is malformed; the message names the field and value."""


def _wire_dtype(dtype: str, error: type[ValueError] = ValueError) -> np.dtype:
    if not isinstance(dtype, str) or dtype not in _WIRE_DTYPES:
        raise error(f"dtype must be one of {sorted(_WIRE_DTYPES)}, got {dtype!r}")
    return _WIRE_DTYPES[dtype]


def _count_dtype(specs: Sequence[LayerSpec]) -> np.dtype:
    if all(s.row_len <= _MAX_U16_COUNT for s in specs):
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _bitmap_bytes(spec: LayerSpec) -> int:
    return -(-spec.size // 8)


def _choose_mode(spec: LayerSpec, kept: int) -> int:
    """Cheaper explicit position mode: none when all is kept (``full``), else ``2 * kept``
    index bytes vs ``ceil(r (d+k) / 8)`` bitmap bytes."""
    if kept == spec.r * spec.row_len:
        return MODE_FULL
    if spec.row_len <= _MAX_INDEX_ROW and 2 * kept < _bitmap_bytes(spec):
        return MODE_INDEX
    return MODE_BITMAP


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


def _cast_finite(arr: np.ndarray, wire: np.dtype, field: str) -> np.ndarray:
    """Cast to the wire dtype; reject NaN/Inf before and after (float16 overflow -> Inf)."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = arr[~np.isfinite(arr)].ravel()[0]
        raise ValueError(f"{field} holds a non-finite value {bad!r}")
    with np.errstate(over="ignore"):  # overflow is reported below as a ValueError
        out = np.ascontiguousarray(arr, dtype=wire)
    if not np.isfinite(out).all():
        bad = arr[~np.isfinite(out)].ravel()[0]
        raise ValueError(f"{field} value {bad!r} overflows wire dtype {wire}")
    return out


def encode(
    layers: Sequence[tuple[LayerSpec, Any, Any]],
    dense: Mapping[str, Any] | None = None,
    *,
    dtype: str = "float32",
    implicit_positions: bool = False,
) -> dict[str, np.ndarray]:
    """Pack sparse rank-row updates (and small dense tensors) into flat wire arrays.

    ``layers`` holds ``(spec, values, mask)`` per LoRA layer with ``values`` of shape
    ``(r, d + k)`` (rank rows ``[b_j ; a_j]``) and bool ``mask`` of the same shape; numpy arrays
    or torch tensors. Only ``values[mask]`` is sent (the decoder returns zeros elsewhere), so the
    value part costs ``sum(mask) * q`` bits as in eq. (6) of arXiv 2505.00333, with ``q`` = 32
    (``"float32"``) or 16 (``"float16"``). Positions cost the smaller of uint16 indices and a
    bitmap per layer, or nothing when ``implicit_positions`` (seeded masks, e.g. rlora or
    fedlodrop; the decoder then needs the masks). ``dense`` maps names to dense tensors sent as
    ``dense/<name>`` in the same dtype. See the module docstring for the layout.
    """
    wire = _wire_dtype(dtype)
    if not isinstance(implicit_positions, bool):
        raise TypeError(f"implicit_positions must be a bool, got {implicit_positions!r}")
    if isinstance(layers, Mapping) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of (spec, values, mask), got {type(layers)}")

    specs: list[LayerSpec] = []
    vals_parts: list[np.ndarray] = []
    cnt_parts: list[np.ndarray] = []
    modes: list[int] = []
    idx_parts: list[np.ndarray] = []
    bmp_parts: list[np.ndarray] = []
    for i, item in enumerate(layers):
        if not isinstance(item, tuple | list) or len(item) != 3:
            raise TypeError(f"layers[{i}] must be a (spec, values, mask) triple, got {item!r}")
        spec, values, mask = item
        if not isinstance(spec, LayerSpec):
            raise TypeError(f"layers[{i}] spec must be a LayerSpec, got {spec!r}")
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
        kept = _cast_finite(values[mask], wire, f"{field} values")
        counts = mask.sum(axis=1)
        mode = MODE_IMPLICIT if implicit_positions else _choose_mode(spec, int(counts.sum()))
        if mode == MODE_INDEX:
            idx_parts.append(np.nonzero(mask)[1].astype(np.uint16))
        elif mode == MODE_BITMAP:
            bmp_parts.append(np.packbits(mask.reshape(-1)))
        specs.append(spec)
        vals_parts.append(kept)
        cnt_parts.append(counts)
        modes.append(mode)

    cnt_dtype = _count_dtype(specs)
    payload: dict[str, np.ndarray] = {
        VALS: np.concatenate(vals_parts) if vals_parts else np.zeros(0, wire),
        CNT: np.concatenate(cnt_parts).astype(cnt_dtype) if cnt_parts else np.zeros(0, cnt_dtype),
        POS_MODE: np.asarray(modes, dtype=np.uint8),
    }
    if MODE_INDEX in modes:
        payload[IDX] = np.concatenate(idx_parts)
    if MODE_BITMAP in modes:
        payload[BMP] = np.concatenate(bmp_parts)
    for name, arr in (dense or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"dense names must be non-empty str, got {name!r}")
        arr = _to_numpy(arr)
        _check_real(arr, f"dense[{name!r}]")
        payload[DENSE_PREFIX + name] = _cast_finite(arr, wire, f"dense[{name!r}]")
    return payload


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Sum of the arrays' ``nbytes`` (Flower adds about 130 bytes of npy header + key per array)."""
    return int(sum(np.asarray(v).nbytes for v in payload.values()))


def _fail(field: str, message: str) -> CodecError:
    return CodecError(f"field {field!r}: {message}")


def _get(payload: Mapping[str, np.ndarray], key: str, dtype: np.dtype, length: int) -> np.ndarray:
    """Fetch a 1-D payload array and check its dtype and length."""
    arr = payload[key]
    if arr.dtype != dtype:
        raise _fail(key, f"dtype {arr.dtype.str} ({arr.dtype}), expected {dtype}")
    if arr.ndim != 1:
        raise _fail(key, f"ndim {arr.ndim} (shape {arr.shape}), expected a 1-D array")
    if arr.shape[0] != length:
        raise _fail(key, f"length {arr.shape[0]}, expected {length}")
    return arr


def _check_finite(arr: np.ndarray, key: str) -> None:
    finite = np.isfinite(arr)
    if not finite.all():
        pos = int(np.flatnonzero(~finite.ravel())[0])
        raise _fail(key, f"non-finite value {arr.ravel()[pos]!r} at flat position {pos}")


def _check_specs(specs: Sequence[LayerSpec]) -> list[LayerSpec]:
    if isinstance(specs, Mapping) or not isinstance(specs, Sequence):
        raise CodecError(f"specs must be a sequence of LayerSpec, got {type(specs)}")
    out = list(specs)
    for i, s in enumerate(out):
        if not isinstance(s, LayerSpec):
            raise CodecError(f"specs[{i}] must be a LayerSpec, got {s!r}")
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
    payload: Mapping[str, np.ndarray], dense_shapes: Mapping[str, tuple[int, ...]]
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
    unknown = sorted(set(payload) - required - {IDX, BMP})
    if unknown:
        raise _fail(unknown[0], f"unknown payload key (all unknown: {unknown})")
    missing = sorted(required - set(payload))
    if missing:
        raise _fail(missing[0], f"missing payload key (all missing: {missing})")


def _check_modes(payload: Mapping[str, np.ndarray], specs: list[LayerSpec]) -> np.ndarray:
    modes = _get(payload, POS_MODE, np.dtype(np.uint8), len(specs))
    bad = np.flatnonzero(modes > MODE_FULL)
    if bad.size:
        i = int(bad[0])
        raise _fail(POS_MODE, f"value {int(modes[i])} for layer {i} not in {{0, 1, 2, 3}}")
    for i, (s, m) in enumerate(zip(specs, modes, strict=True)):
        if m == MODE_INDEX and s.row_len > _MAX_INDEX_ROW:
            raise _fail(
                POS_MODE,
                f"index mode (0) for layer {i} ({s.name!r}) with d + k = {s.row_len} "
                f"> {_MAX_INDEX_ROW}",
            )
    for key, mode in ((IDX, MODE_INDEX), (BMP, MODE_BITMAP)):
        used = bool((modes == mode).any())
        if used and key not in payload:
            raise _fail(key, f"missing payload key although pos_mode uses mode {mode}")
        if not used and key in payload:
            raise _fail(key, f"unexpected payload key: no layer has pos_mode {mode}")
    return modes


def _check_masks(
    masks: Sequence[Any] | None,
    specs: list[LayerSpec],
    modes: np.ndarray,
    cnt: np.ndarray,
    row_off: np.ndarray,
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
        want = cnt[row_off[i] : row_off[i + 1]]
        if not np.array_equal(got, want):
            j = int(np.flatnonzero(got != want)[0])
            raise _fail(
                f"masks[{i}]", f"row {j} keeps {int(got[j])} entries but cnt says {int(want[j])}"
            )
        out[i] = m.copy()
    return out


def _check_idx(
    payload: Mapping[str, np.ndarray],
    specs: list[LayerSpec],
    modes: np.ndarray,
    cnt: np.ndarray,
    row_off: np.ndarray,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Validate ``idx``; return per index-mode layer (row ids, within-row positions)."""
    layers = [i for i, m in enumerate(modes) if m == MODE_INDEX]
    if not layers:
        return {}
    seg_counts = [cnt[row_off[i] : row_off[i + 1]] for i in layers]
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
    rows = np.concatenate(
        [np.repeat(np.arange(specs[i].r), c) for i, c in zip(layers, seg_counts, strict=True)]
    )
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    off = 0
    for i, c in zip(layers, seg_counts, strict=True):
        n = int(c.sum())
        out[i] = (rows[off : off + n], idx[off : off + n])
        off += n
    return out


def _check_bmp(
    payload: Mapping[str, np.ndarray],
    specs: list[LayerSpec],
    modes: np.ndarray,
    cnt: np.ndarray,
    row_off: np.ndarray,
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
        want = cnt[row_off[i] : row_off[i + 1]]
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


def decode(
    payload: Mapping[str, np.ndarray],
    specs: Sequence[LayerSpec],
    dense_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    dtype: str = "float32",
    masks: Sequence[np.ndarray] | None = None,
    max_bytes: int | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """Validate and unpack a payload from :func:`encode` against the expected layer specs.

    Returns ``[(values, mask)]`` per spec (float32 ``(r, d + k)`` rank rows ``[b_j ; a_j]``,
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
    _check_keys(payload, shapes)
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int | np.integer):
            raise CodecError(f"max_bytes must be an int, got {max_bytes!r}")
        if max_bytes < 0:
            raise CodecError(f"max_bytes must be >= 0, got {max_bytes!r}")
        total = payload_nbytes(payload)
        if total > max_bytes:
            raise _fail("payload", f"oversized: {total} bytes > max_bytes {max_bytes}")

    modes = _check_modes(payload, specs)
    ranks = np.array([s.r for s in specs], dtype=np.int64)
    row_off = np.concatenate([[0], np.cumsum(ranks)])
    n_rows = int(row_off[-1])
    cnt = _get(payload, CNT, _count_dtype(specs), n_rows).astype(np.int64)
    row_lens = np.repeat(np.array([s.row_len for s in specs], dtype=np.int64), ranks)
    over = np.flatnonzero(cnt > row_lens)
    if over.size:
        j = int(over[0])
        raise _fail(
            CNT, f"count {int(cnt[j])} at row {j} exceeds row length d + k = {int(row_lens[j])}"
        )
    vals = payload[VALS]
    if vals.dtype != wire:
        raise _fail(VALS, f"dtype {vals.dtype.str} ({vals.dtype}), expected {wire}")
    if vals.ndim != 1:
        raise _fail(VALS, f"ndim {vals.ndim} (shape {vals.shape}), expected a 1-D array")
    if vals.shape[0] != int(cnt.sum()):
        raise _fail(VALS, f"length {vals.shape[0]} != sum of field 'cnt' = {int(cnt.sum())}")
    _check_finite(vals, VALS)

    for i in np.flatnonzero(modes == MODE_FULL):
        seg = cnt[row_off[i] : row_off[i + 1]]
        if np.any(seg != specs[i].row_len):
            j = int(np.flatnonzero(seg != specs[i].row_len)[0])
            raise _fail(CNT, f"layer {int(i)} ({specs[i].name!r}) is in full mode (3) but row "
                             f"{j} keeps {int(seg[j])} of {specs[i].row_len} entries")
    implicit = _check_masks(masks, specs, modes, cnt, row_off)
    indexed = _check_idx(payload, specs, modes, cnt, row_off)
    bitmaps = _check_bmp(payload, specs, modes, cnt, row_off)

    dense: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        key = DENSE_PREFIX + name
        arr = payload[key]
        if arr.dtype != wire:
            raise _fail(key, f"dtype {arr.dtype.str} ({arr.dtype}), expected {wire}")
        if arr.shape != shape:
            raise _fail(key, f"shape {arr.shape}, expected {shape}")
        _check_finite(arr, key)
        dense[name] = arr.astype(np.float32)

    # everything is valid: build the outputs
    layers_out: list[tuple[np.ndarray, np.ndarray]] = []
    val_off = np.concatenate([[0], np.cumsum(cnt)])
    for i, s in enumerate(specs):
        if i in indexed:
            mask = np.zeros((s.r, s.row_len), dtype=bool)
            rows, cols = indexed[i]
            mask[rows, cols] = True
        elif modes[i] == MODE_FULL:
            mask = np.ones((s.r, s.row_len), dtype=bool)
        else:
            mask = bitmaps[i] if i in bitmaps else implicit[i]
        values = np.zeros((s.r, s.row_len), dtype=np.float32)
        lo, hi = int(val_off[row_off[i]]), int(val_off[row_off[i + 1]])
        values[mask] = vals[lo:hi]
        layers_out.append((values, mask))
    return layers_out, dense
