"""Figures and summary tables of the experiments, from their JSONL files only.

``python -m fedsoft.experiments.plots <exp-dir> [<exp-dir> ...] [--markdown] [--target-frac 0.9]
[--export DEST]`` redraws
``<exp-dir>/<NAME>.png`` (``<exp-dir>`` = ``runs/experiments/<NAME>/<scale>``) from
``runs.jsonl`` + each run's ``metrics.jsonl`` (+ ``gram.jsonl`` for fig4, ``timings.jsonl``
for fig2) and, with ``--markdown``, prints the summary table: final accuracy (mean ± std over
seeds), total uplink, uplink bytes (and rounds, simulated seconds) until the accuracy first
reaches ``target-frac`` x the reference accuracy (dense LoRA's final accuracy where the panel
has a dense run, else the best series' final accuracy).

:func:`figure_series` returns exactly the data a figure plots, for tests and other tools.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsoft.runlog import read_metrics

RUN_INDEX = "runs.jsonl"
TIMINGS = "timings.jsonl"
GRAM = "gram.jsonl"
DEFAULT_TARGET_FRAC = 0.9

# per figure: (x key, [(y key, y label, log-y)]); "round" is the round index
CURVES: dict[str, tuple[str, list[tuple[str, str, bool]]]] = {
    "fig3ab": ("round", [("accuracy", "test accuracy", False)]),
    "fig3c": ("round", [("accuracy", "test accuracy", False),
                        ("sparsity", "sparsification ratio rho", False)]),
    "fig4": ("round", [("accuracy", "test accuracy", False)]),
    "fig56": ("round", [("cov_fro", "||Cov(B, A)||_F", True),
                        ("accuracy", "test accuracy", False)]),
    "fig7": ("round", [("accuracy", "test accuracy", False)]),
    "figB": ("sim_wallclock_s", [("accuracy", "test accuracy", False)]),
    "fig3c-long": ("round", [("accuracy", "test accuracy", False),
                             ("sparsity", "sparsification ratio rho", False),
                             ("latency_avg_s", "realised average latency [s]", False)]),
    "figB-het": ("sim_wallclock_s", [("accuracy", "test accuracy", False)]),
    # issue 16: accuracy against rounds and against cumulative bytes in both directions
    "wire-90": ("round", [("accuracy", "test accuracy", False),
                          ("accuracy", "test accuracy", False, "cum_mb")]),
    "wire-99": ("round", [("accuracy", "test accuracy", False),
                          ("accuracy", "test accuracy", False, "cum_mb")]),
    "wire-defaults": ("round", [("accuracy", "test accuracy", False),
                                ("accuracy", "test accuracy", False, "cum_mb")]),
}
XLABELS = {"round": "round", "sim_wallclock_s": "simulated wall-clock [s]",
           "cum_mb": "cumulative bytes, uplink + downlink [MB]"}


def _curve_specs(name: str) -> tuple[str, list[tuple[str, str, bool, str, str]]]:
    """(figure x, [(y, y label, log-y, x, panel key)]): a curve may override the x; its panel
    key is ``y`` for the figure's x and ``y@x`` otherwise."""
    x, ys = CURVES.get(name, ("round", [("accuracy", "test accuracy", False)]))
    out = []
    for entry in ys:
        y, lab, logy = entry[:3]
        cx = entry[3] if len(entry) > 3 else x
        out.append((y, lab, logy, cx, y if cx == x else f"{y}@{cx}"))
    return x, out


def with_cumulative(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows plus ``cum_mb``: uplink + downlink bytes of rounds 0..t, in MB (10^6 bytes)."""
    total = 0
    out = []
    for r in metrics:
        total += int(r.get("uplink_bytes", 0) or 0) + int(r.get("downlink_bytes", 0) or 0)
        out.append({**r, "cum_mb": total / 1e6})
    return out


def experiment_name(exp_dir: Path) -> str:
    """From ``experiment.json`` if present, else the directory layout ``<NAME>/<scale>``."""
    meta = Path(exp_dir) / "experiment.json"
    if meta.is_file():
        try:
            return str(json.loads(meta.read_text())["experiment"])
        except (ValueError, KeyError):
            pass
    return Path(exp_dir).resolve().parent.name


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_metrics(path)


def load_runs(exp_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``runs.jsonl`` that finished, each with its ``metrics`` rows attached."""
    exp_dir = Path(exp_dir)
    if not (exp_dir / RUN_INDEX).is_file():
        raise FileNotFoundError(f"{exp_dir / RUN_INDEX} not found: plot the output directory of "
                                "a finished `python -m fedsoft.experiments NAME` call")
    out = []
    for row in read_jsonl(exp_dir / RUN_INDEX):
        if row.get("status", "done") != "done":
            continue
        metrics = exp_dir / row["run_dir"] / "metrics.jsonl"
        if not metrics.is_file():
            continue
        out.append({**row, "metrics": with_cumulative(read_jsonl(metrics))})
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if len(values) == 1:
        return float(values[0]), 0.0
    return float(statistics.fmean(values)), float(statistics.stdev(values))


def _x_of(row: dict[str, Any], x: str) -> float | None:
    if x == "round":
        return float(row["round"])
    if row.get("round") == 0 and row.get(x) is None:
        return 0.0  # round 0 = the initial model: no simulated time yet
    v = row.get(x)
    return None if v is None else float(v)


def curves(runs: list[dict[str, Any]], x: str, y: str) -> dict[str, dict[str, dict[str, Any]]]:
    """``{panel: {series: {"x", "y", "y_std", "seeds"}}}``: y (and x) averaged over seeds at
    each round index that every seed of the series has; rows without ``y`` are left out."""
    groups: dict[tuple[str, str], list[list[dict[str, Any]]]] = defaultdict(list)
    for run in runs:
        groups[(run.get("panel", ""), run["series"])].append(run["metrics"])
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (panel, series), per_seed in groups.items():
        by_round = [{int(r["round"]): r for r in m} for m in per_seed]
        common = sorted(set.intersection(*(set(b) for b in by_round)))
        xs, ys, stds = [], [], []
        for rnd in common:
            rows = [b[rnd] for b in by_round]
            yv = [r.get(y) for r in rows]
            xv = [_x_of(r, x) for r in rows]
            if any(v is None for v in yv) or any(v is None for v in xv):
                continue
            m, s = _mean_std([float(v) for v in yv])
            xs.append(statistics.fmean(xv))
            ys.append(m)
            stds.append(s)
        out.setdefault(panel, {})[series] = {"x": xs, "y": ys, "y_std": stds,
                                             "seeds": len(per_seed)}
    return out


def timing_series(exp_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """fig2: ``{"rank" | "size": {method: {"x", "y" (median seconds, mean over seeds),
    "y_std", "seeds", "fixed"}}}``; x is r for the rank sweep and d = k for the size sweep."""
    rows = read_jsonl(Path(exp_dir) / TIMINGS)
    acc: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    fixed: dict[str, int] = {}
    for r in rows:
        xval = r["r"] if r["sweep"] == "rank" else r["d"]
        acc[(r["sweep"], r["method"], int(xval))].append(float(r["seconds"]))
        fixed[r["sweep"]] = r["d"] if r["sweep"] == "rank" else r["r"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (sweep, method, xval) in sorted(acc):
        vals = acc[(sweep, method, xval)]
        m, s = _mean_std(vals)
        d = out.setdefault(sweep, {}).setdefault(
            method, {"x": [], "y": [], "y_std": [], "seeds": len(vals), "fixed": fixed[sweep]})
        d["x"].append(xval)
        d["y"].append(m)
        d["y_std"].append(s)
    return out


def _normalised(g: list[list[float]]) -> list[list[float]]:
    """|G_ij| / sqrt(G_ii G_jj) (1 on the diagonal; 0 where a diagonal entry is 0)."""
    n = len(g)
    diag = [g[i][i] for i in range(n)]
    return [[abs(g[i][j]) / math.sqrt(diag[i] * diag[j]) if diag[i] > 0 and diag[j] > 0 else 0.0
             for j in range(n)] for i in range(n)]


def gram_series(exp_dir: Path, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """fig4: per series (seed 0's run): the normalised Gram matrices |G_ij|/sqrt(G_ii G_jj) of
    Bᵀ B and A Aᵀ averaged over layers, and the mean orth_offdiag of the layers."""
    out: dict[str, dict[str, Any]] = {}
    for run in sorted(runs, key=lambda r: r.get("seed", 0)):
        path = Path(exp_dir) / run["run_dir"] / GRAM
        if run["series"] in out or not path.is_file():
            continue
        layers = read_jsonl(path)
        if not layers:
            continue
        n = len(layers[0]["AAt"])
        mats = {}
        for key in ("BtB", "AAt"):
            acc = [[0.0] * n for _ in range(n)]
            for layer in layers:
                g = _normalised(layer[key])
                for i in range(n):
                    for j in range(n):
                        acc[i][j] += g[i][j] / len(layers)
            mats[key] = acc
        out[run["series"]] = {**mats, "layers": len(layers), "r": n,
                              "orth_offdiag": statistics.fmean(lay["orth_offdiag"]
                                                               for lay in layers)}
    return out


def figure_series(exp_dir: Path) -> dict[str, Any]:
    """Everything the figure of ``exp_dir`` plots: ``{"experiment", "x", "panels": {y key:
    curves}}`` (fig2: ``{"experiment", "timings"}``; fig4 adds ``"gram"``)."""
    exp_dir = Path(exp_dir)
    name = experiment_name(exp_dir)
    if name == "fig2":
        return {"experiment": name, "timings": timing_series(exp_dir)}
    runs = load_runs(exp_dir)
    x, specs = _curve_specs(name)
    out: dict[str, Any] = {"experiment": name, "x": x,
                           "panels": {key: curves(runs, cx, y) for y, _, _, cx, key in specs}}
    if name == "fig4":
        out["gram"] = gram_series(exp_dir, runs)
    return out


# ----------------------------------------------------------------------------- summary


def to_target(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """Uplink bytes summed over rounds 1..t, t = the first round with accuracy >= target (round
    0, the initial model, counts with 0 bytes), the same with the downlink (``both_bytes``);
    plus t and the simulated clock when logged."""
    sent = both = 0
    clock = any("sim_wallclock_s" in r for r in rows)  # sketch runs (paper B) only
    for r in rows:
        sent += int(r.get("uplink_bytes", 0) or 0)
        both += int(r.get("uplink_bytes", 0) or 0) + int(r.get("downlink_bytes", 0) or 0)
        if r.get("accuracy") is not None and r["accuracy"] >= target - 1e-9:  # float slack
            sim = r.get("sim_wallclock_s", 0.0 if r["round"] == 0 else None) if clock else None
            return {"bytes": sent, "both_bytes": both, "round": int(r["round"]), "sim_s": sim}
    return None


# per figure: extra summary columns (metric key, column label), each the mean over rounds
# 1..T of the key in one run, then mean ± std over seeds; "final:KEY" is the key's value in the
# last round that logs it and "final:KEY/OTHER" the ratio of two such values (see run_value)
EXTRA_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "fig3c": [("rank", "rank"), ("sparsity", "mean rho"), ("latency_s", "mean latency s"),
              ("queue", "mean queue s")],
    "fig56": [("cov_fro", "mean cov_fro")],
    "figB": [("sim_round_s", "mean sim. round s")],
    # the realised average latency is the controller's running mean after the last round, so
    # "final:", not the mean over rounds of a running mean
    "fig3c-long": [("rank", "rank"), ("sparsity", "mean rho"),
                   ("final:latency_avg_s", "realised avg latency s"),
                   ("final:latency_budget_s", "budget s"),
                   ("final:latency_avg_s/latency_budget_s", "avg latency / budget"),
                   ("outage", "mean outage (clients/round)"), ("queue", "mean queue s")],
    "figB-het": [("sim_round_s", "mean sim. round s"), ("participants", "mean participants"),
                 ("final:sim_wallclock_s", "sim. s total")],
}


def round_mean(metrics: Sequence[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over rounds >= 1 where it is logged (None if never)."""
    vals = [float(m[key]) for m in metrics if m.get("round", 0) >= 1 and m.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def final_value(metrics: Sequence[dict[str, Any]], key: str) -> float | None:
    """``key`` in the last round >= 1 that logs it (None if never)."""
    for m in reversed(metrics):
        if m.get("round", 0) >= 1 and m.get(key) is not None:
            return float(m[key])
    return None


def run_value(metrics: Sequence[dict[str, Any]], key: str) -> float | None:
    """One run's value of an EXTRA_COLUMNS key: ``KEY`` = :func:`round_mean`, ``final:KEY`` =
    :func:`final_value`, ``final:KEY/OTHER`` = their final values' ratio (None if missing)."""
    if not key.startswith("final:"):
        return round_mean(metrics, key)
    num, _, den = key[len("final:"):].partition("/")
    top = final_value(metrics, num)
    if not den:
        return top
    bottom = final_value(metrics, den)
    return None if top is None or not bottom else top / bottom


def summary(exp_dir: Path, target_frac: float = DEFAULT_TARGET_FRAC) -> list[dict[str, Any]]:
    """One row per (panel, series): seeds, final accuracy mean/std, total uplink, cost to the
    target accuracy (``target_frac`` x reference; reference = dense's mean final accuracy in
    the panel, else the best series')."""
    runs = load_runs(Path(exp_dir))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run.get("panel", ""), run["series"])].append(run)
    finals = {g: statistics.fmean(r["metrics"][-1]["accuracy"] for r in rs)
              for g, rs in groups.items()}
    extra = EXTRA_COLUMNS.get(experiment_name(Path(exp_dir)), [])
    out = []
    for (panel, series), rs in groups.items():
        cols = {}
        for key, _ in extra:
            vals = [v for r in rs if (v := run_value(r["metrics"], key)) is not None]
            cols[key] = _mean_std(vals) if vals else None
        in_panel = {s: a for (p, s), a in finals.items() if p == panel}
        ref_name = "dense" if "dense" in in_panel else max(in_panel, key=in_panel.get)
        # final accuracy minus the reference's, paired by seed (the seed fixes the data split,
        # the sampling and the channel, so this removes most of the seed-to-seed spread)
        ref_by_seed = {r.get("seed", 0): r["metrics"][-1]["accuracy"]
                       for r in groups[(panel, ref_name)]}
        deltas = [r["metrics"][-1]["accuracy"] - ref_by_seed[r.get("seed", 0)]
                  for r in rs if r.get("seed", 0) in ref_by_seed]
        target = target_frac * in_panel[ref_name]
        hits = [to_target(r["metrics"], target) for r in rs]
        reached = [h for h in hits if h is not None]
        acc_m, acc_s = _mean_std([r["metrics"][-1]["accuracy"] for r in rs])
        sims = [h["sim_s"] for h in reached if h.get("sim_s") is not None]
        out.append({
            "panel": panel, "series": series, "seeds": len(rs),
            "rounds": int(rs[0]["metrics"][-1]["round"]),
            "final_acc_mean": acc_m, "final_acc_std": acc_s,
            "uplink_bytes_total": statistics.fmean(
                sum(int(m.get("uplink_bytes", 0) or 0) for m in r["metrics"]) for r in rs),
            "reference": ref_name, "target_acc": target, "target_frac": target_frac,
            "reached": len(reached),
            "bytes_to_target": statistics.fmean(h["bytes"] for h in reached) if reached else None,
            "both_bytes_to_target": (statistics.fmean(h["both_bytes"] for h in reached)
                                     if reached else None),
            "total_bytes": statistics.fmean(
                sum(int(m.get("uplink_bytes", 0) or 0) + int(m.get("downlink_bytes", 0) or 0)
                    for m in r["metrics"]) for r in rs),
            "rounds_to_target": statistics.fmean(h["round"] for h in reached) if reached else None,
            "sim_s_to_target": statistics.fmean(sims) if sims else None,
            "wall_s": sum(float(r.get("wall_s") or 0.0) for r in rs),
            "reused": sum(1 for r in rs if r.get("reused_from")),
            "extra": cols,
            "delta_vs_ref": _mean_std(deltas) if deltas and series != ref_name else None,
            "paired_seeds": len(deltas),
        })
    return out


def _mb(b: float | None) -> str:
    return "not reached" if b is None else f"{b / 1e6:.3f}"


def markdown(exp_dir: Path, target_frac: float = DEFAULT_TARGET_FRAC) -> str:
    """The summary as a Markdown table (numbers straight from the JSONL files)."""
    rows = summary(exp_dir, target_frac)
    if not rows:
        return "(no finished runs)"
    sim = any(r["sim_s_to_target"] is not None for r in rows)
    head = ["panel", "series", "seeds", "rounds", "final acc", "uplink total MB",
            f"target acc ({target_frac:g} x ref)", "MB to target", "rounds to target"]
    if sim:
        head.append("sim. s to target")
    paired = any(r["delta_vs_ref"] is not None and r["paired_seeds"] > 1 for r in rows)
    if paired:
        head.append("final acc - ref, paired by seed")
    both = any(r["total_bytes"] > r["uplink_bytes_total"] for r in rows)
    if both:
        head += ["up + down total MB", "up + down MB to target"]
    extra = EXTRA_COLUMNS.get(experiment_name(Path(exp_dir)), [])
    head += [label for _, label in extra]
    head.append("run wall s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = f"{r['final_acc_mean']:.4f}"
        if r["seeds"] > 1:
            acc += f" ± {r['final_acc_std']:.4f}"
        mb = _mb(r["bytes_to_target"])
        if r["reached"] not in (0, r["seeds"]):
            mb += f" ({r['reached']}/{r['seeds']} seeds)"
        cells = [r["panel"] or "-", r["series"], str(r["seeds"]), str(r["rounds"]), acc,
                 f"{r['uplink_bytes_total'] / 1e6:.3f}",
                 f"{r['target_acc']:.4f} ({r['reference']})", mb,
                 "-" if r["rounds_to_target"] is None else f"{r['rounds_to_target']:g}"]
        if sim:
            cells.append("-" if r["sim_s_to_target"] is None else f"{r['sim_s_to_target']:.1f}")
        if paired:
            d = r["delta_vs_ref"]
            cells.append("-" if d is None or r["paired_seeds"] < 2 else
                         f"{d[0]:+.4f} ± {d[1]:.4f} ({r['paired_seeds']} seeds)")
        if both:
            cells += [f"{r['total_bytes'] / 1e6:.3f}", _mb(r["both_bytes_to_target"])]
        for key, _ in extra:
            v = r["extra"].get(key)
            cells.append("-" if v is None else f"{v[0]:.4g}" + (f" ± {v[1]:.2g}" if r["seeds"] > 1
                                                                else ""))
        cells.append(f"{r['wall_s']:.0f}" + (" (copied)" if r["reused"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- drawing


def _title(exp_dir: Path) -> str:
    meta = Path(exp_dir) / "experiment.json"
    if meta.is_file():
        try:
            m = json.loads(meta.read_text())
            return f"{m.get('title', m.get('experiment'))} [{m.get('scale')} scale]"
        except ValueError:
            pass
    return experiment_name(exp_dir)


def natural_key(text: str) -> list[Any]:
    """Sort key that orders numbers inside labels by value: "r = 4" before "r = 16"."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t)
            for t in re.split(r"(\d+)", text) if t]


def _plot_curves(ax, panel: dict[str, dict[str, Any]], logy: bool) -> None:
    import matplotlib

    many = len(panel) > 10  # more series than the default cycle has colours
    palette = matplotlib.colormaps["tab20"] if many else None
    for i, (series, c) in enumerate(sorted(panel.items(), key=lambda kv: natural_key(kv[0]))):
        if not c["x"]:
            continue
        style = {"color": palette(i % 20)} if palette is not None else {}
        if series.endswith((" int8", " int4", " float16")):  # a quantised variant: dashed
            style["linestyle"] = "--"
        line, = ax.plot(c["x"], c["y"], marker="o", ms=3, label=series, **style)
        if c["seeds"] > 1:
            lo = [m - s for m, s in zip(c["y"], c["y_std"], strict=True)]
            hi = [m + s for m, s in zip(c["y"], c["y_std"], strict=True)]
            ax.fill_between(c["x"], lo, hi, color=line.get_color(), alpha=0.2)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def draw(exp_dir: Path, out: Path | None = None) -> Path:
    """Draw the figure of ``exp_dir`` to ``out`` (default ``<exp_dir>/<NAME>.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    exp_dir = Path(exp_dir)
    data = figure_series(exp_dir)
    name = data["experiment"]
    out = Path(out) if out is not None else exp_dir / f"{name}.png"
    if name == "fig2":
        t = data["timings"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, sweep, xl in ((axes[0], "rank", "LoRA rank r"), (axes[1], "size", "d = k")):
            per = t.get(sweep, {})
            fixed = next(iter(per.values()))["fixed"] if per else None
            for method, c in sorted(per.items()):
                label = "SOFT (eqs. 8-9)" if method == "soft" else "product + SVD"
                ax.errorbar(c["x"], c["y"], yerr=c["y_std"] if c["seeds"] > 1 else None,
                            marker="o", label=label)
            ax.set_yscale("log")
            ax.set_xlabel(xl)
            ax.set_ylabel("selection time [s] (median)")
            ax.set_title(f"({'a' if sweep == 'rank' else 'b'}) "
                         + (f"d = k = {fixed}" if sweep == "rank" else f"r = {fixed}"))
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    else:
        _, specs = _curve_specs(name)
        cells = [(key, lab, logy, p, cx) for _, lab, logy, cx, key in specs
                 for p in sorted(data["panels"][key], key=natural_key)]
        gram = data.get("gram", {})
        if gram:  # fig4: one row of heat maps (Bᵀ B, A Aᵀ) per series, curves on the right
            nrows = len(gram)
            fig = plt.figure(figsize=(4.0 * (2 + len(cells)), 3.6 * nrows))
            grid = fig.add_gridspec(nrows, 2 + len(cells))
            for i, (series, g) in enumerate(sorted(gram.items())):
                for j, (key, lab) in enumerate((("BtB", "Bᵀ B"), ("AAt", "A Aᵀ"))):
                    ax = fig.add_subplot(grid[i, j])
                    im = ax.imshow(g[key], cmap="viridis", vmin=0.0, vmax=1.0)
                    ax.set_title(f"{lab}, {series}: |G_ij|/sqrt(G_ii G_jj)\nmean of "
                                 f"{g['layers']} layers, orth_offdiag "
                                 f"{g['orth_offdiag']:.3g}", fontsize=8)
                    ticks = list(range(g["r"]))
                    ax.set_xticks(ticks)
                    ax.set_yticks(ticks)
                    fig.colorbar(im, ax=ax, fraction=0.046)
            axes = [fig.add_subplot(grid[:, 2 + c]) for c in range(len(cells))]
        else:
            fig, grid_axes = plt.subplots(1, max(len(cells), 1),
                                          figsize=(max(4.6 * len(cells), 7.0), 3.8),
                                          squeeze=False)
            axes = list(grid_axes[0])
        for ax, (y, lab, logy, panel, cx) in zip(axes, cells, strict=False):
            _plot_curves(ax, data["panels"][y][panel], logy)
            ax.set_xlabel(XLABELS.get(cx, cx))
            ax.set_ylabel(lab)
            if cx == "cum_mb":
                ax.set_xscale("log")
            if cx == "round":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if panel:
                ax.set_title(panel)
    title = _title(exp_dir)
    seeds = max((c["seeds"] for panels in data.get("panels", {}).values()
                 for panel in panels.values() for c in panel.values()), default=1)
    if seeds > 1:
        title += f"; mean ± std (band) over {seeds} seeds"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# what a figure and its tables are drawn from (plus the run's settings), nothing heavier:
# no adapters, client error memories or logs
EXPORT_FILES = ("experiment.json", RUN_INDEX, TIMINGS)
EXPORT_RUN_FILES = ("metrics.jsonl", "config.json", "run.json", GRAM, "offline.json",
                    "sampling_plan.json")


def export(exp_dir: Path, dest: Path) -> Path:
    """Copy the JSON/JSONL an experiment's figure and tables come from to ``dest``.

    ``python -m fedsoft.experiments.plots dest --markdown`` then redraws the same figure and
    tables, so
    results can be published (e.g. under ``docs/data/``) without adapters or logs."""
    exp_dir, dest = Path(exp_dir), Path(dest)
    if not (exp_dir / RUN_INDEX).is_file() and not (exp_dir / TIMINGS).is_file():
        raise FileNotFoundError(f"{exp_dir}: neither {RUN_INDEX} nor {TIMINGS}: not the "
                                "output directory of `python -m fedsoft.experiments NAME`")
    dest.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_FILES:
        if (exp_dir / name).is_file():
            (dest / name).write_bytes((exp_dir / name).read_bytes())
    if (exp_dir / RUN_INDEX).is_file():
        for row in read_jsonl(exp_dir / RUN_INDEX):
            src, out = exp_dir / row["run_dir"], dest / row["run_dir"]
            out.mkdir(parents=True, exist_ok=True)
            for name in EXPORT_RUN_FILES:
                if (src / name).is_file():
                    (out / name).write_bytes((src / name).read_bytes())
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedsoft.experiments.plots",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("exp_dirs", nargs="+", type=Path,
                    help="runs/experiments/<NAME>/<scale> directories")
    ap.add_argument("--out", type=Path, default=None,
                    help="figure path (only with one exp-dir; default <exp-dir>/<NAME>.png)")
    ap.add_argument("--markdown", action="store_true", help="print the summary table")
    ap.add_argument("--target-frac", type=float, default=DEFAULT_TARGET_FRAC)
    ap.add_argument("--export", type=Path, default=None, metavar="DEST",
                    help="copy the JSON/JSONL the figure is drawn from to DEST/<NAME>/<scale> "
                         "(no adapters or logs), then draw there")
    args = ap.parse_args(argv)
    if args.out is not None and len(args.exp_dirs) != 1:
        ap.error("--out needs exactly one exp-dir")
    if args.export is not None:
        args.exp_dirs = [export(d, args.export / d.resolve().parent.name / d.resolve().name)
                         for d in args.exp_dirs]
    for d in args.exp_dirs:
        path = draw(d, args.out)
        print(f"[plots] {path}")
        if args.markdown and experiment_name(d) != "fig2":
            print(markdown(d, args.target_frac))
        elif args.markdown:
            print(timing_markdown(d))
    return 0


def timing_markdown(exp_dir: Path) -> str:
    """fig2's measurements as a Markdown table (ms, mean over seeds of the medians)."""
    t = timing_series(exp_dir)
    lines = ["| sweep | r | d = k | SOFT ms | SVD ms | SVD / SOFT |", "|---|---|---|---|---|---|"]
    for sweep in ("rank", "size"):
        per = t.get(sweep, {})
        if "soft" not in per or "svd" not in per:
            continue
        for i, xval in enumerate(per["soft"]["x"]):
            soft, svd = per["soft"]["y"][i], per["svd"]["y"][i]
            r, d = (xval, per["soft"]["fixed"]) if sweep == "rank" else (per["soft"]["fixed"],
                                                                          xval)
            lines.append(f"| {sweep} | {r} | {d} | {1e3 * soft:.3f} | {1e3 * svd:.3f} | "
                         f"{svd / soft:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
