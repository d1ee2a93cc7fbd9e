"""SOFT sparsifying the update + error memory vs the local factors themselves, same budget.

Runs one `flwr run` per `sparsify-target` (plus dense LoRA as the reference) on one preset and
seed, and prints accuracy per round, the final accuracy gap and the uplink bytes, all read from
each run's metrics.jsonl.
Usage: python bench/sparsify_target.py [--preset quickstart] [--rounds 5] [--sparsity 0.5]
       [--zeta 0.01] [--seed 0] [--supernodes 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsoft.experiments.launch import flwr_run  # noqa: E402
from fedsoft.runlog import read_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--zeta", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--supernodes", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="keep the run dirs here")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedsoft-target-"))
    common = f'preset="{args.preset}" num-server-rounds={args.rounds} seed={args.seed}'
    runs = {
        "dense": f'{common} sparsifier="dense"',
        "update": f'{common} sparsifier="soft" sparsity={args.sparsity} zeta={args.zeta} '
                  f'sparsify-target="update"',
        "factors": f'{common} sparsifier="soft" sparsity={args.sparsity} zeta={args.zeta} '
                   f'sparsify-target="factors"',
    }
    results = {}
    for name, cfg in runs.items():
        run_dir = out / name
        t0 = time.time()
        print(f"[bench] {name}: flwr run --run-config '{cfg}'", flush=True)
        proc = flwr_run(out / f"home-{name}", f'{cfg} run-dir="{run_dir}"',
                        num_supernodes=args.supernodes, timeout=7200)
        if proc.returncode != 0:
            sys.exit(proc.stdout[-4000:] + proc.stderr[-4000:])
        results[name] = read_metrics(run_dir / "metrics.jsonl")
        print(f"[bench] {name}: done in {time.time() - t0:.0f} s", flush=True)
    print(f"\n{'round':>5} " + " ".join(f"{n:>9}" for n in results))
    for t in range(args.rounds + 1):
        print(f"{t:>5} " + " ".join(f"{results[n][t]['accuracy']:>9.4f}" for n in results))
    final = {n: rows[-1]["accuracy"] for n, rows in results.items()}
    bytes_ = {n: sum(r["uplink_bytes"] for r in rows) for n, rows in results.items()}
    for n in results:
        print(f"{n:>8}: final accuracy {final[n]:.4f}, uplink {bytes_[n] / 1e6:.2f} MB "
              f"({bytes_[n] / bytes_['dense']:.3f} of dense)")
    gap = final["update"] - final["factors"]
    print(f"update - factors: {gap:+.4f} accuracy ({'update' if gap >= 0 else 'factors'} wins); "
          f"run dirs in {out}")


if __name__ == "__main__":
    main()
