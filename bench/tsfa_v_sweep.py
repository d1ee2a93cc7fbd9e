"""TSFA online stage alone (no training): how V trades average ratio against meeting T_bar.

Builds the controller exactly as the server does (:func:`fedsoft.wireless.plan.plan` on the resolved
run config; default: the quickstart MiniLM-L6 with query/value adapters, 4 clients, K = 2),
simulates rounds of Rayleigh CSI with the predicted latency fed back (eq. 30), and prints, per V,
the mean rho and the running-average latency after 5, 20 and --rounds rounds against the budget.
Usage: python bench/tsfa_v_sweep.py [--rounds 200] [--clients 4] [--vs 1,0.1,0.01,0.001]
       [--run-config 'latency-budget=0.1 ...']
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsoft.config import DEFAULTS, validate
from fedsoft.wireless import plan as tsfa_plan

DK_MINILM = 12 * (384 + 384)  # 6 blocks x (query, value), d + k = 384 + 384 each


def _parse(pairs: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in pairs.split():
        key, _, raw = item.partition("=")
        try:
            out[key] = int(raw) if raw.lstrip("-").isdigit() else float(raw)
        except ValueError:
            out[key] = raw.strip('"')
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--vs", default="1,0.1,0.01,0.001")
    ap.add_argument("--dk", type=int, default=DK_MINILM, help="sum of d + k over adapted layers")
    ap.add_argument("--run-config", default="", help="key=value overrides, as for flwr run")
    args = ap.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    base = validate({**DEFAULTS, "strategy": "tsfa", **_parse(args.run_config)})
    k = min(int(base["clients-per-round"]), args.clients)
    marks = [t for t in (5, 20, args.rounds) if t <= args.rounds]
    print(f"budget {base['latency-budget']} s, N={args.clients}, K={k}, sum(d+k)={args.dk}, "
          f"{args.rounds} rounds, seed {base['seed']}")
    head = " ".join(f"{'lat@' + str(t):>9}" for t in marks)
    print(f"{'V':>8} {'r*':>3} {'rho0':>6} {'mean rho':>8} {head} {'Q_end':>8} {'met@end':>7}")
    for v in (float(x) for x in args.vs.split(",")):
        plan = tsfa_plan.plan({**base, "lyapunov-v": v}, args.clients, args.dk)
        ctl, ch = plan.controller, plan.channel
        rng = np.random.default_rng(int(base["seed"]))
        rhos, lats = [], []
        for t in range(args.rounds):
            gains = ch.draw(t)[rng.choice(args.clients, k, replace=False)]
            d = ctl.step(gains)
            ctl.observe(d.predicted_latency)
            rhos.append(d.rho)
            lats.append(d.predicted_latency)
        avg = " ".join(f"{np.mean(lats[:t]):>9.4f}" for t in marks)
        met = np.mean(lats) <= float(base["latency-budget"]) * 1.01
        rho0 = plan.offline.rho0 if plan.offline else float("nan")
        print(f"{v:>8g} {plan.rank:>3} {rho0:>6.3f} {np.mean(rhos):>8.3f} {avg} "
              f"{ctl.backlog:>8.3f} {str(bool(met)):>7}")


if __name__ == "__main__":
    main()
