"""Experiment runner: the paper figures as sequences of `flwr run` simulations, resumable.

``python -m fedsoft.experiments NAME [NAME ...] --scale ci|cpu|gpu [--seeds N]`` runs every
simulation of the named figure(s) one after the other through
:func:`fedsoft.experiments.launch.flwr_run`
(an isolated local SuperLink per run), prints one progress line per run and per round, and
writes

- ``<out-root>/<NAME>/<scale>/<run-name>/``: the run's own ``run-dir`` (``config.json``,
  ``metrics.jsonl``, ``adapter/``, ...) plus ``run.json`` (what the runner launched: the exact
  ``flwr run`` command, the resolved-config key, wall time, exit status) and ``flwr.log``;
- ``<out-root>/<NAME>/<scale>/runs.jsonl``: one row per run (series, panel, seed, run dir);
- ``<out-root>/<NAME>/<scale>/experiment.json``: command line, host, wall time;
- ``<out-root>/<NAME>/<scale>/<NAME>.png``: the figure, drawn by :mod:`fedsoft.experiments.plots`
  from the
  JSONL files only (``--plot-only`` or ``python -m fedsoft.experiments.plots <exp-dir>`` redraws
  it).

A run whose ``metrics.jsonl`` already has ``num-server-rounds + 1`` rows for the same resolved
config is skipped (resume after an interruption); a finished run with the same resolved config
in another experiment of the same scale and output root is copied instead of rerun (``--no-reuse``
turns that off). ``--only PATTERN`` launches just the runs whose name matches (the figure
keeps the runs finished earlier). ``fig2`` is a timing benchmark (SOFT vs product + SVD
selection), not a Flower run; its measurements go to ``timings.jsonl``. ``fig3c-long`` and
``figB-het`` are issue 14's comparisons on the realistic channel (30 / 20 cheaper rounds at cpu
scale; about 70 / 40 min for ``--seeds 3`` on 2 cores, see docs/RESULTS.md).

Scales: ``ci`` (seconds to minutes, used by the tests: 2 SuperNodes, 2 rounds, 2 local steps,
400 train / 100 test examples), ``cpu`` (MiniLM on a 2-core laptop, 6 SuperNodes, Dirichlet(0.5)
labels; measured about 2.2 min per run, so 5 to 30 min per figure and seed), ``gpu`` (the
paper's setting: presets ``paper-vit-cifar100`` / ``paper-distilbert-agnews``, 100
SuperNodes, 10 per round; needs the Hugging Face hub once).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsoft.experiments import launch
from fedsoft.experiments.bookkeeping import (  # noqa: F401 - the runner's public names
    find_reusable,
    is_finished,
    num_rounds,
    write_gram,
)
from fedsoft.experiments.catalogue import *  # noqa: F403 - figures are looked up on the runner
from fedsoft.experiments.catalogue import (
    DEFAULT_OUT,
    EXPERIMENTS,
    FEDERATION,
    GRAM,
    RUN_INDEX,
    SCALES,
    TIMINGS,
    Federation,
    RunSpec,
    expand,
    render,
    resolved,
)
from fedsoft.experiments.timing import time_selection
from fedsoft.runlog import progress_line, read_metrics

# ----------------------------------------------------------------------------- run config


def config_key(overrides: Mapping[str, Any], fed: Federation) -> str:
    """Identity of a run: its resolved config (without run-dir) and the federation."""
    cfg = {k: v for k, v in resolved(overrides).items() if k != "run-dir"}
    return json.dumps({"config": cfg, "supernodes": fed.supernodes,
                       "cpus_per_client": fed.cpus_per_client,
                       "gpus_per_client": fed.gpus_per_client}, sort_keys=True)


def flwr_command(run_config: str, fed: Federation) -> str:
    """The ``flwr run`` command line that the runner executes (for the logs and RESULTS.md)."""
    fc = f"num-supernodes={fed.supernodes} client-resources-num-cpus={fed.cpus_per_client}"
    if fed.gpus_per_client:
        fc += f" client-resources-num-gpus={fed.gpus_per_client}"
    return (f"flwr run . --run-config {shlex.quote(run_config)} "
            f"--federation-config {shlex.quote(fc)} --stream")


def launch_run(home: Path, run_config: str, fed: Federation,
               timeout: float) -> subprocess.CompletedProcess:
    """One ``flwr run`` on an isolated local SuperLink (killed afterwards)."""
    return launch.flwr_run(home, run_config, fed.supernodes, cpus_per_client=fed.cpus_per_client,
                           gpus_per_client=fed.gpus_per_client, timeout=timeout)


class _Tail(threading.Thread):
    """Print a progress line for each new row of a run's metrics.jsonl while it runs."""

    def __init__(self, path: Path, rounds: int, prefix: str) -> None:
        super().__init__(daemon=True)
        self.path, self.rounds, self.prefix = path, rounds, prefix
        self.seen = 0
        self.stop = threading.Event()

    def poll(self) -> None:
        if not self.path.is_file():
            return
        try:
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        except OSError:
            return
        for line in lines[self.seen:]:
            try:
                row = json.loads(line)
            except ValueError:
                return  # partially written line: next poll
            print(progress_line(row, self.rounds).replace("[fedsoft]", self.prefix, 1),
                  flush=True)
            self.seen += 1

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.poll()
        self.poll()


def _host() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - host description only
        info["cuda"] = None
    return info


def run_one(spec: RunSpec, exp_dir: Path, out_root: Path, scale: str, fed: Federation, *,
            label: str, reuse: bool = True, timeout: float | None = None,
            launch: bool = True) -> dict[str, Any]:
    """Make sure ``spec``'s run is finished (skip, reuse or launch); returns its run.json.

    ``launch=False`` (a run that ``--only`` did not select) only reports a finished run; an
    unfinished one is neither copied nor launched and comes back with status "not-run"."""
    run_dir = (exp_dir / spec.run_name).resolve()
    overrides = {**spec.overrides, "run-dir": str(run_dir)}
    run_config = render(overrides)
    key = config_key(spec.overrides, fed)
    rounds = int(resolved(spec.overrides)["num-server-rounds"])
    info_path = run_dir / "run.json"
    base_info = {"run": spec.run_name, "series": spec.series, "panel": spec.panel,
                 "seed": spec.seed, "key": key, "overrides": spec.overrides,
                 "command": flwr_command(render(spec.overrides), fed)}

    def finish(info: dict[str, Any]) -> dict[str, Any]:
        if spec.gram and (run_dir / "adapter").is_dir() and not (run_dir / GRAM).is_file():
            write_gram(run_dir)
        info_path.write_text(json.dumps(info, indent=2))
        return info

    if is_finished(run_dir, rounds, key):
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        print(f"{label} {spec.run_name}: finished earlier, skipped", flush=True)
        return finish({**info, **base_info, "status": info.get("status", "done"),
                       "last_action": "skipped"})
    if not launch:
        print(f"{label} {spec.run_name}: not selected by --only, not run", flush=True)
        return {**base_info, "status": "not-run", "last_action": "not-selected"}
    if reuse:
        src = find_reusable(out_root, scale, key, rounds, run_dir)
        if src is not None:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns(GRAM))
            old = json.loads((src / "run.json").read_text())
            print(f"{label} {spec.run_name}: same resolved config as {src}, copied", flush=True)
            return finish({**old, **base_info, "status": "done", "last_action": "copied",
                           "reused_from": str(src.relative_to(out_root.resolve()))})
    if run_dir.exists():
        shutil.rmtree(run_dir)  # stale or incomplete: start clean
    run_dir.mkdir(parents=True)
    print(f"{label} {spec.run_name}: {base_info['command']}", flush=True)
    tail = _Tail(run_dir / "metrics.jsonl", rounds, f"{label} {spec.run_name}")
    tail.start()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fedsoft-exp-home-") as home:
        try:
            proc = launch_run(Path(home), run_config, fed, timeout or fed.timeout_s)
            rc, out, err = proc.returncode, proc.stdout or "", proc.stderr or ""
        except subprocess.TimeoutExpired as exc:
            rc = 124
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    wall = time.time() - t0
    tail.stop.set()
    tail.join()
    (run_dir / "flwr.log").write_text(out + "\n--- stderr ---\n" + err)
    ok = rc == 0 and is_finished(run_dir, rounds)
    info = {**base_info, "status": "done" if ok else "failed", "returncode": rc,
            "last_action": "launched",
            "wall_s": round(wall, 2), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": _host()}
    if ok:
        rows = read_metrics(run_dir / "metrics.jsonl")
        print(f"{label} {spec.run_name}: done in {wall:.1f} s, final acc "
              f"{rows[-1]['accuracy']:.4f}, uplink "
              f"{sum(r.get('uplink_bytes', 0) for r in rows) / 1e6:.3f} MB", flush=True)
    else:
        print(f"{label} {spec.run_name}: FAILED (exit {rc}) after {wall:.1f} s; log "
              f"{run_dir / 'flwr.log'}\n{(out + err)[-2000:]}", flush=True)
    return finish(info)


# ----------------------------------------------------------------------------- driver


def run_experiment(name: str, scale: str, *, seeds: int = 1, out_root: Path = DEFAULT_OUT,
                   reuse: bool = True, plot: bool = True, plot_only: bool = False,
                   timeout: float | None = None, argv: Sequence[str] | None = None,
                   only: Sequence[str] = ()) -> Path:
    """Run (or resume) every run of ``name`` at ``scale``, index them, draw the figure.

    ``only``: shell patterns on run names (``"*-r4-*"``); when given, only matching runs are
    launched, and the index (so the figure) keeps every other run that finished earlier.

    Returns the experiment directory ``<out_root>/<name>/<scale>``. Raises RuntimeError if a run
    failed (after trying every run and writing the index).
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    out_root = Path(out_root).resolve()
    exp_dir = out_root / name / scale
    exp_dir.mkdir(parents=True, exist_ok=True)
    label = f"[exp {name}/{scale}]"
    failed: list[str] = []
    if not plot_only:
        t0 = time.time()
        cmd = "python -m fedsoft.experiments " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else
                                     [name, "--scale", scale, "--seeds", str(seeds)]))
        meta_path = exp_dir / "experiment.json"
        history: list[dict[str, Any]] = []
        if meta_path.is_file():  # keep earlier invocations (resumes) with their wall times
            try:
                history = list(json.loads(meta_path.read_text()).get("invocations", []))
            except ValueError:
                history = []
        invocation: dict[str, Any] = {"command": cmd, "seeds": seeds, "host": _host(),
                                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        meta: dict[str, Any] = {"experiment": name, "title": exp.title, "scale": scale,
                                "seeds": seeds}
        if exp.runs is None:
            params = exp.params(scale)
            meta["params"] = params
            print(f"{label} timing benchmark: {params}", flush=True)
            time_selection(params, seeds, exp_dir / TIMINGS, label)
        else:
            fed = FEDERATION[scale]
            meta["federation"] = fed.__dict__
            specs = expand(name, scale, seeds)
            print(f"{label} {len(specs)} runs, {fed.supernodes} SuperNodes each, output "
                  f"{exp_dir}", flush=True)
            index = []
            for i, spec in enumerate(specs, 1):
                info = run_one(spec, exp_dir, out_root, scale, fed,
                               label=f"{label} ({i}/{len(specs)})", reuse=reuse, timeout=timeout,
                               launch=selected(spec, only))
                if info["status"] == "not-run":
                    continue
                if info["status"] != "done":
                    failed.append(spec.run_name)
                actions = invocation.setdefault("runs", {})
                actions[info["last_action"]] = actions.get(info["last_action"], 0) + 1
                index.append({k: info.get(k) for k in (
                    "run", "series", "panel", "seed", "status", "wall_s", "reused_from",
                    "command")} | {"run_dir": spec.run_name, "gram": spec.gram})
            with (exp_dir / RUN_INDEX).open("w") as fh:
                for row in index:
                    fh.write(json.dumps(row) + "\n")
        invocation["wall_s"] = round(time.time() - t0, 2)
        invocation["failed"] = failed
        meta["invocations"] = [*history, invocation]
        meta_path.write_text(json.dumps(meta, indent=2))
    if plot or plot_only:
        from fedsoft.experiments import plots

        path = plots.draw(exp_dir)
        print(f"{label} figure: {path}", flush=True)
    if failed:
        raise RuntimeError(f"{name}/{scale}: runs failed: {', '.join(failed)}")
    return exp_dir


def selected(spec: RunSpec, only: Sequence[str]) -> bool:
    """Whether ``--only`` patterns (none: everything) select ``spec`` by its run name."""
    return not only or any(fnmatch.fnmatchcase(spec.run_name, p) for p in only)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        launch.checkout_root()
    except launch.CheckoutRequiredError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="python -m fedsoft.experiments",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+", metavar="NAME",
                    help=f"experiment(s): {', '.join(EXPERIMENTS)} or 'all'")
    ap.add_argument("--scale", choices=SCALES, default="ci")
    ap.add_argument("--seeds", type=int, default=1, help="repeats with seed = 0 .. N-1")
    ap.add_argument("--out-root", type=Path, default=DEFAULT_OUT,
                    help="output root (default runs/experiments)")
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw the figure(s) from the JSONL files, run nothing")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-reuse", action="store_true",
                    help="rerun instead of copying a finished run with the same resolved config")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per flwr run")
    ap.add_argument("--only", action="append", default=[], metavar="PATTERN",
                    help="launch only the runs whose name matches (shell pattern, e.g. "
                         "'*-r4-*'; repeatable); finished runs stay in the figure")
    ap.add_argument("--list", action="store_true",
                    help="print the runs and their flwr run commands, run nothing")
    args = ap.parse_args(argv)
    names = list(EXPERIMENTS) if "all" in args.names else args.names
    for n in names:
        if n not in EXPERIMENTS:
            ap.error(f"unknown experiment {n!r}; known: {', '.join(EXPERIMENTS)}, all")
    if args.list:
        for n in names:
            specs = [s for s in expand(n, args.scale, args.seeds) if selected(s, args.only)]
            print(f"# {n} ({args.scale}): {EXPERIMENTS[n].title}")
            if EXPERIMENTS[n].runs is None:
                print(f"  timing benchmark, no Flower run: {EXPERIMENTS[n].params(args.scale)}")
            elif not specs:
                print(f"  no run matches --only {' '.join(args.only)}")
            for s in specs:
                cmd = flwr_command(render(s.overrides), FEDERATION[args.scale])
                print(f"  {s.run_name}: {cmd}")
        return 0
    status = 0
    for n in names:
        try:
            run_experiment(n, args.scale, seeds=args.seeds, out_root=args.out_root,
                           reuse=not args.no_reuse, plot=not args.no_plot,
                           plot_only=args.plot_only, timeout=args.timeout, argv=argv,
                           only=args.only)
        except RuntimeError as exc:
            print(f"[exp] {exc}", flush=True)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
