"""Per-round client set-up (partition + loader + tokenising one round's batches) at N clients.

A simulated SuperNode process serves many clients over many rounds; fedsoft caches, per process,
the split, the partitioner and each client's partition (``fedsoft.task.partition``). This
measures, for N = 100 and 500 clients, one client's set-up for a round with nothing cached
(``cold``: what every round cost when each client rebuilt its partition) and with the caches
warm (``warm``: every round after a client's first in that process), and prints cold / warm.
Usage: python bench/client_setup.py [--clients 100 500] [--rounds 20] [--partitioner iid]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsoft.config import resolve  # noqa: E402
from fedsoft.task import partition, workload  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def one_round(cfg, work, pid: int, n: int, rnd: int) -> float:
    t0 = time.perf_counter()
    loader, _ = workload.train_loader(cfg, work, pid, n, rnd)
    for _ in zip(range(cfg.training.local_steps), loader, strict=False):
        pass  # collate = tokenise the round's batches
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--partitioner", default="iid", choices=["iid", "dirichlet", "shard"])
    args = ap.parse_args()
    cfg = resolve({"preset": "quickstart", "partitioner": args.partitioner},
                  ROOT / "conf")  # MiniLM-L6, 4000 Yahoo examples, 20 local steps
    work = workload.build_workload(cfg)
    print(f"{args.partitioner}: {'N':>5} {'cold ms':>9} {'warm ms':>9} {'cold/warm':>9}  "
          "(median over "
          f"{args.rounds} client-rounds, {cfg.training.local_steps} batches of "
          f"{cfg.training.batch_size})")
    for n in args.clients:
        cold, warm = [], []
        for r in range(args.rounds):
            pid = (r * 37) % n
            partition.clear_caches()
            cold.append(one_round(cfg, work, pid, n, r))
            one_round(cfg, work, pid, n, r)  # the client's first round in this process
            warm.append(one_round(cfg, work, pid, n, r + 1))
        c, w = statistics.median(cold), statistics.median(warm)
        print(f"{args.partitioner}: {n:>5} {1e3 * c:>9.1f} {1e3 * w:>9.1f} {c / w:>9.2f}")


if __name__ == "__main__":
    main()
