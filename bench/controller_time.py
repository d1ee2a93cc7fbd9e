"""Benchmark: P3 (eq. 39) solve time per round, cvxpy vs bisection/closed form; controller cost."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import cvxpy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`

from fedsoft.runlog import read_metrics
from fedsoft.wireless.bound import BoundConstants
from fedsoft.wireless.channel import Channel, ChannelConfig
from fedsoft.wireless.controller import (
    P3Problem,
    TSFAController,
    solve_p3_bisection,
    solve_p3_closed_form,
    solve_p3_cvxpy,
)

DK = 12_288  # ViT-Base: 4 blocks x (q, v), d + k = 768 + 768 each
RANK = 8
K = 10
TARGET_MS = 20.0


def naive_cvxpy(bound: BoundConstants, V: float, Q: float, c: float, lo: float, hi: float,
                opts: dict[str, float], solver: str | None) -> float:
    """Same DCP form as P3Problem, but the cvxpy problem is rebuilt every round (no Parameters)."""
    a, lam = V * bound.kappa_E, Q * c
    if lam <= 0.0:
        return lo
    tot = a + lam
    rho = cp.Variable()
    s = cp.Variable(nonneg=True)
    cons = [s >= cp.inv_pos(1.0 - rho) - 0.5, rho >= lo, rho <= hi]
    if bound.p == 1:
        pen = cp.square(s)
    else:
        u = cp.Variable(nonneg=True)
        cons.append(u >= cp.square(s) - 0.25)
        pen = cp.square(u)
    cp.Problem(cp.Minimize(a / tot * pen - lam / tot * rho), cons).solve(solver=solver, **opts)
    return float(np.clip(rho.value, lo, hi))


def median_ms(fn: Callable[..., float], args_list: list[tuple]) -> tuple[float, list[float]]:
    times, out = [], []
    for args in args_list:
        t0 = time.perf_counter()
        out.append(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=300, help="rounds to build up the queue first")
    ap.add_argument("--p", type=int, default=1, choices=(1, 2))
    ap.add_argument("--V", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metrics", type=Path, default=None,
                    help="metrics.jsonl of a real run: print the controller's share of its rounds")
    args = ap.parse_args()
    warnings.simplefilter("ignore", UserWarning)

    cfg = ChannelConfig()
    ch = Channel(cfg, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    n_total = args.warmup + args.rounds
    gains = [ch.draw(t)[rng.choice(cfg.num_clients, K, replace=False)] for t in range(n_total)]
    bound = BoundConstants(p=args.p)
    probe = TSFAController(RANK, bound, V=args.V, T_bar=1.0, d_plus_k_total=DK, channel=cfg,
                           solver="bisection")
    dense = np.mean([probe.latency_scale(float(np.sum(1 / ch.spectral_eff(g)))) for g in gains])
    t_bar = 0.4 * float(dense)

    # realistic (Q, c) sequence: run the controller, record the P3 inputs of the last rounds
    ctl = TSFAController(RANK, bound, V=args.V, T_bar=t_bar, d_plus_k_total=DK, channel=cfg,
                         solver="bisection")
    p3_args: list[tuple] = []
    for t, g in enumerate(gains):
        q_now = ctl.backlog
        d = ctl.step(g)
        if t >= args.warmup:
            p3_args.append((bound, args.V, q_now, ctl.latency_scale(d.inv_gamma_sum),
                            ctl.rho_min, ctl.rho_max))
        ctl.observe(d.predicted_latency)

    cached = P3Problem(args.p)
    solve_p3_cvxpy(*p3_args[0])  # build + compile the cached DPP problem once (not timed)
    t0 = time.perf_counter()
    P3Problem(args.p).solve(1.0, 1.0, 0.0, 0.99)
    build_ms = (time.perf_counter() - t0) * 1e3

    results: dict[str, float] = {}
    outs: dict[str, list[float]] = {}
    results["bisection"], outs["bisection"] = median_ms(solve_p3_bisection, p3_args)
    if args.p == 1:
        results["closed_form"], outs["closed_form"] = median_ms(solve_p3_closed_form, p3_args)
    results["cvxpy_param"], outs["cvxpy_param"] = median_ms(solve_p3_cvxpy, p3_args)
    naive_args = [(*a, cached.solver_opts, cached.solver) for a in p3_args]
    results["cvxpy_rebuild"], outs["cvxpy_rebuild"] = median_ms(naive_cvxpy, naive_args)

    ref = np.array(outs["bisection"])
    print(f"P3 per-round solve time, median over {args.rounds} rounds (p={args.p}, V={args.V}, "
          f"solver for cvxpy: {cached.solver}, mean rho={ref.mean():.4f})")
    for name, ms in results.items():
        err = float(np.max(np.abs(np.array(outs[name]) - ref)))
        print(f"  {name:14s} {ms:9.4f} ms   max|rho - rho_bisection| = {err:.2e}")
    print(f"  first cvxpy build+compile+solve: {build_ms:.1f} ms (one-off)")
    base = results["bisection"]
    print("ratios:")
    print(f"  cvxpy_param / bisection   = {results['cvxpy_param'] / base:8.1f}x")
    print(f"  cvxpy_rebuild / bisection = {results['cvxpy_rebuild'] / base:8.1f}x")
    rebuild_ratio = results["cvxpy_rebuild"] / results["cvxpy_param"]
    print(f"  cvxpy_rebuild / cvxpy_param = {rebuild_ratio:6.2f}x")
    if "closed_form" in results:
        print(f"  bisection / closed_form   = {base / results['closed_form']:8.1f}x")

    # whole-controller overhead per round: step() + observe() (shares, latency, queue, solve)
    solvers = ["bisection", "cvxpy"] + (["closed_form"] if args.p == 1 else [])
    overhead: dict[str, float] = {}
    for solver in solvers:
        c2 = TSFAController(RANK, bound, V=args.V, T_bar=t_bar, d_plus_k_total=DK, channel=cfg,
                            solver=solver)  # type: ignore[arg-type]
        times = []
        for g in gains[: args.rounds]:
            t0 = time.perf_counter()
            d = c2.step(g)
            c2.observe(d.predicted_latency)
            times.append((time.perf_counter() - t0) * 1e3)
        overhead[solver] = statistics.median(times)
    print("controller overhead per round (step + observe), median:")
    for solver, ms in overhead.items():
        print(f"  {solver:12s} {ms:9.4f} ms")
    print(f"  cvxpy / bisection controller = {overhead['cvxpy'] / overhead['bisection']:.1f}x")
    ok = overhead["cvxpy"] < TARGET_MS
    print(f"target < {TARGET_MS:.0f} ms per round with cvxpy on CPU: "
          f"{'HOLDS' if ok else 'MISSED'} ({overhead['cvxpy']:.2f} ms)")
    if args.metrics is not None:
        rounds = [r["round_s"] for r in read_metrics(args.metrics) if r.get("round_s")]
        if not rounds:
            sys.exit(f"{args.metrics}: no round_s values (not a fedsoft run's metrics.jsonl?)")
        med = statistics.median(rounds)
        print(f"controller share of a round ({args.metrics}, median round_s {med:.2f} s): "
              f"{overhead['cvxpy'] / 1e3 / med:.2e}")


if __name__ == "__main__":
    main()
