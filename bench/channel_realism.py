"""Channel realism and the TSFA controller alone (no training), every number measured here.

1. SNR distribution (mean SNR over the average channel at the equal share 1/K, dB) and the
   spread of per-client rates (max/min spectral efficiency at that share) per path-loss model.
2. r* and rho* (offline stage, wire payload) for MiniLM-L6 (6 blocks x q,v, d = k = 384, head
   384x10) and ViT-B (4 blocks x q,v, d = k = 768, head 768x100) at the default budget
   (``latency-budget-fraction`` = 0.5 x the nominal dense round at rank 8), N = 100, K = 10.
3. Controller-only study over --rounds rounds (default 5000) of seeded Rayleigh CSI, as the
   server runs it (:func:`fedsoft.wireless.plan.plan`, P3 on the wire payload, realised latency
   with the true gains): a V sweep, the fixed-rho oracle (the smallest fixed rho whose realised
   average latency meets T_bar on the same draws, and the one matching each V's realised
   average), imperfect CSI (csi-error 0, 0.1, 0.3) and the start rule (budget vs dense).
   "Adaptation gain" = 1 - (TSFA's mean sparsification penalty) / (the oracle's at the same
   realised average latency), in %: what per-round adaptation buys over the best fixed rho.
4. ``--section outage``: the per-round deadline / outage rule (PROPOSED, not in paper A;
   ``tsfa-deadline = "budget-multiple"``, deadline F x T_bar) on the default log-distance
   channel without and with 8 dB shadowing, MiniLM shapes, F in {off, 1, 1.5, 2, 3, 5} x V in
   {0.01, 0.1}, plus csi-error 0.1 at V = 0.01 and the run-config defaults (V = 0.001,
   F = 3): realised average / median / 99th percentile round latency over T_bar, mean rho,
   outage rate (scheduled clients that do not upload), late rate (uploads past the deadline,
   imperfect CSI only; their replies are dropped and the round lasts D) and per-client
   participation (uploads / times scheduled, min and max over the N clients). Writes
   outage.json.

Usage: python bench/channel_realism.py [--rounds 5000] [--section all|outage]
       [--out docs/data/controller]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedsoft.wireless.controller as online
from fedsoft.config import resolve
from fedsoft.wireless import plan as tsfa_plan
from fedsoft.wireless.bound import sparsification_term
from fedsoft.wireless.channel import Channel, equal_finish
from fedsoft.wireless.controller import deadline_latency

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "MiniLM-L6": ([(f"l{i}", 384, 384) for i in range(12)], [384 * 10, 10], {}),
    "ViT-B/CIFAR-100": ([(f"l{i}", 768, 768) for i in range(8)], [768 * 100, 100],
                        {"preset": "paper-vit-cifar100"}),
}
N, K = 100, 10
_CACHE: dict[bytes, tuple[float, np.ndarray]] = {}


def _cached_equal_finish(snr, mode="allocated", weights=None, rtol=1e-12):
    """The same draws recur for every V: solve each round's shares once."""
    if weights is not None:
        return equal_finish(snr, mode, weights, rtol)
    key = np.asarray(snr).tobytes() + mode.encode()
    if key not in _CACHE:
        _CACHE[key] = equal_finish(snr, mode, None, rtol)
    s, b = _CACHE[key]
    return s, b.copy()


online.equal_finish = _cached_equal_finish  # bench only: identical results, less time


def config(shape: str, **over: object) -> dict:
    return resolve({**SHAPES[shape][2], "clients-per-round": K, **over}, ROOT / "conf")


def make_plan(shape: str, **over: object):
    dims, heads, _ = SHAPES[shape]
    cfg = config(shape, **over)
    return tsfa_plan.plan(cfg, N, sum(d + k for _, d, k in dims),
                          tsfa_plan.payload_bits_fn(cfg, dims, heads)), cfg


def snr_table() -> list[dict]:
    rows = []
    for model in ("log-distance", "3gpp-uma", "paper"):
        for shadow in (0.0, 8.0):
            cfg = config("MiniLM-L6", **{"path-loss-model": model, "shadowing-db": shadow})
            ch = Channel(tsfa_plan.channel_config(cfg, N), seed=0)
            s = ch.snr_summary(K)
            rows.append({"path_loss_model": model, "shadowing_db": shadow,
                         **{k: s[k] for k in ("snr_db_min", "snr_db_median", "snr_db_max",
                                              "rate_spread")}})
    return rows


def draws(ch: Channel, rounds: int, seed: int) -> tuple[np.ndarray, list, list]:
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(N, K, replace=False) for _ in range(rounds)])
    true = [ch.draw(t)[idx[t]] for t in range(rounds)]
    est = [ch.estimate(t)[idx[t]] for t in range(rounds)]
    return idx, true, est


def run_controller(p, true: list, est: list) -> dict:
    ctl, ch = p.controller, p.channel
    t0 = time.perf_counter()
    per_bit_true = []
    for g_est, g_true in zip(est, true, strict=True):
        d = ctl.step(g_est)
        # realised seconds per bit of this round: planned shares, true gains (eq. 6)
        tau = float(np.max(ch.fdma_delays(1.0, d.shares, g_true)))
        per_bit_true.append(tau)
        ctl.observe(ctl.bits(d.rho) * tau)
    rho = np.array(ctl.history.rho)
    lat = np.array(ctl.history.latency)
    pen = sparsification_term(rho, ctl.bound.p, 0)
    return {"rho": rho, "lat": lat, "tau": np.array(per_bit_true), "pen": pen,
            "Q_end": ctl.backlog, "wall_s": time.perf_counter() - t0}


def oracle_rho(bits, tau: np.ndarray, target: float, lo: float, hi: float) -> float:
    """Smallest fixed rho whose mean realised latency bits(rho) mean(tau) <= target."""
    m = float(tau.mean())
    if bits(lo) * m <= target:
        return lo
    if bits(hi) * m > target:
        return float("nan")
    a, b = lo, hi
    for _ in range(60):
        mid = 0.5 * (a + b)
        a, b = (a, mid) if bits(mid) * m <= target else (mid, b)
    return b


def summarise(res: dict, p, tbar: float) -> dict:
    ctl = p.controller
    avg = float(res["lat"].mean())
    rho_fix_budget = oracle_rho(ctl.bits, res["tau"], tbar, ctl.rho_min, ctl.rho_max)
    rho_fix_same = oracle_rho(ctl.bits, res["tau"], avg, ctl.rho_min, ctl.rho_max)
    pen_same = float(sparsification_term(rho_fix_same, ctl.bound.p, 0)) \
        if np.isfinite(rho_fix_same) else float("nan")
    pen = float(res["pen"].mean())
    return {
        "avg_latency_over_budget": avg / tbar,
        "median_latency_over_budget": float(np.median(res["lat"])) / tbar,
        "p99_latency_over_budget": float(np.quantile(res["lat"], 0.99)) / tbar,
        "mean_rho": float(res["rho"].mean()),
        "mean_penalty": pen,
        "Q_end_s": res["Q_end"],
        "empty_queue_share": float(np.mean(np.array(ctl.history.queue) == 0.0)),
        "oracle_rho_at_budget": rho_fix_budget,
        "oracle_rho_at_same_latency": rho_fix_same,
        "adaptation_gain_pct": 100.0 * (1.0 - pen / pen_same) if pen_same > 0 else float("nan"),
        "wall_s": res["wall_s"],
    }


FACTORS = (None, 1.0, 1.5, 2.0, 3.0, 5.0)


def run_outage(p, idx: np.ndarray, true: list, est: list) -> dict:
    """One controller run with the outage rule as the server runs it (realised latency with
    the true gains, the planned payload, late uploads cut at the deadline)."""
    ctl, ch = p.controller, p.channel
    sched = np.zeros(N)
    uploaded = np.zeros(N)
    late_total = 0
    t0 = time.perf_counter()
    for t, (g_est, g_true) in enumerate(zip(est, true, strict=True)):
        d = ctl.step(g_est)
        bits = ctl.bits(d.rho)
        if d.active is None:  # off: exactly the study's formula (section 3)
            ctl.observe(bits * float(np.max(ch.fdma_delays(1.0, d.shares, g_true))))
            on = np.ones(K, dtype=bool)
        else:
            a = d.active
            lat, late = deadline_latency(ch.fdma_delays(bits, d.shares[a], g_true[a]),
                                         d.deadline_s)
            ctl.observe(lat)
            on = a.copy()
            on[np.flatnonzero(a)[late]] = False
            late_total += int(late.sum())
        np.add.at(sched, idx[t], 1.0)
        np.add.at(uploaded, idx[t][on], 1.0)
    lat = np.array(ctl.history.latency)
    part = uploaded[sched > 0] / sched[sched > 0]
    tbar = ctl.T_bar
    return {
        "avg_latency_over_budget": float(lat.mean()) / tbar,
        "median_latency_over_budget": float(np.median(lat)) / tbar,
        "p99_latency_over_budget": float(np.quantile(lat, 0.99)) / tbar,
        "max_latency_over_budget": float(lat.max()) / tbar,
        "mean_rho": float(np.mean(ctl.history.rho)),
        "mean_penalty": float(np.mean(sparsification_term(np.array(ctl.history.rho),
                                                          ctl.bound.p, 0))),
        "outage_rate": ctl.outage_rate,
        "late_rate": late_total / float(sched.sum()),
        "mean_uploads_per_round": float(uploaded.sum()) / len(true),
        "participation_min": float(part.min()),
        "participation_max": float(part.max()),
        "participation_p10": float(np.quantile(part, 0.1)),
        "participation_by_client": [float(x) for x in uploaded / np.maximum(sched, 1.0)],
        "Q_end_s": ctl.backlog,
        "T_bar_s": tbar,
        "wall_s": time.perf_counter() - t0,
    }


def outage_study(rounds: int, seed: int) -> dict:
    """Section 4 (module docstring): the outage rule over ``rounds`` controller rounds."""
    shape = "MiniLM-L6"
    cases = [(sh, 0.0, v, f) for sh in (0.0, 8.0) for v in (0.01, 0.1) for f in FACTORS]
    cases += [(0.0, 0.1, 0.01, f) for f in FACTORS]
    cases += [(0.0, 0.0, 0.001, 3.0)]  # the run-config defaults (lyapunov-v, F)
    print(f"\n== 4. {shape}: outage rule, {rounds} rounds, log-distance channel")
    print(f"{'shadow':>6} {'csi':>4} {'V':>5} {'F':>4} {'avg/Tb':>7} {'med/Tb':>7} "
          f"{'p99/Tb':>7} {'max/Tb':>7} {'rho':>6} {'outage':>7} {'late':>6} "
          f"{'part min':>8} {'part max':>8}")
    rows, draw_cache = [], {}
    for shadow, eps, v, f in cases:
        over = {"path-loss-model": "log-distance", "shadowing-db": shadow, "csi-error": eps,
                "lyapunov-v": v, "tsfa-deadline": "off" if f is None else "budget-multiple"}
        if f is not None:
            over["tsfa-deadline-factor"] = f
        p, _ = make_plan(shape, strategy="tsfa", **over)
        key = (shadow, eps)
        if key not in draw_cache:
            draw_cache[key] = draws(p.channel, rounds, seed)
        idx, true, est = draw_cache[key]
        r = run_outage(p, idx, true, est)
        r.update(shadowing_db=shadow, csi_error=eps, V=v, F="off" if f is None else f,
                 rank=p.rank)
        rows.append(r)
        print(f"{shadow:>6.0f} {eps:>4.1f} {v:>5g} {r['F']!s:>4} "
              f"{r['avg_latency_over_budget']:>7.3f} {r['median_latency_over_budget']:>7.3f} "
              f"{r['p99_latency_over_budget']:>7.3f} {r['max_latency_over_budget']:>7.2f} "
              f"{r['mean_rho']:>6.3f} {r['outage_rate']:>7.4f} {r['late_rate']:>6.4f} "
              f"{r['participation_min']:>8.3f} {r['participation_max']:>8.3f}", flush=True)
    return {"rounds": rounds, "N": N, "K": K, "seed": seed, "shape": shape,
            "channel": "log-distance", "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5000)
    ap.add_argument("--vs", default="0.001,0.01,0.1,1,10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "data" / "controller"))
    ap.add_argument("--section", choices=("all", "outage"), default="all",
                    help="all: sections 1-3 (channel_realism.json); outage: section 4 only "
                         "(outage.json)")
    args = ap.parse_args()
    if args.section == "outage":
        dest = Path(args.out)
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / "outage.json"
        path.write_text(json.dumps(outage_study(args.rounds, args.seed), indent=2,
                                   default=float) + "\n")
        print(f"\nwrote {path}")
        return
    vs = [float(v) for v in args.vs.split(",")]
    out: dict = {"rounds": args.rounds, "N": N, "K": K, "seed": args.seed}

    print(f"== 1. SNR (dB) at the equal share 1/{K} of 1 MHz, N = {N}, distances 50-300 m")
    out["snr"] = snr_table()
    for r in out["snr"]:
        print(f"{r['path_loss_model']:>13} shadow {r['shadowing_db']:>3.0f} dB: min "
              f"{r['snr_db_min']:6.1f} median {r['snr_db_median']:6.1f} max {r['snr_db_max']:6.1f}"
              f"  rate spread max/min {r['rate_spread']:5.2f}")

    out["plans"], out["study"] = {}, {}
    for shape in SHAPES:
        print(f"\n== 2. {shape}: offline stage at the default budget (wire payload)")
        plans = {}
        for model in ("log-distance", "paper"):
            p, cfg = make_plan(shape, strategy="tsfa", **{"path-loss-model": model})
            plans[model] = p
            row = {"r_star": p.rank, "rho_star": p.offline.rho0, "T_bar_s": p.T_bar,
                   "dense_nominal_s": p.dense_nominal_s,
                   "table": tsfa_plan.offline_table(p.offline)}
            out["plans"][f"{shape}|{model}"] = row
            print(f"{model:>13}: T_bar {p.T_bar:.4g} s = {cfg['latency-budget-fraction']} x dense "
                  f"{p.dense_nominal_s:.4g} s -> r* = {p.rank}, rho* = {p.offline.rho0:.4f}")

        print(f"\n== 3. {shape}: controller only, {args.rounds} rounds, r* from the default "
              f"channel, T_bar as planned")
        head = (f"{'channel':>12} {'csi':>4} {'start':>6} {'V':>6} {'avg/Tb':>7} {'med/Tb':>7} "
                f"{'p99/Tb':>7} {'mean rho':>8} {'oracle':>7} {'gain %':>7} {'Q_end s':>9} "
                f"{'Q=0':>5}")
        print(head)
        study = []
        cases = [("log-distance", 0.0, "budget", v) for v in vs]
        cases += [("paper", 0.0, "budget", v) for v in vs]
        cases += [("log-distance", e, "budget", 0.01) for e in (0.1, 0.3)]
        cases += [("log-distance", 0.0, "dense", 0.01)]
        draw_cache: dict = {}
        for model, eps, start, v in cases:
            p, _ = make_plan(shape, strategy="tsfa", **{
                "path-loss-model": model, "csi-error": eps, "tsfa-start": start,
                "lyapunov-v": v})
            key = (model, eps)
            if key not in draw_cache:
                draw_cache[key] = draws(p.channel, args.rounds, args.seed)
            _, true, est = draw_cache[key]
            s = summarise(run_controller(p, true, est), p, p.T_bar)
            s.update(channel=model, csi_error=eps, start=start, V=v, rank=p.rank)
            study.append(s)
            print(f"{model:>12} {eps:>4.1f} {start:>6} {v:>6g} "
                  f"{s['avg_latency_over_budget']:>7.3f} "
                  f"{s['median_latency_over_budget']:>7.3f} {s['p99_latency_over_budget']:>7.2f} "
                  f"{s['mean_rho']:>8.4f} {s['oracle_rho_at_budget']:>7.4f} "
                  f"{s['adaptation_gain_pct']:>7.2f} {s['Q_end_s']:>9.3g} "
                  f"{s['empty_queue_share']:>5.2f}", flush=True)
        out["study"][shape] = study

    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "channel_realism.json"
    path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
