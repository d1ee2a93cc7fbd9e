"""Paper B: simulated wall-clock to a target accuracy, optimised (q, k) vs uniform vs full.

Runs `strategy="sketch"` once per `sampling` mode on one preset and seed through `flwr run`,
then prints, from each run's metrics.jsonl, accuracy against cumulative simulated wall-clock
(`sim_wallclock_s`) and the simulated time and uplink bytes until the accuracy first reaches
the target, with the ratios to the optimised plan.
Usage: python bench/sketch_wallclock.py [--preset quickstart] [--rounds 10] [--target 0.5]
       [--supernodes 4] [--seed 0] [--extra 'key=value ...'] [--out DIR]
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

MODES = {
    "optimized": 'sampling="optimized"',
    "uniform": 'sampling="uniform" sketch-k="fixed"',
    "full": 'sampling="full" sketch-k="fixed"',
}


def to_target(rows: list[dict], target: float) -> tuple[float | None, int | None, int | None]:
    """(simulated seconds, uplink bytes, round) when accuracy first reaches ``target``."""
    sent = 0
    for r in rows[1:]:
        sent += int(r.get("uplink_bytes", 0))
        if r["accuracy"] >= target:
            return float(r["sim_wallclock_s"]), sent, int(r["round"])
    return None, None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--supernodes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", default="", help="more run-config overrides for every run")
    ap.add_argument("--out", type=Path, default=None, help="keep the run dirs here")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedsoft-sketch-"))
    results = {}
    for name, mode in MODES.items():
        cfg = (f'preset="{args.preset}" strategy="sketch" num-server-rounds={args.rounds} '
               f'seed={args.seed} {mode} {args.extra}').strip()
        t0 = time.time()
        print(f"[bench] {name}: flwr run --run-config '{cfg}'", flush=True)
        proc = flwr_run(out / f"home-{name}", f'{cfg} run-dir="{out / name}"',
                        num_supernodes=args.supernodes, timeout=7200)
        if proc.returncode != 0 or not (out / name / "metrics.jsonl").is_file():
            sys.exit(proc.stdout[-4000:] + proc.stderr[-4000:])
        results[name] = read_metrics(out / name / "metrics.jsonl")
        if len(results[name]) != args.rounds + 1:
            sys.exit(f"{name}: run ended early\n" + proc.stdout[-4000:])
        print(f"[bench] {name}: done in {time.time() - t0:.0f} s", flush=True)
    print(f"\n{'round':>5} " + " ".join(f"{n + ' acc':>14} {'sim_s':>8}" for n in results))
    for t in range(args.rounds + 1):
        cells = []
        for rows in results.values():
            r = rows[t]
            cells.append(f"{r['accuracy']:>14.4f} {r.get('sim_wallclock_s', 0.0):>8.1f}")
        print(f"{t:>5} " + " ".join(cells))
    print(f"\nto accuracy >= {args.target}:")
    reach = {n: to_target(rows, args.target) for n, rows in results.items()}
    base = reach["optimized"][0]
    for n, (sim_s, sent, rnd) in reach.items():
        if sim_s is None:
            print(f"  {n:>9}: not reached in {args.rounds} rounds "
                  f"(final {results[n][-1]['accuracy']:.4f})")
            continue
        ratio = f" ({sim_s / base:.2f}x optimized)" if base else ""
        print(f"  {n:>9}: {sim_s:8.1f} simulated s{ratio}, round {rnd}, "
              f"{sent / 1e6:.2f} MB uplink")
    print(f"run dirs in {out}")


if __name__ == "__main__":
    main()
