"""Share of a federated round spent outside local training (Flower + Ray + (de)serialisation).

Runs the quickstart preset through `flwr run` (4 simulated SuperNodes, one Ray actor per 2 CPUs,
so the K clients of a round train one after another) and reads, per round, the server-side wall
time of the train phase (``round_s``: send, client work, receive, decode) and the sum of the
clients' own ``train_local`` time (``train_s``). Prints overhead = 1 - train_s / round_s.
``--supernodes N`` simulates N SuperNodes (K = clients-per-round of the preset still train per
round); ``--app-dir DIR`` runs another checkout's app (e.g. the previous version) for a
before/after comparison.
Usage: python bench/round_overhead.py [--rounds N] [--preset NAME] [--sparsifier S --sparsity R]
       [--supernodes N] [--app-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsoft.experiments.launch import flwr_run  # noqa: E402
from fedsoft.runlog import read_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--sparsifier", default="dense")
    ap.add_argument("--sparsity", type=float, default=0.0)
    ap.add_argument("--supernodes", type=int, default=4)
    ap.add_argument("--app-dir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cfg = (f'preset="{args.preset}" num-server-rounds={args.rounds} run-dir="{run_dir}" '
               f'sparsifier="{args.sparsifier}" sparsity={args.sparsity}')
        proc = flwr_run(Path(tmp) / "home", cfg, num_supernodes=args.supernodes,
                        cpus_per_client=2, timeout=3600, app_dir=args.app_dir)
        if proc.returncode != 0:
            sys.exit(proc.stdout[-4000:] + proc.stderr[-4000:])
        first, *rows = read_metrics(run_dir / "metrics.jsonl")
    print(f"round 0 accuracy {first['accuracy']:.4f} loss {first['loss']:.4f}")
    print(f"{'round':>5} {'round_s':>8} {'train_s':>8} {'overhead':>8} {'acc':>7} {'wall_s':>7}")
    for r in rows:
        print(f"{r['round']:>5} {r['round_s']:>8.2f} {r['train_s']:>8.2f} "
              f"{1 - r['train_s'] / r['round_s']:>8.1%} {r['accuracy']:>7.4f} {r['wall_s']:>7.1f}")
    steady = rows[1:] or rows  # round 1 includes one-off model/data loading in the actors
    total, train = sum(r["round_s"] for r in steady), sum(r["train_s"] for r in steady)
    print(f"overhead share (rounds {steady[0]['round']}-{steady[-1]['round']}): "
          f"{1 - train / total:.1%}   target < 10 %")
    print(f"mean round_s (rounds {steady[0]['round']}-{steady[-1]['round']}): "
          f"{total / len(steady):.2f} s with {args.supernodes} SuperNodes")


if __name__ == "__main__":
    main()
