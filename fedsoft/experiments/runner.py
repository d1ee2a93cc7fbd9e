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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsoft.config import resolve
from fedsoft.experiments import launch
from fedsoft.runlog import progress_line, read_metrics

ROOT = launch.ROOT
CONF_DIR = ROOT / "conf"
DEFAULT_OUT = Path("runs") / "experiments"
SCALES = ("ci", "cpu", "gpu")
SPARSIFIERS = ("soft", "flasc", "rlora", "hetlora", "fedlodrop", "dense")
SKETCH_MODES = {
    "optimized": {"sampling": "optimized"},
    "uniform": {"sampling": "uniform", "sketch-k": "fixed"},
    "full": {"sampling": "full", "sketch-k": "fixed"},
}
RUN_INDEX = "runs.jsonl"
TIMINGS = "timings.jsonl"
GRAM = "gram.jsonl"


@dataclass(frozen=True)
class Federation:
    """How many simulated SuperNodes and what each ClientApp reserves."""

    supernodes: int
    cpus_per_client: int = 1
    gpus_per_client: float = 0.0
    timeout_s: float = 900.0


FEDERATION = {
    "ci": Federation(supernodes=2, cpus_per_client=1, timeout_s=600.0),
    "cpu": Federation(supernodes=6, cpus_per_client=1, timeout_s=3600.0),
    "gpu": Federation(supernodes=100, cpus_per_client=1, gpus_per_client=0.1,
                      timeout_s=6 * 3600.0),
}

# run-config overrides common to every run of a scale (the preset key plus overrides, since flwr
# rejects a TOML file together with key=value pairs); "text" is the text task of paper A (Fig. 7)
# and paper B, "vision" the main task (at ci/cpu scale both are offline text: no hub, no GPU).
BASE: dict[str, dict[str, dict[str, Any]]] = {
    "ci": {
        "vision": {"preset": "ci", "num-server-rounds": 2, "local-steps": 2,
                   "max-train-examples": 400, "max-test-examples": 100,
                   "partitioner": "shard", "shards-per-client": 2},
    },
    "cpu": {
        # about the quickstart's work per run (8 rounds x 3 clients x 8 steps = 192 local
        # steps; quickstart: 5 x 2 x 20 = 200): about 2.2 min per run on 2 cores. Dirichlet(0.5)
        # labels: with 2 label shards per client (the first cpu runs) the global model stayed
        # at chance (test loss ln 10) for 8 rounds whatever the method, so nothing compared
        "vision": {"preset": "quickstart", "num-server-rounds": 8, "clients-per-round": 3,
                   "local-steps": 8, "max-train-examples": 3000, "max-test-examples": 400,
                   "partitioner": "dirichlet", "dirichlet-alpha": 0.5},
    },
    "gpu": {
        "vision": {"preset": "paper-vit-cifar100"},
        "text": {"preset": "paper-distilbert-agnews"},
    },
}
TEXT_DATASET = {"ci": "20ng", "cpu": "20ng"}  # the second (text) task at ci/cpu scale


def base_overrides(scale: str, task: str = "vision") -> dict[str, Any]:
    """Overrides shared by every run of ``scale`` for ``task`` ("vision" or "text")."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if task not in ("vision", "text"):
        raise ValueError(f"task must be 'vision' or 'text', got {task!r}")
    per_scale = BASE[scale]
    if task in per_scale:
        return dict(per_scale[task])
    return {**per_scale["vision"], "dataset": TEXT_DATASET[scale]}


@dataclass(frozen=True)
class RunSpec:
    """One simulation of a figure: its name, the series/panel it belongs to, its overrides."""

    name: str
    series: str
    panel: str
    overrides: dict[str, Any]
    seed: int = 0
    gram: bool = False  # write the final adapter's Gram matrices (Fig. 4)
    # overrides that depend on the seed (figB-het: the log-normal sigma that gives each seed's
    # clients exactly the target compute spread); merged by expand()
    seed_overrides: Callable[[int], dict[str, Any]] | None = None

    @property
    def run_name(self) -> str:
        return f"{self.name}-s{self.seed}"


@dataclass(frozen=True)
class Experiment:
    """A figure: its title and the runs of one scale (seed-less; seeds are added later)."""

    name: str
    title: str
    runs: Callable[[str], list[RunSpec]] | None = None  # None: a timing benchmark (fig2)
    params: Callable[[str], dict[str, Any]] | None = None  # fig2's benchmark parameters


# ----------------------------------------------------------------------------- figure designs

FIG3_RANKS = {"ci": (4,), "cpu": (4, 16), "gpu": (4, 16)}
FIG3_METHODS = {"ci": ("soft", "dense"), "cpu": SPARSIFIERS, "gpu": SPARSIFIERS}
SPARSITY = 0.5  # same ratio for every sparsifier (the paper's value is not given)
OSFA_RANKS = {"ci": (1,), "cpu": (1, 2, 32), "gpu": (1, 2, 32, 64)}
FIG4_RANK = {"ci": 4, "cpu": 16, "gpu": 16}
ZETA = {"ci": 1.0, "cpu": 0.1, "gpu": 0.1}
SHARDS = {"ci": (1, 2), "cpu": (1, 2, 5), "gpu": (1, 2, 5)}
FIG56_SPARSITY = {"ci": SPARSITY, "cpu": 0.0, "gpu": 0.0}
FIG56_RANK = {"ci": 4, "cpu": 8, "gpu": 8}
FIG7_RANK = {"ci": 4, "cpu": 8, "gpu": 8}
SAMPLING_Q = {"ci": 0.5, "cpu": 0.5, "gpu": 0.1}
SKETCH = {"ci": ("optimized", "uniform"), "cpu": tuple(SKETCH_MODES), "gpu": tuple(SKETCH_MODES)}


# SOFT = orthogonality loss (eq. 7) + per-rank sparsification; the ci scale leaves the loss
# out so that its SOFT run doubles as fig4's zeta = 0 run (one flwr run less in CI)
SOFT_ZETA = {"ci": 0.0, "cpu": 0.01, "gpu": 0.01}


def _sparse(method: str, scale: str = "ci") -> dict[str, Any]:
    if method == "dense":
        return {"sparsifier": "dense"}
    out: dict[str, Any] = {"sparsifier": method, "sparsity": SPARSITY}
    if method == "soft" and SOFT_ZETA[scale] > 0:
        out["zeta"] = SOFT_ZETA[scale]
    return out


def fig3ab_runs(scale: str) -> list[RunSpec]:
    base = base_overrides(scale)
    data = resolved(base)["dataset"]
    return [RunSpec(f"{m}-r{r}", m, f"{data}, r = {r}",
                    {**base, "lora-rank": r, **_sparse(m, scale)})
            for r in FIG3_RANKS[scale] for m in FIG3_METHODS[scale]]


def fig3c_runs(scale: str) -> list[RunSpec]:
    base = base_overrides(scale)
    runs = [RunSpec("tsfa", "TSFA", "", {**base, "strategy": "tsfa"})]
    runs += [RunSpec(f"osfa-r{r}", f"OSFA r={r}", "", {**base, "strategy": "osfa", "lora-rank": r})
             for r in OSFA_RANKS[scale]]
    return runs


def fig4_runs(scale: str) -> list[RunSpec]:
    base = {**base_overrides(scale), "lora-rank": FIG4_RANK[scale], **_sparse("soft")}
    z = ZETA[scale]
    return [RunSpec("zeta0", "zeta = 0", "", base, gram=True),
            RunSpec(f"zeta{z:g}", f"zeta = {z:g}", "", {**base, "zeta": z}, gram=True)]


def fig56_runs(scale: str) -> list[RunSpec]:
    # the paper: shard partition, no communication constraint -> SOFT at sparsity 0 at cpu/gpu
    # scale (the sparse strategy, which logs cov_fro, keeping every entry); at ci scale SOFT at
    # the fig3ab ratio and rank, so that the 2-shard run is fig3ab's SOFT run (copied, not rerun)
    base = {**base_overrides(scale), "lora-rank": FIG56_RANK[scale], "sparsifier": "soft",
            "sparsity": FIG56_SPARSITY[scale], "partitioner": "shard"}
    return [RunSpec(f"shards{s}", f"{s} shard{'s' if s > 1 else ''}/client", "",
                    {**base, "shards-per-client": s}) for s in SHARDS[scale]]


def fig7_runs(scale: str) -> list[RunSpec]:
    base = base_overrides(scale, "text")
    r = FIG7_RANK[scale]
    panel = f"{resolved(base)['dataset']}, r = {r}"
    return [RunSpec(m, m, panel, {**base, "lora-rank": r, **_sparse(m, scale)})
            for m in FIG3_METHODS[scale]]


def figb_runs(scale: str) -> list[RunSpec]:
    # E[participants] = sampling-q x N: 1 of 2 (ci), 3 of 6 (cpu), 10 of 100 (gpu, as paper A)
    base = {**base_overrides(scale, "text"), "strategy": "sketch",
            "sampling-q": SAMPLING_Q[scale]}
    return [RunSpec(m, m, "", {**base, **SKETCH_MODES[m]}) for m in SKETCH[scale]]


# ----------------------------------------------------------------------------- issue 14 figures
# fig3c-long and figB-het: the comparisons of issue 14 on the realistic channel (log-distance
# path loss, the outage rule, the default budget fraction). Cheaper rounds than the other cpu
# figures (5 local steps, 200 test examples) so that 30 rounds fit about 6 min on 2 cores:
# measured on the 2-core VM, a cpu-scale round (3 clients) took 10.6-14.7 s at 8 local steps /
# 400 test examples (flwr start-up + round 0 about 14 s); see docs/RESULTS.md for the settings'
# own measurement and the estimates per figure.
LONG = {  # on top of base_overrides(scale)
    "ci": {},
    "cpu": {"num-server-rounds": 30, "local-steps": 5, "max-test-examples": 200},
    "gpu": {},
}
LONG_OSFA_RANKS = {"ci": (1,), "cpu": (1, 2, 8, 32), "gpu": (1, 2, 8, 32)}
LONG_REF_RANK = 8  # every run's budget: latency-budget-fraction x the dense round at this rank
HET = {  # figB-het on top of base_overrides(scale, "text")
    "ci": {},
    "cpu": {"num-server-rounds": 20, "local-steps": 5, "max-test-examples": 200,
            "sketch-pilot-rounds": 3},
    "gpu": {},
}
HET_SPREAD = 10.0  # slowest / fastest client's seconds per step, exactly, in every seed
HET_SHADOWING_DB = 8.0
HET_SKETCH = {"ci": ("optimized", "uniform"), "cpu": tuple(SKETCH_MODES),
              "gpu": tuple(SKETCH_MODES)}
# LoRA-adapted layers (count, d, k) and the dense head's input width, per model spec: the wire
# payload of a run without loading the model (fedsoft.wireless.plan.payload_bits_fn; within 150
# bytes of the measured upload of a cpu-scale OSFA round)
LORA_SHAPES = {"minilm-l6": (12, 384, 384, 384),
               "vit-base-patch16-224-in21k": (24, 768, 768, 768)}


def dense_upload_bits(overrides: Mapping[str, Any], rank: int) -> float:
    """Bits of one client's dense (rho = 0) wire upload at ``rank`` for the run ``overrides``."""
    from fedsoft.task.data import DATASETS
    from fedsoft.wireless import plan as tsfa_plan

    cfg = resolved(overrides)
    count, d, k, head_in = LORA_SHAPES[str(cfg["model"])]
    classes = DATASETS[str(cfg["dataset"])].num_classes
    bits = tsfa_plan.payload_bits_fn(cfg, [(f"layer{i}", d, k) for i in range(count)],
                                     [head_in * classes, classes])
    return float(bits(int(rank), 0.0))


def equal_budget_fraction(overrides: Mapping[str, Any], rank: int,
                          ref_rank: int = LONG_REF_RANK) -> float:
    """``latency-budget-fraction`` that gives a rank-``rank`` run the budget the default
    fraction gives at ``ref_rank``: T_bar = f x dense(lora-rank) x S/B on the seed's nominal
    channel, so f_r = f x bits(ref_rank) / bits(rank) is the same T_bar in every seed."""
    f = float(resolved(overrides)["latency-budget-fraction"])
    return f * dense_upload_bits(overrides, ref_rank) / dense_upload_bits(overrides, rank)


def heterogeneity_for_spread(num_clients: int, spread: float, seed: int) -> float:
    """``compute-heterogeneity`` (log-normal sigma) at which max/min of
    :func:`fedsoft.sketching.wallclock.compute_speeds` over ``num_clients`` is ``spread`` for
    ``seed``
    (the draws are sigma x z, so sigma = ln(spread) / (max z - min z); rounded to 4 digits)."""
    import math

    import numpy as np

    from fedsoft.sketching.wallclock import compute_speeds

    if num_clients < 2:
        return 0.0
    z = np.log(compute_speeds(num_clients, 1.0, 1.0, seed))
    return round(math.log(spread) / float(z.max() - z.min()), 4)


def fig3c_long_runs(scale: str) -> list[RunSpec]:
    """TSFA (pilot-calibrated rank) vs OSFA at r = 1, 2, 8, 32 at one latency budget (the
    default fraction of the dense round at r = 8) on the default channel with the outage rule.

    cpu scale: 5 runs x 30 rounds (+ TSFA's 3-round dense rank-32 pilot). Measured with these
    settings (OSFA r = 8, 4 rounds): 12.5 s to round 0, then 6.7-10.2 s per round (mean 8.4 s),
    so about 4.5 min per OSFA run and 5.5 min for TSFA with its pilot: about 24 min per seed,
    70 min for ``--seeds 3`` on the 2-core VM."""
    base = {**base_overrides(scale), **LONG[scale]}
    runs = [RunSpec("tsfa", "TSFA", "", {**base, "strategy": "tsfa", "lora-rank": LONG_REF_RANK,
                                         "bound-calibration": "auto"})]
    for r in LONG_OSFA_RANKS[scale]:
        o = {**base, "strategy": "osfa", "lora-rank": r}
        o["latency-budget-fraction"] = equal_budget_fraction(o, r)
        runs.append(RunSpec(f"osfa-r{r}", f"OSFA r={r}", "", o))
    return runs


def figb_het_runs(scale: str) -> list[RunSpec]:
    """Paper B on a strongly heterogeneous system: compute spread exactly 10x in every seed
    (per-seed ``compute-heterogeneity``), 8 dB shadowing; optimised plan from the ``auto``
    pilot (4 settings x 3 rounds at cpu scale) vs uniform vs full participation.

    cpu scale: 3 runs x 20 rounds. From the fig3c-long measurement (8.4 s per 3-client round,
    about 14 s estimated for full participation's 6 clients): uniform about 3 min, full 5 min,
    optimized 5 min (its pilot: 6 rounds at q = 1, 6 at q = 0.5, about 2.2 min): about 13 min
    per seed, 40 min for ``--seeds 3`` on the 2-core VM."""
    n = FEDERATION[scale].supernodes
    base = {**base_overrides(scale, "text"), **HET[scale], "strategy": "sketch",
            "sampling-q": SAMPLING_Q[scale], "shadowing-db": HET_SHADOWING_DB}
    modes = {**SKETCH_MODES, "optimized": {**SKETCH_MODES["optimized"],
                                           "sketch-calibration": "auto"}}

    def het(seed: int) -> dict[str, Any]:
        return {"compute-heterogeneity": heterogeneity_for_spread(n, HET_SPREAD, seed)}

    return [RunSpec(m, m, "", {**base, **modes[m]}, seed_overrides=het) for m in HET_SKETCH[scale]]


FIG2 = {  # d = k; "rank" sweep at fixed d, "size" sweep at fixed r
    "ci": {"d_fixed": 64, "ranks": [2, 4, 8], "r_fixed": 4, "sizes": [32, 64, 128],
           "layers": 1, "repeats_soft": 7, "repeats_svd": 7, "sparsity": SPARSITY,
           "threads": 1},
    "cpu": {"d_fixed": 768, "ranks": [4, 8, 16, 32, 64], "r_fixed": 16,
            "sizes": [128, 256, 512, 768, 1024], "layers": 8, "repeats_soft": 11,
            "repeats_svd": 5, "sparsity": SPARSITY, "threads": 2},
    "gpu": {"d_fixed": 768, "ranks": [4, 8, 16, 32, 64, 128], "r_fixed": 16,
            "sizes": [128, 256, 512, 768, 1024, 2048], "layers": 8, "repeats_soft": 11,
            "repeats_svd": 5, "sparsity": SPARSITY, "threads": 2},
}

EXPERIMENTS: dict[str, Experiment] = {
    "fig2": Experiment("fig2", "Fig. 2: selection time, SOFT vs product + SVD",
                       params=lambda s: dict(FIG2[s])),
    "fig3ab": Experiment("fig3ab", "Fig. 3(a)(b): sparsifiers at equal sparsity", fig3ab_runs),
    "fig3c": Experiment("fig3c", "Fig. 3(c): TSFA vs OSFA at fixed ranks", fig3c_runs),
    "fig4": Experiment("fig4", "Fig. 4: Gram matrices and accuracy without/with the orthogonal "
                       "loss", fig4_runs),
    "fig56": Experiment("fig56", "Figs. 5-6: covariance and accuracy vs shards per client",
                        fig56_runs),
    "fig7": Experiment("fig7", "Fig. 7: text task, SOFT vs baselines", fig7_runs),
    "figB": Experiment("figB", "Paper B: accuracy vs simulated wall-clock, sketching + sampling",
                       figb_runs),
    "fig3c-long": Experiment("fig3c-long", "Fig. 3(c), 30 rounds: TSFA vs OSFA at one budget, "
                             "realistic channel with the outage rule", fig3c_long_runs),
    "figB-het": Experiment("figB-het", "Paper B, 10x compute spread + 8 dB shadowing: "
                           "accuracy vs simulated wall-clock", figb_het_runs),
}


def expand(name: str, scale: str, seeds: int = 1) -> list[RunSpec]:
    """The runs of experiment ``name`` at ``scale``, one per design point and seed 0..seeds-1."""
    exp = EXPERIMENTS[name]
    if exp.runs is None:
        return []
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out = []
    for spec in exp.runs(scale):
        for s in range(seeds):
            per_seed = spec.seed_overrides(s) if spec.seed_overrides is not None else {}
            out.append(RunSpec(spec.name, spec.series, spec.panel,
                               {**spec.overrides, **per_seed, "seed": s}, seed=s,
                               gram=spec.gram))
    names = [r.run_name for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{name}/{scale}: duplicate run names {names}")
    return out


# ----------------------------------------------------------------------------- run config


def render(overrides: Mapping[str, Any]) -> str:
    """``key=value`` pairs in flwr's ``--run-config`` syntax (strings double-quoted)."""
    parts = []
    for k, v in overrides.items():
        if isinstance(v, bool):
            raise TypeError(f"run-config key {k!r}: booleans are not run-config values")
        if isinstance(v, str):
            if '"' in v:
                raise ValueError(f"run-config key {k!r}: value {v!r} contains a double quote")
            parts.append(f'{k}="{v}"')
        elif isinstance(v, int | float):
            parts.append(f"{k}={v!r}")
        else:
            raise TypeError(f"run-config key {k!r}: unsupported value {v!r}")
    return " ".join(parts)


def resolved(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The config the ServerApp will resolve for these overrides (defaults < preset < given)."""
    return resolve(dict(overrides), CONF_DIR)


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


# ----------------------------------------------------------------------------- run bookkeeping


def num_rounds(run_dir: Path, fallback: int) -> int:
    cfg_path = run_dir / "config.json"
    if cfg_path.is_file():
        try:
            return int(json.loads(cfg_path.read_text())["num-server-rounds"])
        except (ValueError, KeyError):
            pass
    return fallback


def is_finished(run_dir: Path, rounds: int, key: str | None = None) -> bool:
    """``metrics.jsonl`` has ``rounds + 1`` rows (round 0 .. rounds) and, when ``key`` is given
    and ``run.json`` exists, the run was made for the same resolved config."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    try:
        rows = read_metrics(metrics)
    except ValueError:
        return False
    if len(rows) != num_rounds(run_dir, rounds) + 1:
        return False
    info = run_dir / "run.json"
    if key is not None and info.is_file():
        try:
            return json.loads(info.read_text()).get("key") == key
        except ValueError:
            return False
    return True


def find_reusable(out_root: Path, scale: str, key: str, rounds: int,
                  exclude: Path) -> Path | None:
    """A finished run of the same scale in any experiment under ``out_root`` with this key."""
    for info in sorted(out_root.glob(f"*/{scale}/*/run.json")):
        run_dir = info.parent
        if run_dir.resolve() == exclude.resolve():
            continue
        try:
            if json.loads(info.read_text()).get("key") != key:
                continue
        except ValueError:
            continue
        if is_finished(run_dir, rounds, key):
            return run_dir
    return None


def write_gram(run_dir: Path) -> Path:
    """Gram matrices A Aᵀ and Bᵀ B (eq. 7) of every layer of the saved final adapter -> JSONL."""
    import torch
    from safetensors.torch import load_file

    from fedsoft.compression.orthogonality import gram_matrices, orth_offdiag

    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}."
            if tag in name:
                layer = name.split(tag)[0].removeprefix("base_model.model.")
                layers.setdefault(layer, {})[part] = t.float()
    out = run_dir / GRAM
    with out.open("w") as fh:
        for layer, ab in layers.items():
            A, B = ab["lora_A"], ab["lora_B"]
            aat, btb = gram_matrices(A, B)
            fh.write(json.dumps({
                "layer": layer, "r": int(A.shape[0]), "AAt": aat.tolist(), "BtB": btb.tolist(),
                "orth_offdiag": orth_offdiag([(A, B)]),
            }) + "\n")
    return out


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


# ----------------------------------------------------------------------------- fig2 timings


def _factors(r: int, d: int, layers: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d, generator=g) / d**0.5, torch.randn(d, r, generator=g) / r**0.5)
            for _ in range(layers)]


def _bench_selection():
    """``median_time`` from bench/selection_time.py (the benchmark this figure extends)."""
    import importlib.util

    path = ROOT / "bench" / "selection_time.py"
    spec = importlib.util.spec_from_file_location("fedsoft_bench_selection_time", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_selection(params: Mapping[str, Any], seeds: int, out: Path,
                   label: str) -> list[dict[str, Any]]:
    """SOFT (eqs. 8-9) vs product + SVD selection time over rank and over d = k -> JSONL."""
    # as in bench/selection_time.py: spinning OpenMP threads inflate SVD times on a busy host
    # (takes effect only if torch is not imported yet in this process)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from fedsoft.compression.sparsifiers import SPARSIFIERS as REGISTRY
    from fedsoft.compression.sparsifiers import keep_count, to_rows

    median_time = _bench_selection().median_time
    threads = int(params.get("threads", 2))
    torch.set_num_threads(threads)
    points = [("rank", r, int(params["d_fixed"])) for r in params["ranks"]]
    points += [("size", int(params["r_fixed"]), d) for d in params["sizes"]]
    rows = []
    with out.open("w") as fh:
        for seed in range(seeds):
            for sweep, r, d in points:
                layers = [to_rows(A, B) for A, B in _factors(r, d, int(params["layers"]),
                                                              seed * 1000 + r + d)]
                keep = keep_count(r, d, d, float(params["sparsity"]))
                for method, repeats in (("soft", params["repeats_soft"]),
                                        ("svd", params["repeats_svd"])):
                    fn = REGISTRY[method]
                    sec = median_time(lambda fn=fn, layers=layers, keep=keep, d=d:
                                      [fn(x, d, keep) for x in layers], int(repeats))
                    row = {"sweep": sweep, "method": method, "r": r, "d": d, "k": d,
                           "layers": int(params["layers"]), "keep_per_layer": keep,
                           "sparsity": float(params["sparsity"]), "seed": seed,
                           "seconds": sec, "repeats": int(repeats), "threads": threads}
                    fh.write(json.dumps(row) + "\n")
                    rows.append(row)
                    print(f"{label} {sweep} r={r} d=k={d} {method}: {1e3 * sec:.3f} ms "
                          f"(median of {repeats})", flush=True)
    return rows


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
