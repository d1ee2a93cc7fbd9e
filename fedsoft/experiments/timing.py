"""Fig. 2: selection time of SOFT (eqs. 8-9) vs product + SVD, measured in this process."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _factors(r: int, d: int, layers: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d, generator=g) / d**0.5, torch.randn(d, r, generator=g) / r**0.5)
            for _ in range(layers)]


def time_selection(params: Mapping[str, Any], seeds: int, out: Path,
                   label: str) -> list[dict[str, Any]]:
    """SOFT (eqs. 8-9) vs product + SVD selection time over rank and over d = k -> JSONL."""
    # as in bench/selection_time.py: spinning OpenMP threads inflate SVD times on a busy host
    # (takes effect only if torch is not imported yet in this process)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from fedsoft.compression.sparsifiers import SPARSIFIERS as REGISTRY
    from fedsoft.compression.sparsifiers import keep_count, to_rows

    threads = int(params.get("threads", 2))
    torch.set_num_threads(threads)
    points = [("rank", r, int(params["d_fixed"])) for r in params["ranks"]]
    points += [("size", int(params["r_fixed"]), d) for d in params["sizes"]]
    rows = []
    with out.open("w") as fh:
        for seed in range(seeds):
            for sweep, r, d in points:
                layers = [to_rows(A, B) for A, B in _factors(r, d, int(params["layers"]),
                                                              seed * 1000 + r + d)]
                keep = keep_count(r, d, d, float(params["sparsity"]))
                for method, repeats in (("soft", params["repeats_soft"]),
                                        ("svd", params["repeats_svd"])):
                    fn = REGISTRY[method]
                    sec = median_time(lambda fn=fn, layers=layers, keep=keep, d=d:
                                      [fn(x, d, keep) for x in layers], int(repeats))
                    row = {"sweep": sweep, "method": method, "r": r, "d": d, "k": d,
                           "layers": int(params["layers"]), "keep_per_layer": keep,
                           "sparsity": float(params["sparsity"]), "seed": seed,
                           "seconds": sec, "repeats": int(repeats), "threads": threads}
                    fh.write(json.dumps(row) + "\n")
                    rows.append(row)
                    print(f"{label} {sweep} r={r} d=k={d} {method}: {1e3 * sec:.3f} ms "
                          f"(median of {repeats})", flush=True)
    return rows
