"""How the TSFA offline rank r* (P2, eqs. 25-29) moves with each constant of Phi (A.8).

For each setting the bench first measures sigma_bar_r (eq. 19) and sigma_max (Assumption 6)
with the pilot of ``bound-calibration = "auto"`` (:func:`fedsoft.wireless.pilot.simulate_pilot`: the
same dense pilot, client code and eq.-(5) aggregation the ServerApp runs on its Grid, here
in-process, at the largest of ``tsfa-ranks`` for ``bound-pilot-rounds`` rounds of
``bound-pilot-local-steps`` steps). Then it makes the offline plan exactly as the server does
(:func:`fedsoft.wireless.plan.plan`, real encoded payload sizes) with every constant scaled by
0.1, 0.5, 1, 2, 10 in turn, once with the default spectra (``bound-sigma-bar`` =
``bound-sigma-max`` = 1 for every rank) and once with the measured ones, and prints r* for
each. At the baseline it prints the offline table split into the terms of Phi0(r, rho*(r)):
rank error (i), covariance (iii) and sparsification (iv).

Settings: ``minilm``: the MiniLM-L6 default (quickstart) with N = 100 clients, K = 10 and the
default budget; ``fig3c``: the cpu-scale fig3c TSFA run (fedsoft.experiments.runner: 6 SuperNodes,
K = 3, the quickstart model with its overrides).

Usage: python bench/rank_sensitivity.py [--settings minilm,fig3c] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsoft import lora  # noqa: E402
from fedsoft.config import resolve  # noqa: E402
from fedsoft.experiments import runner as experiments
from fedsoft.task import workload
from fedsoft.wireless import plan as tsfa_plan
from fedsoft.wireless.bound import sparsification_term  # noqa: E402
from fedsoft.wireless.calibration import calibrate_run, write_calibration  # noqa: E402
from fedsoft.wireless.offline_rank import InfeasibleLatencyError  # noqa: E402
from fedsoft.wireless.pilot import simulate_pilot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "data" / "rank-sensitivity"
SCALES = (0.1, 0.5, 1.0, 2.0, 10.0)
# row label -> run-config key scaled (sigma rows scale the calibration file when calibrated)
CONSTANTS = {
    "kappa_R": "bound-kappa-r", "kappa_S": "bound-kappa-s", "kappa_C": "bound-kappa-c",
    "kappa_E": "bound-kappa-e", "R*": "bound-rank-ideal", "sigma_bar": "bound-sigma-bar",
    "sigma_max": "bound-sigma-max", "T_bar (budget, not a bound constant)": "latency-budget",
}


# the channel and budget these tables were measured with (docs/RESULTS.md, *Wireless
# realism*): paper A's path loss d^-kappa with noise over the whole band, a 0.15 s budget,
# no deadline rule
PAPER_CHANNEL = {"path-loss-model": "paper", "bandwidth-noise": "total",
                 "noise-figure-db": 0.0, "latency-budget": 0.15, "tsfa-deadline": "off"}


def settings() -> dict[str, tuple[dict[str, Any], int]]:
    """name -> (run-config overrides, number of clients N)."""
    fig3c = next(r for r in experiments.fig3c_runs("cpu") if r.name == "tsfa").overrides
    return {
        "minilm": ({"preset": "quickstart", "strategy": "tsfa", "clients-per-round": 10,
                    **PAPER_CHANNEL}, 100),
        "fig3c": ({**fig3c, **PAPER_CHANNEL}, experiments.FEDERATION["cpu"].supernodes),
    }


def payload(cfg: dict[str, Any]) -> tuple[int, Any]:
    """sum(d + k) of the adapted layers and the server's real payload-size function."""
    work = workload.build_workload(cfg)
    shapes = lora.factor_shapes(work.model)
    heads = [v.numel() for v in lora.get_head(work.model).values()]
    fn = tsfa_plan.payload_bits_fn(cfg, [(s.name, s.d, s.k) for s in shapes], heads)
    return sum(s.d + s.k for s in shapes), fn


def r_star(cfg: dict[str, Any], n: int, dk: int, fn: Any) -> int | None:
    try:
        return tsfa_plan.plan(cfg, n, dk, fn).rank
    except (InfeasibleLatencyError, ValueError) as exc:
        if "infeasible" not in str(exc):
            raise
        return None  # no feasible rank


def scaled_cfg(cfg: dict[str, Any], key: str, s: float, cal: Path | None, tmp: Path) -> dict:
    """``cfg`` with ``key`` scaled by ``s``; sigma keys scale the calibration file's values."""
    out = dict(cfg)
    if cal is not None:
        out["bound-calibration"] = str(cal)
    if cal is not None and key in ("bound-sigma-bar", "bound-sigma-max"):
        data = json.loads(cal.read_text())
        field = "sigma_bar" if key == "bound-sigma-bar" else "sigma_max"
        data[field] = (np.asarray(data[field]) * s).tolist()
        path = tmp / f"cal-{field}-{s:g}.json"
        path.write_text(json.dumps(data))
        out["bound-calibration"] = str(path)
        return out
    value = float(cfg[key]) * s
    out[key] = max(value, 1.0) if key == "bound-rank-ideal" else value
    return out


def term_table(cfg: dict[str, Any], n: int, dk: int, fn: Any) -> list[dict[str, Any]]:
    """The baseline offline table with Phi0 split into its terms (A.8)."""
    plan = tsfa_plan.plan(cfg, n, dk, fn)
    b = plan.bound
    rows = []
    for r, row in plan.offline.table.items():
        rho = min(row.rho, 1 - 1e-12)
        rows.append({
            "rank": r, "rho_star": row.rho, "feasible": row.feasible,
            "sigma_bar_r": b.sigma_bar_at(r),
            "rank_term": b.kappa_R * max(b.r_star_ideal - r, 0) * b.sigma_bar_at(r) ** 2,
            "cov_term": b.kappa_C * r * b.sigma_max ** 2,
            "sparse_term": b.kappa_E * float(sparsification_term(rho, b.p)),
            "phi0": row.phi0, "chosen": r == plan.rank,
        })
    return rows


def run_setting(name: str, over: dict[str, Any], n: int, tmp: Path) -> dict[str, Any]:
    cfg = resolve({**over, "bound-calibration": ""}, ROOT / "conf")
    t0 = time.perf_counter()
    pdir = simulate_pilot(cfg, n, tmp / name / "pilot")
    pilot_s = time.perf_counter() - t0
    cal = calibrate_run(pdir)
    cal_path = write_calibration(tmp / name / "calibration.json", cal, source=f"bench {name}")
    dk, fn = payload(cfg)
    k = min(int(cfg["clients-per-round"]), n)
    print(f"\n== {name}: model {cfg['model']}, N = {n}, K = {k}, budget "
          f"{cfg['latency-budget']} s, tsfa-ranks {cfg['tsfa-ranks']}, sum(d+k) = {dk}")
    print(f"pilot: dense rank {cal.pilot_rank}, {cal.num_rounds} rounds x "
          f"{cfg['bound-pilot-local-steps']} steps, K = {k}: {pilot_s:.1f} s; measured "
          f"sigma_max = {cal.sigma_max:.4g}")
    ranks = [int(x) for x in str(cfg["tsfa-ranks"]).split(",")]
    print("sigma_bar_r at the candidate ranks: "
          + ", ".join(f"r={r}: {cal.sigma_bar[r - 1]:.4g}" for r in ranks)
          + f" (sigma_bar_1 / sigma_bar_{cal.pilot_rank} = "
          f"{cal.sigma_bar[0] / cal.sigma_bar[-1]:.3g})")
    tables = {}
    for label, path in (("default", None), ("calibrated", cal_path)):
        base = scaled_cfg(cfg, "bound-kappa-r", 1.0, path, tmp)
        tables[label] = term_table(base, n, dk, fn)
        print(f"baseline offline table, {label} spectra (terms of Phi0, A.8):")
        print(f"{'rank':>5} {'rho*':>7} {'sigma_bar':>10} {'(i) rank':>10} {'(iii) cov':>10} "
              f"{'(iv) sparse':>11} {'Phi0':>10}")
        for row in tables[label]:
            mark = "  <- r*" if row["chosen"] else ("" if row["feasible"] else "  infeasible")
            print(f"{row['rank']:>5} {row['rho_star']:>7.4f} {row['sigma_bar_r']:>10.4g} "
                  f"{row['rank_term']:>10.4g} {row['cov_term']:>10.4g} "
                  f"{row['sparse_term']:>11.4g} {row['phi0']:>10.4g}{mark}")
    sens = []
    print(f"r* with each constant scaled (default | calibrated spectra); x{SCALES}")
    print(f"{'constant':>38} " + " ".join(f"{'x' + format(s, 'g'):>9}" for s in SCALES))
    for label, key in CONSTANTS.items():
        row = {"constant": label, "key": key, "scales": list(SCALES)}
        for spectra, path in (("default", None), ("calibrated", cal_path)):
            row[spectra] = [r_star(scaled_cfg(cfg, key, s, path, tmp), n, dk, fn)
                            for s in SCALES]
        sens.append(row)
        cells = [f"{_s(a)}|{_s(b)}" for a, b in zip(row["default"], row["calibrated"],
                                                     strict=True)]
        print(f"{label:>38} " + " ".join(f"{c:>9}" for c in cells))
    p2 = {spectra: r_star({**scaled_cfg(cfg, "bound-kappa-r", 1.0, path, tmp), "bound-p": 2},
                          n, dk, fn)
          for spectra, path in (("default", None), ("calibrated", cal_path))}
    print(f"{'bound-p = 2 (instead of 1)':>38} {_s(p2['default'])}|{_s(p2['calibrated'])}")
    return {"setting": name, "num_clients": n, "clients_per_round": k,
            "overrides": over, "latency_budget": cfg["latency-budget"],
            "tsfa_ranks": ranks, "sum_d_plus_k": dk, "pilot_s": round(pilot_s, 2),
            "pilot": {"rank": cal.pilot_rank, "rounds": cal.num_rounds,
                      "local_steps": cfg["bound-pilot-local-steps"]},
            "sigma_bar": cal.sigma_bar.tolist(), "sigma_max": cal.sigma_max,
            "baseline_tables": tables, "sensitivity": sens, "bound_p2": p2}


def _s(r: int | None) -> str:
    return "-" if r is None else str(r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="minilm,fig3c")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    known = settings()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            over, n = known[name]
            results.append(run_setting(name, over, n, Path(tmp)))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "rank_sensitivity.json"
    path.write_text(json.dumps({
        "command": "python bench/rank_sensitivity.py " + " ".join(sys.argv[1:]),
        "host": platform.node(), "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - t0, 1),
        "scales": list(SCALES), "settings": results,
        "legend": "r* per scale; null = no feasible rank; 'default' = bound-sigma-bar = "
                  "bound-sigma-max = 1 for every rank, 'calibrated' = measured by the pilot",
    }, indent=2))
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
