"""The paper-figure catalogue: scales, federations, base overrides and each figure's runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsoft.config import resolve
from fedsoft.experiments import launch

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
    from fedsoft.layout import RowsSpec
    from fedsoft.task.data import DATASETS
    from fedsoft.wireless import plan as tsfa_plan

    cfg = resolved(overrides)
    count, d, k, head_in = LORA_SHAPES[str(cfg["model"])]
    classes = DATASETS[str(cfg["dataset"])].num_classes
    bits = tsfa_plan.payload_bits_fn(cfg, [(f"layer{i}", d, k) for i in range(count)],
                                     [RowsSpec("weight", classes, head_in),
                                      RowsSpec("bias", 1, classes)])
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


# ----------------------------------------------------------------------------- issue 16 figures
# wire-90 / wire-99: every sparsifier at rho = 0.9 / 0.99 with float32 and int8 values, dense
# LoRA as the reference, 30 rounds; wire-defaults: SOFT at rho = 0.9 (int8) with and without a
# sparse head and a compressed downlink, the measurement behind those two defaults. Made cheap
# enough for 2 CPU cores: LoRA on the upper two of MiniLM's six blocks with the lower blocks'
# outputs cached (frozen-prefix), 32 tokens, 5 local steps, 200 test examples.
WIRE = {  # on top of base_overrides(scale)
    "ci": {"local-steps": 2, "lora-layers": "4,5", "frozen-prefix": "cache"},
    "cpu": {"num-server-rounds": 30, "local-steps": 5, "max-test-examples": 200,
            "max-length": 32, "lora-layers": "4,5", "frozen-prefix": "cache", "lr": 0.005},
    "gpu": {"num-server-rounds": 100},
}
WIRE_METHODS = {"ci": ("soft", "dense"), "cpu": SPARSIFIERS, "gpu": SPARSIFIERS}
WIRE_QUANT = "int8"


def _wire_runs(scale: str, rho: float) -> list[RunSpec]:
    base = {**base_overrides(scale), **WIRE[scale]}
    runs = []
    for m in WIRE_METHODS[scale]:
        if m == "dense":
            runs.append(RunSpec("dense", "dense", f"rho = {rho:g}", {**base,
                                                                    "sparsifier": "dense"}))
            continue
        sparse = {**_sparse(m, scale), "sparsity": rho}
        runs.append(RunSpec(m, m, f"rho = {rho:g}", {**base, **sparse}))
        runs.append(RunSpec(f"{m}-{WIRE_QUANT}", f"{m} {WIRE_QUANT}", f"rho = {rho:g}",
                            {**base, **sparse, "wire-dtype": WIRE_QUANT}))
    return runs


def wire_defaults_runs(scale: str) -> list[RunSpec]:
    """SOFT at rho = 0.9, int8 values: head-sparsity 0 / 0.9 x downlink-sparsity 0 / 0.9."""
    base = {**base_overrides(scale), **WIRE[scale], **_sparse("soft", scale), "sparsity": 0.9,
            "wire-dtype": WIRE_QUANT}
    return [RunSpec(f"head{h:g}-down{d:g}", f"head {h:g}, downlink {d:g}", "",
                    {**base, "head-sparsity": h, "downlink-sparsity": d})
            for h in (0.0, 0.9) for d in (0.0, 0.9)]


# ----------------------------------------------------------------------------- issue 17 figure
# llm-90: every sparsifier at rho = 0.9 and dense LoRA on the causal LM (instruction tuning,
# loss on the response, exact match of the answer); cpu: the shipped tiny-llama on Yahoo
# recast as instructions, Dirichlet(0.5) over the topics; gpu: FlowerTune's general-NLP setting.
LLM = {
    "ci": {"preset": "llm-offline", "num-server-rounds": 2, "local-steps": 2,
           "max-train-examples": 400, "max-test-examples": 60},
    "cpu": {"preset": "llm-offline", "num-server-rounds": 20, "clients-per-round": 3,
            "local-steps": 10, "max-train-examples": 3000, "max-test-examples": 200,
            "partitioner": "dirichlet", "dirichlet-alpha": 0.5},
    "gpu": {"preset": "llm-flowertune", "clients-per-round": 10},
}
LLM_METHODS = {"ci": ("soft", "dense"), "cpu": SPARSIFIERS, "gpu": SPARSIFIERS}


def llm_runs(scale: str) -> list[RunSpec]:
    """Every sparsifier at rho = 0.9 (float32 values) and dense LoRA on the causal LM."""
    out = []
    for m in LLM_METHODS[scale]:
        sparse = {"sparsifier": "dense"} if m == "dense" else {**_sparse(m, scale),
                                                               "sparsity": 0.9}
        out.append(RunSpec(m, m, "rho = 0.9", {**LLM[scale], **sparse}))
    return out


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
    "wire-90": Experiment("wire-90", "Sparsifiers at rho = 0.9, float32 and int8 values: "
                          "accuracy vs rounds and vs bytes (both directions)",
                          lambda s: _wire_runs(s, 0.9)),
    "wire-99": Experiment("wire-99", "Sparsifiers at rho = 0.99, float32 and int8 values: "
                          "accuracy vs rounds and vs bytes (both directions)",
                          lambda s: _wire_runs(s, 0.99)),
    "wire-defaults": Experiment("wire-defaults", "SOFT at rho = 0.9, int8: sparse head and "
                                "compressed downlink on / off", wire_defaults_runs),
    "llm-90": Experiment("llm-90", "Causal LM (instruction tuning): sparsifiers at rho = 0.9 "
                         "vs dense LoRA, loss per response token and exact match", llm_runs),
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
    """The flat config the ServerApp will resolve for these overrides (defaults < preset <
    given)."""
    return resolve(dict(overrides), CONF_DIR).flat()
