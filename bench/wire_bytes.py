"""Bytes of fedsoft's wire payloads as Flower counts them, against the floor and the ideal.

Run: ``.venv/bin/python bench/wire_bytes.py [--quick]``. Every number is measured in this run,
per model shape, per rho and per value dtype (``wire-dtype``):

* LoRA / (values + floor): the codec payload of the LoRA layers alone (SOFT's real per-rank
  selection on random rank rows; the arrays' bytes, ``codec.payload_nbytes``) over
  ``kept x q / 8`` value bytes plus ``sum over layers log2 C(r (d + k), kept)`` position bits:
  the information floor of positions (PROPOSED-L of EQUATIONS.md, the overhead eq. (6) of
  arXiv 2505.00333 leaves out). Target: <= 1.05 at every rho in [0.1, 0.99] (float32 values;
  int8 / int4 add one float32 scale per rank row). ``+framing``: the same with Flower's
  per-array framing (``ArrayRecord.count_bytes``, about 130 bytes per array, whatever the
  coding).
* LoRA / values-only: the payload over ``kept x q / 8`` (eq. (6)'s payload itself).
* uplink / dense: one client's whole upload (LoRA + head at ``head-sparsity`` = rho) over the
  dense fp32 LoRA + head record (``dense_uplink_bytes`` per client).
* downlink / full: one synchronised client's broadcast change at ``downlink-sparsity`` = rho
  (:class:`fedsoft.compression.downlink.Broadcast`) over the full-model record.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`

from fedsoft.compression import codec, positions, quantize  # noqa: E402
from fedsoft.compression.downlink import Broadcast  # noqa: E402
from fedsoft.compression.error_feedback import ErrorFeedback  # noqa: E402
from fedsoft.compression.sparsifiers import SPARSIFIERS, keep_count  # noqa: E402
from fedsoft.compression.update import SparseSettings, encode_update  # noqa: E402
from fedsoft.layout import LayerSpec  # noqa: E402

SHAPES = {  # name: (LoRA layers, r, d, k, classes, hidden)
    "one layer r=8, d=k=768 (the issue's table)": (1, 8, 768, 768, 10, 768),
    "MiniLM-L6 (12 x q,v; r=8) / 10 classes": (12, 8, 384, 384, 10, 384),
    "ViT-B/16 (4 blocks x q,v; r=16) / CIFAR-100": (8, 16, 768, 768, 100, 768),
    "DistilBERT (6 x q,v; r=8) / AG News": (12, 8, 768, 768, 4, 768),
}
RHOS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99)
DTYPES = quantize.WIRE_DTYPES


def record_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes Flower counts for these arrays (npy serialisation + key lengths)."""
    return int(ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
               .count_bytes())


def model_arrays(rng: np.random.Generator, layers: int, r: int, d: int, k: int, classes: int,
                 hidden: int, scale: float = 0.02) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i in range(layers):
        out[f"l{i}.lora_A"] = (scale * rng.standard_normal((r, k))).astype(np.float32)
        out[f"l{i}.lora_B"] = (scale * rng.standard_normal((d, r))).astype(np.float32)
    out["head.weight"] = (scale * rng.standard_normal((classes, hidden))).astype(np.float32)
    out["head.bias"] = (scale * rng.standard_normal(classes)).astype(np.float32)
    return out


def drift(arrays: dict[str, np.ndarray], rng: np.random.Generator, size: float = 0.01
          ) -> dict[str, np.ndarray]:
    return {key: (v + size * rng.standard_normal(v.shape)).astype(np.float32)
            for key, v in arrays.items()}


def lora_ratio(layers: int, r: int, d: int, k: int, rho: float, dtype: str,
               rng: np.random.Generator) -> tuple[float, float, float]:
    """LoRA payload / (values + floor), the same with Flower's framing, and payload /
    values-only, for SOFT's selection."""
    spec = LayerSpec("l", r, d, k)
    soft = SPARSIFIERS["soft"]
    parts = []
    keep = keep_count(r, d, k, rho)
    for i in range(layers):
        rows = torch.from_numpy(rng.standard_normal((r, d + k)).astype(np.float32)
                                * rng.gamma(1.0, 1.0, size=(r, 1)).astype(np.float32))
        sel = soft(rows, d, keep)
        parts.append((LayerSpec(f"l{i}", r, d, k), sel.values, sel.mask))
    encoded = codec.encode(parts, dtype=dtype)
    raw, framed = codec.payload_nbytes(encoded), record_bytes(encoded)
    values = quantize.values_nbytes(layers * keep, dtype)
    floor = layers * positions.floor_bits(spec.size, keep) / 8
    return raw / (values + floor), framed / (values + floor), raw / values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape, three rhos")
    args = ap.parse_args()
    shapes = dict(list(SHAPES.items())[1:2]) if args.quick else SHAPES
    rhos = (0.1, 0.9, 0.99) if args.quick else RHOS
    worst = 0.0
    for title, (layers, r, d, k, classes, hidden) in shapes.items():
        rng = np.random.default_rng(0)
        glob = model_arrays(rng, layers, r, d, k, classes, hidden)
        local = drift(glob, rng)
        dense = record_bytes(glob)
        print(f"\n{title}: dense fp32 record {dense / 1e3:.1f} kB per client and direction")
        print(f"{'rho':>5} {'dtype':>8} {'LoRA/(val+floor)':>17} {'+framing':>9} "
              f"{'LoRA/values':>12} {'uplink/dense':>13} {'downlink/full':>14}")
        for rho in rhos:
            for dtype in DTYPES:
                to_floor, framed, to_values = lora_ratio(layers, r, d, k, rho, dtype, rng)
                if dtype == "float32":
                    worst = max(worst, to_floor)
                settings = SparseSettings("soft", rho, dtype=dtype, head_sparsity=rho)
                payload, _ = encode_update(glob, local, settings, ErrorFeedback("b"),
                                           server_round=1, node_id=0)
                up = record_bytes(payload) / dense
                b = Broadcast(rho, dtype, history=2)
                b.advance(1, glob)
                b.advance(2, local)
                out = b.outgoing(1, full_nbytes=record_bytes(b.reference),
                                 nbytes=record_bytes)
                down = f"{record_bytes(out.arrays) / record_bytes(b.reference):.4f}"
                print(f"{rho:>5g} {dtype:>8} {to_floor:>17.4f} {framed:>9.4f} {to_values:>12.4f} "
                      f"{up:>13.4f} {down:>14}")
    print(f"\nworst LoRA payload / (values + floor) with float32 values: {worst:.4f} "
          f"(target <= 1.05 at every rho in [0.1, 0.99])")


if __name__ == "__main__":
    main()
