"""Paper B calibration: alpha0, alpha1 and xi of R_eps (B.4) fitted to pilot loss curves.

The model. The objective of :mod:`fedsoft.sketching.optimizer` prices rounds to accuracy with (B.4)

    R_eps(q, k) = alpha0 S(q) + alpha1 V(q) + alpha1 xi W(q, k),
    S = 1 + max_n a_n (1 - q_n) / q_n,  V = sum_n a_n^2 / q_n,  W = sum_n a_n^2 (r / k_n - 1) / q_n,

which is *linear* in theta = (alpha0, alpha1, g = alpha1 xi). The 1/eps factor is absorbed
into theta: a fit measures R in rounds to the pilot's loss target, so J = R E[T] (B.5) becomes
the predicted seconds to that target. Only alpha0 / alpha1 and xi move the plan; the common
scale does not.

The pilot. Several short runs (or the ``auto`` pilot of the ServerApp, :func:`pilot_settings`)
at different (q, k) write ``metrics.jsonl`` (server-side test loss after every round, round 0 =
the initial model) and ``sampling_plan.json`` (q_n, k_n, examples per client). For each run the
rounds to a common loss decrease (``target-fraction`` x the smallest decrease any run achieved,
so that every run reaches it) are read off the running minimum of the loss curve, linearly
interpolated between rounds. Then theta solves a non-negative least-squares problem on the
*relative* residuals (R_model - R_meas) / R_meas.

Identifiability. S, V, W are the columns of the design matrix. Runs that all use one k make
W proportional to V (xi not identified); runs that all use one q (and equal shares) make S
and V constant (alpha0 / alpha1 not identified). The fit tries, in order: all three free; xi
fixed to the fallback; alpha0 / alpha1 fixed to the fallback ratio; both fixed (scale only).
It takes the first whose column-normalised design has condition number below ``MAX_COND``
and at least as many runs as free constants, and whose alpha1 is positive. Every constant
that was not fitted is listed under ``assumed`` and a warning says why (logged, and kept in
the JSON). With fewer than 2 runs nothing but the scale can be fitted.

``python -m fedsoft.sketching.calibration <pilot-run-dir> [...] [--out sketch_calibration.json]``
writes the JSON a run reads through ``sketch-calibration="<path>"``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

from fedsoft.durable import atomic_write_text
from fedsoft.sketching.optimizer import SketchObjective

__all__ = [
    "CALIBRATION_FILE",
    "PilotRun",
    "SketchCalibration",
    "design_row",
    "fill_losses",
    "fit_constants",
    "load_sketch_calibration",
    "pilot_settings",
    "read_pilot_run",
    "rounds_to_target",
    "write_sketch_calibration",
]

CALIBRATION_FILE = "sketch_calibration.json"
MAX_COND = 1e3
ALPHA1_FLOOR = 1e-2  # smallest alpha1 / alpha0 a boundary fit is given
LOG = logging.getLogger("fedsoft.sketching.calibration")


@dataclass(frozen=True)
class PilotRun:
    """One pilot setting: per-client q_n, k_n, data shares a_n, the rank, and the test loss
    after rounds 0..T."""

    name: str
    q: np.ndarray
    k: np.ndarray
    a: np.ndarray
    rank: int
    losses: np.ndarray


@dataclass
class SketchCalibration:
    """Fitted (or assumed) constants of R_eps (B.4) with the evidence behind them."""

    alpha0: float
    alpha1: float
    xi: float
    fitted: list[str]
    assumed: list[str]
    warnings: list[str] = field(default_factory=list)
    target_decrease: float = 0.0
    runs: list[dict[str, Any]] = field(default_factory=list)
    rel_rms_residual: float = float("nan")
    source: str = ""

    def objective(self) -> SketchObjective:
        """The :class:`SketchObjective` of these constants."""
        return SketchObjective(self.alpha0, self.alpha1, self.xi)


def design_row(q: np.ndarray, k: np.ndarray, a: np.ndarray, rank: int) -> np.ndarray:
    """(S, V, W) of one (q, k) setting: R_eps = alpha0 S + alpha1 V + alpha1 xi W (B.4)."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    a = a / a.sum()
    s = 1.0 + float(np.max(a * (1.0 - q) / q))
    v = float(np.sum(a**2 / q))
    w = float(np.sum(a**2 * (rank / k - 1.0) / q))
    return np.array([s, v, w])


def rounds_to_target(losses: Sequence[float], target: float) -> float | None:
    """First (fractional) round at which the running minimum of ``losses`` (index = round)
    reaches ``target``, linearly interpolated between rounds; None when it never does."""
    env = np.minimum.accumulate(np.asarray(losses, dtype=np.float64))
    if env.size == 0 or not np.all(np.isfinite(env)):
        return None
    if env[0] <= target:
        return 0.0
    hit = np.flatnonzero(env <= target)
    if hit.size == 0:
        return None
    t = int(hit[0])
    prev, cur = env[t - 1], env[t]
    return float(t - 1 + (prev - target) / max(prev - cur, 1e-300))


def pilot_settings(rank: int, q_budget: float) -> list[tuple[str, float, int]]:
    """The ``auto`` pilot design: (name, q, k) with two q values x two k values, so S, V and W
    all vary (each constant identifiable): q in {1, q_budget}, k in {r, max(1, r // 4)}.
    With q_budget = 1 or r < 2 a level collapses and :func:`fit_constants` says so."""
    k_lo = max(1, rank // 4)
    out = [("q1-kr", 1.0, rank), (f"q1-k{k_lo}", 1.0, k_lo),
           (f"q{q_budget:g}-kr", float(q_budget), rank),
           (f"q{q_budget:g}-k{k_lo}", float(q_budget), k_lo)]
    seen, uniq = set(), []
    for name, q, k in out:
        if (q, k) not in seen:
            seen.add((q, k))
            uniq.append((name, q, k))
    return uniq


def read_pilot_run(run_dir: Path | str) -> PilotRun:
    """A pilot from a run directory: ``sampling_plan.json`` (per-client q, k, examples),
    ``config.json`` (lora-rank) and ``metrics.jsonl`` (loss per round)."""
    d = Path(run_dir)
    plan = json.loads((d / "sampling_plan.json").read_text())
    cfg = json.loads((d / "config.json").read_text())
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    by_round = {int(r["round"]): float(r["loss"]) for r in rows if "loss" in r}
    if 0 not in by_round:
        raise ValueError(f"{d}: metrics.jsonl has no round-0 (initial) loss")
    last = max(by_round)
    losses = np.array([by_round.get(t, np.nan) for t in range(last + 1)])
    losses = fill_losses(losses)
    clients = plan["clients"]
    return PilotRun(
        name=d.name,
        q=np.array([float(c["q"]) for c in clients]),
        k=np.array([int(c["k"]) for c in clients]),
        a=np.array([float(c["examples"]) for c in clients]),
        rank=int(cfg["lora-rank"]),
        losses=losses,
    )


def fill_losses(losses: np.ndarray) -> np.ndarray:
    """Carry the last loss over rounds without a value (a skipped or resumed round)."""
    out = losses.copy()
    for t in range(1, out.size):
        if not np.isfinite(out[t]):
            out[t] = out[t - 1]
    return out


def _cond(cols: np.ndarray) -> float:
    """Condition number of the column-normalised design (inf when a column is zero)."""
    norms = np.linalg.norm(cols, axis=0)
    if cols.shape[0] < cols.shape[1] or np.any(norms <= 0):
        return float("inf")
    sv = np.linalg.svd(cols / norms, compute_uv=False)
    return float(sv[0] / max(sv[-1], 1e-300))


def _scale_model(ratio: float, xi: float) -> tuple[np.ndarray, Any]:
    """R = alpha1 (ratio S + V + xi W): only the common scale is free."""
    return np.array([[ratio], [1.0], [xi]]), lambda p: (ratio * p[0], p[0], xi)


def fit_constants(runs: Sequence[PilotRun], fallback: SketchObjective | None = None, *,
                  target_fraction: float = 0.8, source: str = "") -> SketchCalibration:
    """Least-squares alpha0, alpha1, xi of R_eps (B.4) from pilot loss curves (see the module
    docstring); constants the pilot cannot identify keep ``fallback``'s values (listed in
    ``assumed``, with a logged warning)."""
    fb = fallback or SketchObjective()
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction = {target_fraction}: must be in (0, 1]")
    warnings: list[str] = []
    if not runs:
        raise ValueError("no pilot runs given")
    bad = [r.name for r in runs if r.losses.size < 2 or not np.all(np.isfinite(r.losses))]
    if bad:
        warnings.append(f"pilot runs {bad} have no finite loss curve of >= 2 points: left out")
        runs = [r for r in runs if r.name not in bad]
    if not runs:
        cal = SketchCalibration(fb.alpha0, fb.alpha1, fb.xi, [], ["alpha0", "alpha1", "xi"],
                                warnings, 0.0, [], float("nan"), source)
        for w in warnings:
            LOG.warning("sketch calibration: %s", w)
        return cal
    drops = [float(r.losses[0] - np.min(r.losses)) for r in runs]
    decrease = target_fraction * min(drops)
    rows, meas, table = [], [], []
    if decrease <= 0:
        warnings.append(f"a pilot run never lowered its loss (decreases {drops}): nothing to "
                        "fit; every constant assumed")
    else:
        for run in runs:
            r_meas = rounds_to_target(run.losses, float(run.losses[0]) - decrease)
            row = design_row(run.q, run.k, run.a, run.rank)
            table.append({"name": run.name, "rounds_to_target": r_meas,
                          "S": row[0], "V": row[1], "W": row[2],
                          "sum_q": float(run.q.sum()), "mean_k": float(run.k.mean()),
                          "rank": run.rank, "rounds": int(run.losses.size - 1),
                          "losses": [float(v) for v in run.losses]})
            if r_meas is not None and r_meas > 0:
                rows.append(row)
                meas.append(r_meas)
    x = np.array(rows).reshape(-1, 3)
    y = np.array(meas)
    chosen = None
    if y.size:
        chosen = _fit(x, y, fb, warnings)
    if chosen is None:
        cal = SketchCalibration(fb.alpha0, fb.alpha1, fb.xi, [], ["alpha0", "alpha1", "xi"],
                                warnings, decrease, table, float("nan"), source)
    else:
        names, (a0, a1, xi), pred = chosen
        fitted = list(names)
        assumed = {"alpha0+alpha1+xi": [], "alpha0+alpha1": ["xi"],
                   "alpha1+xi": ["alpha0/alpha1"], "scale": ["alpha0/alpha1", "xi"]}[
            "+".join(names)]
        rel = (pred - y) / y
        for t, p in zip([t for t in table if t["rounds_to_target"]], pred, strict=True):
            t["rounds_predicted"] = float(p)
        cal = SketchCalibration(a0, a1, xi, fitted, assumed, warnings, decrease, table,
                                float(np.sqrt(np.mean(rel**2))), source)
    for w in cal.warnings:
        LOG.warning("sketch calibration: %s", w)
    return cal


def _fit(x: np.ndarray, y: np.ndarray, fb: SketchObjective, warnings: list[str]
         ) -> tuple[list[str], tuple[float, float, float], np.ndarray]:
    """Non-negative least squares of (X M phi - y) / y for the most complete identifiable
    model (module docstring); returns (fitted names, (alpha0, alpha1, xi), predicted R)."""
    xw = x / y[:, None]  # relative residuals: (X theta - y) / y
    ones = np.ones(y.size)
    ratio = fb.alpha0 / fb.alpha1
    c_all = _cond(xw)
    c_q = _cond(xw[:, :2])  # S vs V: do the pilots vary q (alpha0 vs alpha1)?
    c_k = _cond(xw[:, 1:])  # V vs W: do the pilots vary k (xi)?
    cands: list[tuple[list[str], np.ndarray, Any]] = []
    if c_all <= MAX_COND:
        cands.append((["alpha0", "alpha1", "xi"], np.eye(3),
                      lambda p: (p[0], p[1], p[2] / p[1] if p[1] > 0 else 0.0)))
    else:
        warnings.append(f"cannot fit alpha0, alpha1 and xi together from {y.size} pilot "
                        f"run(s): design condition number {c_all:.3g} > {MAX_COND:g}")
    if c_q <= MAX_COND:
        cands.append((["alpha0", "alpha1"],
                      np.array([[1.0, 0.0], [0.0, 1.0], [0.0, fb.xi]]),
                      lambda p: (p[0], p[1], fb.xi)))
    if c_k <= MAX_COND:
        cands.append((["alpha1", "xi"], np.array([[ratio, 0.0], [1.0, 0.0], [0.0, 1.0]]),
                      lambda p: (ratio * p[0], p[0], p[1] / p[0] if p[0] > 0 else 0.0)))
    if c_k > MAX_COND:
        warnings.append(f"xi is not identified (the pilots' k barely varies: condition "
                        f"{c_k:.3g}); assumed xi = {fb.xi:g}")
    if c_q > MAX_COND:
        warnings.append(f"alpha0/alpha1 is not identified (the pilots' q barely varies: "
                        f"condition {c_q:.3g}); assumed alpha0/alpha1 = {ratio:g}")
    for names, m, to_abc in cands:
        phi, _ = nnls(xw @ m, ones)
        a0, a1, xi = to_abc(phi)
        if a1 > 0 and np.isfinite(xi):
            return names, (float(a0), float(a1), float(xi)), x @ m @ phi
        if names == ["alpha0", "alpha1"] and a0 > 0:
            # boundary: the pilots' rounds depend on q less than any alpha1 > 0 allows
            m1, f1 = _scale_model(1.0 / ALPHA1_FLOOR, fb.xi)
            p1, _ = nnls(xw @ m1, ones)
            warnings.append(f"the least-squares alpha1 is 0 (the pilots' rounds to target depend "
                            f"on q less than the model's alpha0 term alone predicts); alpha1 set "
                            f"to {ALPHA1_FLOOR:g} x alpha0, the boundary")
            a0, a1, xi = f1(p1)
            return names, (float(a0), float(a1), float(xi)), x @ m1 @ p1
        warnings.append(f"the fit of {'+'.join(names)} put alpha1 at 0")
    m, f = _scale_model(ratio, fb.xi)
    phi, _ = nnls(xw @ m, ones)
    return ["scale"], tuple(float(v) for v in f(phi)), x @ m @ phi  # type: ignore[return-value]


def calibration_json(cal: SketchCalibration) -> dict[str, Any]:
    """``cal`` as the JSON object of a ``sketch_calibration.json``."""
    return json.loads(json.dumps(asdict(cal), default=float))


def write_sketch_calibration(path: Path | str, cal: SketchCalibration) -> Path:
    """Write ``cal`` as JSON (the file ``sketch-calibration`` reads)."""
    p = Path(path)
    atomic_write_text(p, json.dumps(calibration_json(cal), indent=2) + "\n")
    return p


def load_sketch_calibration(path: Path | str) -> SketchCalibration:
    """Read a ``sketch_calibration.json``; a ValueError names the file when it is malformed."""
    p = Path(path)
    try:
        raw: Mapping[str, Any] = json.loads(p.read_text())
        cal = SketchCalibration(**{k: raw[k] for k in (
            "alpha0", "alpha1", "xi", "fitted", "assumed")},
            warnings=list(raw.get("warnings", [])),
            target_decrease=float(raw.get("target_decrease", 0.0)),
            runs=list(raw.get("runs", [])),
            rel_rms_residual=float("nan") if raw.get("rel_rms_residual") is None
            else float(raw["rel_rms_residual"]),  # JSON null (NaN written by plain json) too
            source=str(raw.get("source", "")))
        cal.objective()  # range checks
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{p}: not a sketch calibration ({type(exc).__name__}: {exc})") from exc
    return cal


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: fit the constants to pilot run dirs and write ``sketch_calibration.json``."""
    ap = argparse.ArgumentParser(
        prog="python -m fedsoft.sketching.calibration",
        description="Fit alpha0, alpha1, xi of paper B's R_eps (B.4) to pilot runs' loss curves")
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path(CALIBRATION_FILE))
    ap.add_argument("--target-fraction", type=float, default=0.8)
    ap.add_argument("--alpha0", type=float, default=1.0, help="fallback when not identifiable")
    ap.add_argument("--alpha1", type=float, default=1.0, help="fallback when not identifiable")
    ap.add_argument("--xi", type=float, default=0.5, help="fallback when not identifiable")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    runs = [read_pilot_run(d) for d in args.run_dirs]
    cal = fit_constants(runs, SketchObjective(args.alpha0, args.alpha1, args.xi),
                        target_fraction=args.target_fraction,
                        source=" ".join(str(d) for d in args.run_dirs))
    write_sketch_calibration(args.out, cal)
    for t in cal.runs:
        pred = t.get("rounds_predicted")
        print(f"{t['name']:>24}: sum q {t['sum_q']:.2f}, mean k {t['mean_k']:.2f}/{t['rank']}, "
              f"rounds to target {t['rounds_to_target']}, model "
              f"{'-' if pred is None else f'{pred:.2f}'}")
    print(f"alpha0 = {cal.alpha0:.4g}, alpha1 = {cal.alpha1:.4g}, xi = {cal.xi:.4g} "
          f"(fitted: {', '.join(cal.fitted) or 'none'}; assumed: "
          f"{', '.join(cal.assumed) or 'none'}); relative rms residual "
          f"{cal.rel_rms_residual:.3g}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
