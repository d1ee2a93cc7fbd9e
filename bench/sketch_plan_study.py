"""Paper B plan study: optimised (q, k) vs uniform vs full participation, priced by J (B.5).

No training: the plan and its objective J = R_eps x E[T_r] (B.4-B.5) for the figB-cpu
workload (MiniLM-L6 + 20 Newsgroups sizes, Dirichlet(0.5) shares, r = 8) on a system of
``--clients`` clients, in every combination of
* compute spread 1x (compute-heterogeneity 0) or 10x (the log-normal sigma at which the
  slowest of this seed's clients is exactly 10x the fastest),
* round overhead 0 s or 1 s (round-overhead-s),
* the channel: today's ``paper`` model (d^-kappa, no reference gain) or a shadowed urban macro
  channel (PL = 128.1 + 37.6 log10(d/km) dB, 8 dB per-client log-normal shadowing, 100-1000 m,
  Rayleigh fading on top; a stand-in subclass of Channel until the channel branch lands),
* the constants: the defaults (1, 1, 0.5) or a fitted ``sketch_calibration.json``.
For each: J, E[T_round], E[participants] and k of the optimised plan, of uniform sampling
(q = sampling-q, k = sketch-ratio r), of full participation, and of the best common k (each
with its own q-step); ratios to the optimised plan. Then the sensitivity: every fitted
constant scaled by 0.5x and 2x, the plan re-optimised, and what the re-optimised plan costs
under the unscaled constants (mis-specification regret).
Usage: python bench/sketch_plan_study.py [--calibration FILE] [--clients 20] [--q 0.5]
       [--draws 256] [--out docs/data/figB-plan/plan_study.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsoft.config import resolve  # noqa: E402
from fedsoft.sketching.calibration import load_sketch_calibration  # noqa: E402
from fedsoft.sketching.optimizer import SketchObjective, optimize_sampling, uniform_plan  # noqa: E402
from fedsoft.sketching.wallclock import SystemModel  # noqa: E402
from fedsoft.wireless.channel import Channel, ChannelConfig  # noqa: E402

DEFAULT_CALS = [ROOT / "docs/data/figB-plan/sketch_calibration_figB_cpu.json",
                ROOT / "docs/data/figB-plan/sketch_calibration_ci_auto.json"]


class ShadowedUMa(Channel):
    """Urban-macro path loss PL = 128.1 + 37.6 log10(d / km) dB with fixed per-client
    log-normal shadowing, Rayleigh fading on top (``draw`` scales ``mean_gains``)."""

    def __init__(self, config: ChannelConfig, seed: int = 0, shadowing_db: float = 8.0) -> None:
        super().__init__(config, seed)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(23,)))
        self.shadow_db = shadowing_db * rng.standard_normal(config.num_clients)

    def mean_gains(self) -> np.ndarray:
        pl_db = 128.1 + 37.6 * np.log10(self.distances_m / 1000.0) + self.shadow_db
        return 10.0 ** (-pl_db / 10.0)


def spread_sigma(n: int, seed: int, spread: float) -> float:
    """compute-heterogeneity giving max/min = ``spread`` for compute_speeds(n, ., sigma, seed)."""
    if spread <= 1:
        return 0.0
    z = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(7,))).standard_normal(n)
    return math.log(spread) / float(z.max() - z.min())


def snr_db(ch: Channel) -> np.ndarray:
    return 10 * np.log10(ch.config.tx_power_w * ch.mean_gains() / ch.noise_w)


def summary(p, system: SystemModel) -> dict:
    return {"J": p.objective, "E_round_s": p.expected_round_s,
            "E_participants": float(p.q.sum()), "k": p.k.tolist(),
            "mean_k": float(p.k.mean()), "q": [round(float(x), 4) for x in p.q],
            "q_slowest": float(p.q[int(np.argmax(system.compute_s))]),
            "q_fastest": float(p.q[int(np.argmin(system.compute_s))])}


def plans(system: SystemModel, a: np.ndarray, obj: SketchObjective, q: float, k0: int,
          draws: int) -> dict:
    n = system.num_clients
    opt = optimize_sampling(system, a, obj, budget=q * n, k_init=k0, draws=draws)
    out = {"optimized": summary(opt, system),
           "uniform": summary(uniform_plan(system, a, obj, q, k0, draws=draws), system),
           "full": summary(uniform_plan(system, a, obj, 1.0, k0, draws=draws), system)}
    common = [optimize_sampling(system, a, obj, budget=q * n, k_init=c, optimize_k=False,
                                draws=draws) for c in range(1, system.rank + 1)]
    best = min(common, key=lambda p: p.objective)
    out["best_common_k"] = {**summary(best, system), "common_k": int(best.k[0]),
                            "J_by_common_k": [p.objective for p in common]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=Path, nargs="+", default=DEFAULT_CALS,
                    help="sketch_calibration.json files (constants named by file stem)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--q", type=float, default=0.5)
    ap.add_argument("--draws", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/data/figB-plan/plan_study.json")
    args = ap.parse_args()
    t0 = time.time()
    from fedsoft.task import workload  # noqa: PLC0415
    from strategies.planning import sketch_system  # noqa: PLC0415 (loads torch / the model)

    cfg = resolve({"preset": "quickstart", "dataset": "20ng", "strategy": "sketch",
                   "local-steps": 8, "max-train-examples": 3000, "max-test-examples": 400,
                   "partitioner": "dirichlet", "dirichlet-alpha": 0.5, "seed": args.seed,
                   "sampling-q": args.q}, ROOT / "conf")
    work = workload.build_workload(cfg)
    n, r = args.clients, int(cfg["lora-rank"])
    k0 = max(1, round(float(cfg["sketch-ratio"]) * r))
    cals = {p.stem.replace("sketch_calibration_", ""): load_sketch_calibration(p)
            for p in args.calibration}
    constants = {"default": SketchObjective(), **{k: c.objective() for k, c in cals.items()}}
    for k, c in cals.items():
        print(f"constants {k}: alpha0 {c.alpha0:.4g}, alpha1 {c.alpha1:.4g}, xi {c.xi:.4g} "
              f"(fitted {c.fitted}, assumed {c.assumed}, rms rel. residual "
              f"{c.rel_rms_residual:.3f})")
    systems, snr = {}, {}
    for spread in (1, 10):
        sig = spread_sigma(n, args.seed, spread)
        for overhead in (0.0, 1.0):
            c = cfg.with_values({"compute-heterogeneity": sig, "round-overhead-s": overhead})
            base, sizes = sketch_system(c, work, n)
            shadow_cc = dataclasses.replace(base.channel.config, min_distance_m=100.0,
                                            max_distance_m=1000.0)
            for chname, ch in (("paper", base.channel),
                               ("shadowed", ShadowedUMa(shadow_cc, args.seed))):
                systems[(spread, overhead, chname)] = (
                    dataclasses.replace(base, channel=ch), np.asarray(sizes, np.float64), sig)
                s = snr_db(ch)
                snr[chname] = {"min": float(s.min()), "median": float(np.median(s)),
                               "max": float(s.max())}
    for chname, s in snr.items():
        print(f"SNR (dB) {chname}: min {s['min']:.1f} median {s['median']:.1f} "
              f"max {s['max']:.1f}")
    rows = []
    hdr = (f"{'spread':>6} {'ovh':>4} {'channel':>8} {'consts':>13} | {'J opt':>9} "
           f"{'unif/opt':>8} {'full/opt':>8} {'bestk/opt':>9} {'k*':>3} | {'E[T] opt':>8} "
           f"{'unif':>6} {'full':>6} | {'E[part]':>7} {'unif':>5} | mean k, q slow/fast")
    print(hdr)
    for (spread, overhead, chname), (system, a, sig) in systems.items():
        for cname, obj in constants.items():
            res = plans(system, a, obj, args.q, k0, args.draws)
            o, u, f, b = (res[m] for m in ("optimized", "uniform", "full", "best_common_k"))
            rows.append({"compute_spread": spread, "compute_heterogeneity": sig,
                         "round_overhead_s": overhead, "channel": chname,
                         "constants": cname, "alpha": dataclasses.asdict(obj), **res})
            print(f"{spread:>5}x {overhead:>4.1f} {chname:>8} {cname:>13} | {o['J']:>9.4g} "
                  f"{u['J'] / o['J']:>8.3f} {f['J'] / o['J']:>8.3f} {b['J'] / o['J']:>9.3f} "
                  f"{b['common_k']:>3} | {o['E_round_s']:>8.2f} {u['E_round_s']:>6.2f} "
                  f"{f['E_round_s']:>6.2f} | {o['E_participants']:>7.2f} "
                  f"{u['E_participants']:>5.2f} | {o['mean_k']:.2f} "
                  f"[{min(o['k'])}-{max(o['k'])}], {o['q_slowest']:.2f}/{o['q_fastest']:.2f}",
                  flush=True)
    # sensitivity on the strongly heterogeneous, shadowed system, for every constant set
    sens = []
    print("\nsensitivity (10x compute, shadowed channel): each constant x0.5 / x2, "
          "re-optimised; regret = J under the unscaled constants of the re-optimised plan / "
          "J of the unscaled optimum - 1")
    print(f"{'consts':>13} {'ovh':>4} {'constant':>8} {'x':>4} | {'J*':>9} {'E[T]':>6} "
          f"{'E[part]':>7} {'mean k':>6} {'k range':>7} | {'regret':>7}")
    for cname, base in constants.items():
        for overhead in (0.0, 1.0):
            system, a, _ = systems[(10, overhead, "shadowed")]
            p0 = optimize_sampling(system, a, base, budget=args.q * n, k_init=k0,
                                   draws=args.draws)
            aa = a / a.sum()
            for name in ("alpha0", "alpha1", "xi"):
                for scale in (0.5, 1.0, 2.0):
                    obj = dataclasses.replace(base, **{name: getattr(base, name) * scale})
                    p = p0 if scale == 1 else optimize_sampling(
                        system, a, obj, budget=args.q * n, k_init=k0, draws=args.draws)
                    j_base = base.rounds(p.q, p.k, aa, r) * p.expected_round_s
                    row = {"constants": cname, "round_overhead_s": overhead,
                           "constant": name, "scale": scale, **summary(p, system),
                           "J_under_unscaled": j_base, "regret": j_base / p0.objective - 1}
                    sens.append(row)
                    if scale == 1 and name != "alpha0":
                        continue
                    print(f"{cname:>13} {overhead:>4.1f} {name:>8} {scale:>4} | "
                          f"{p.objective:>9.4g} {p.expected_round_s:>6.2f} "
                          f"{float(p.q.sum()):>7.2f} {float(p.k.mean()):>6.2f} "
                          f"{int(p.k.min()):>3}-{int(p.k.max()):<3} | {row['regret']:>7.2%}",
                          flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python bench/sketch_plan_study.py " + " ".join(sys.argv[1:]),
        "clients": n, "rank": r, "sampling_q": args.q, "k_fixed": k0, "draws": args.draws,
        "calibrations": {k: {"file": str(p), **dataclasses.asdict(c)}
                         for (k, c), p in zip(cals.items(), args.calibration, strict=True)},
        "snr_db": snr, "scenarios": rows, "sensitivity": sens,
        "wall_s": time.time() - t0}, indent=1, default=float) + "\n")
    print(f"\nwrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
