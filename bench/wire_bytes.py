"""Bytes per client-round of fedsoft.compression.codec payloads as Flower counts them, vs dense,
COO and floor.

Run: ``.venv/bin/python bench/wire_bytes.py``. Every number is measured in this run:

* dense fp32 = ``ArrayRecord`` of the dense LoRA factors (``lora_A``, ``lora_B`` per layer);
* ours = ``ArrayRecord`` of ``fedsoft.compression.codec.encode`` (float32 values, explicit
  positions);
* target = (1 - sparsity) x dense fp32, i.e. the value-only payload of eq. (6), arXiv 2505.00333;
* floor = 32 bits per kept value + sum over rank rows of log2 C(d + k, kept_row) position bits
  (the per-row counts are fixed by the per-row top-k, so this is the tight entropy bound);
* COO = ``ArrayRecord`` of one flat float32 value array + one flat int32 index array.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`

from fedsoft.compression.codec import MODE_BITMAP, LayerSpec, decode, encode

SHAPES = {
    # name: (layer names, r, d, k)
    "ViT-Base (4 blocks x q,v; r=16)": (
        [f"blocks.{b}.attn.{p}" for b in range(4) for p in ("query", "value")],
        16,
        768,
        768,
    ),
    "MiniLM (6 layers x query,value; r=8)": (
        [f"encoder.layer.{b}.attention.self.{p}" for b in range(6) for p in ("query", "value")],
        8,
        384,
        384,
    ),
}
SPARSITIES = (0.5, 0.7, 0.9)
TIMING_REPEATS = 30


def record_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes Flower counts for these arrays (npy serialisation + key lengths)."""
    return ArrayRecord({key: Array(arr) for key, arr in arrays.items()}).count_bytes()


def topk_rows(rng: np.random.Generator, r: int, n: int, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Random rank rows and the mask of the ``keep`` largest magnitudes in each row."""
    values = rng.standard_normal((r, n)).astype(np.float32)
    mask = np.zeros((r, n), dtype=bool)
    if keep > 0:
        top = np.argpartition(-np.abs(values), keep - 1, axis=1)[:, :keep]
        np.put_along_axis(mask, top, True, axis=1)
    return values * mask, mask


def log2_binom(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def median_ms(fn, repeats: int = TIMING_REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def run_shape(title: str, names: list[str], r: int, d: int, k: int, timing: bool) -> None:
    rng = np.random.default_rng(0)
    specs = [LayerSpec(name, r, d, k) for name in names]
    dense = {}
    for s in specs:
        dense[f"{s.name}.lora_A"] = rng.standard_normal((r, k)).astype(np.float32)
        dense[f"{s.name}.lora_B"] = rng.standard_normal((d, r)).astype(np.float32)
    dense_bytes = record_bytes(dense)
    print(f"\n{title}: {len(specs)} layers, r(d+k) = {r * (d + k)} per layer")
    head = (
        f"{'sparsity':>8} {'dense fp32':>11} {'ours':>9} {'ours/target':>11} {'floor':>9} "
        f"{'ours/floor':>10} {'COO/ours':>8} {'modes':>7}"
    )
    if timing:
        head += f" {'enc ms':>7} {'dec ms':>7}"
    print(head)
    for sparsity in SPARSITIES:
        keep = int(round((1.0 - sparsity) * (d + k)))
        layers = [(s, *topk_rows(rng, r, d + k, keep)) for s in specs]
        payload = encode(layers)
        out, _ = decode(payload, specs)
        for (_, v, m), (v2, m2) in zip(layers, out, strict=True):
            assert np.array_equal(v, v2) and np.array_equal(m, m2), "round trip failed"
        ours = record_bytes(payload)
        target = (1.0 - sparsity) * dense_bytes
        kept_total = sum(int(m.sum()) for _, _, m in layers)
        floor_bits = 32 * kept_total + sum(
            log2_binom(d + k, int(c)) for _, _, m in layers for c in m.sum(axis=1)
        )
        floor = floor_bits / 8
        flat_pos = np.concatenate(
            [np.flatnonzero(m) + i * r * (d + k) for i, (_, _, m) in enumerate(layers)]
        )
        coo = record_bytes(
            {
                "vals": np.concatenate([v[m] for _, v, m in layers]).astype(np.float32),
                "idx": flat_pos.astype(np.int32),
            }
        )
        n_bmp = int((payload["pos_mode"] == MODE_BITMAP).sum())
        line = (
            f"{sparsity:>8.1f} {dense_bytes:>11d} {ours:>9d} {ours / target:>11.3f} "
            f"{floor:>9.0f} {ours / floor:>10.3f} {coo / ours:>8.3f} "
            f"{f'{n_bmp}b/{len(specs) - n_bmp}i':>7}"
        )
        if timing:
            enc = median_ms(lambda layers=layers: encode(layers))
            dec = median_ms(lambda payload=payload: decode(payload, specs))
            line += f" {enc:>7.2f} {dec:>7.2f}"
        print(line)


def main() -> None:
    print("bytes per client-round as counted by flwr ArrayRecord.count_bytes()")
    print("target = (1 - sparsity) x dense fp32; modes = layers in bitmap (b) / index (i) mode")
    for i, (title, (names, r, d, k)) in enumerate(SHAPES.items()):
        run_shape(title, names, r, d, k, timing=(i == 0))
    print(f"\ntimings: median of {TIMING_REPEATS} runs, encode/decode of one ViT client payload")


if __name__ == "__main__":
    main()
