"""``bound-calibration = "auto"``: the pilot run that measures sigma_bar_r and sigma_max (A.8).

The surrogate Phi(r, rho) of the TSFA offline stage (A.8 of EQUATIONS.md; eqs. 19, 23, 25-29)
needs sigma_bar_r, "a proxy for the dominant scale of the rank-r LoRA update" (eq. 19), and
sigma_max (Assumption 6). They are what a short pilot can measure: a few rounds of dense
federated LoRA ("ideal LoRA", eq. 5) at the largest candidate rank of ``tsfa-ranks``, with the
same clients, data partition and sampling seed as the real run, but only
``bound-pilot-local-steps`` local steps for ``bound-pilot-rounds`` rounds. After every round the
SOFT scores s_j = ||b_j|| ||a_j|| (eq. 8) of the global adapter are logged to
``<run-dir>/pilot/rank_scores.jsonl`` and :func:`fedsoft.wireless.calibration.calibrate_run` turns
them
into ``<run-dir>/calibration.json`` (sigma_bar_r for r = 1..pilot rank, sigma_max), which the
offline stage then reads. The other constants (kappa_R, kappa_S, kappa_C, kappa_E, R*, p) are
weights of terms whose true values (L, c_r, C, eta, tau, G, X of eq. 23) a pilot this short
cannot identify; they stay run-config keys and are assumptions (docs/RESULTS.md,
*Wireless realism*).

This module holds what does not need Flower: the pilot's run config, its identity (when a
``calibration.json`` may be reused) and :func:`simulate_pilot`, the same pilot in-process (the
same client code and eq.-(5) aggregation, for benches). The Flower side, which runs the pilot on
the ServerApp's Grid, is :mod:`strategies.pilot`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedsoft import lora
from fedsoft.aggregate import weighted_average
from fedsoft.config import ConfigError, ConfigLike, RunConfig, parse_int_list
from fedsoft.task import workload
from fedsoft.wireless.calibration import CALIBRATION_FILE, append_scores, layer_scores

__all__ = [
    "AUTO",
    "PILOT_DIR",
    "calibration_file",
    "identity",
    "pilot_config",
    "pilot_rank",
    "reusable",
    "simulate_pilot",
]

AUTO = "auto"
PILOT_DIR = "pilot"

# keys that cannot change what a dense pilot trains: where it writes, how long it may wait, and
# the TSFA / channel / bound / sketch settings the pilot does not use (the pilot's rank comes
# from tsfa-ranks and is in its identity as lora-rank)
_NOT_IDENTITY = frozenset({
    "preset", "run-dir", "resume-from", "checkpoint-every", "round-timeout", "device",
    "client-state-dir", "max-test-examples", "eval-batch-size", "tsfa-ranks",
    "latency-budget", "latency-budget-fraction", "lyapunov-v", "sparsity-min", "sparsity-max",
    "p3-solver",
    "offline-nominal", "bandwidth-allocation", "round-overhead-s", "server-lr",
})
_NOT_IDENTITY_PREFIXES = ("bound-", "channel-", "sketch-", "sampling", "compute-")


def pilot_rank(cfg: ConfigLike) -> int:
    """The pilot's LoRA rank: the largest candidate of ``tsfa-ranks`` (every candidate rank r
    then has a measured sigma_bar_r, eq. 19)."""
    cfg = RunConfig.coerce(cfg)
    return max(parse_int_list(cfg.tsfa.tsfa_ranks, "tsfa-ranks"))


def pilot_config(cfg: ConfigLike, run_dir: Path | str) -> RunConfig:
    """The run config the pilot's clients train with: dense FedAvg (``strategy = fedavg``,
    ``sparsifier = dense``) at :func:`pilot_rank`, ``bound-pilot-rounds`` rounds of
    ``bound-pilot-local-steps`` steps, the run's zeta, no checkpoints, its own
    run-dir ``<run-dir>/pilot``. Everything else (model, data, partition, seed, K, lr) is the
    real run's."""
    cfg = RunConfig.coerce(cfg)
    return cfg.with_values({
        "strategy": "fedavg", "sparsifier": "dense", "sparsity": 0.0,
        "lora-rank": pilot_rank(cfg),
        "num-server-rounds": cfg.bound.bound_pilot_rounds,
        "local-steps": cfg.bound.bound_pilot_local_steps,
        "checkpoint-every": 0, "resume-from": "", "bound-calibration": "",
        "run-dir": str(Path(run_dir) / PILOT_DIR),
    })


def identity(cfg: ConfigLike, num_nodes: int) -> dict[str, Any]:
    """What decides the pilot's measurement: its config minus the keys it does not use, and
    the number of SuperNodes. A ``calibration.json`` is reused only for an equal identity."""
    cfg = RunConfig.coerce(cfg)
    pcfg = pilot_config(cfg, ".")
    keep = {k: v for k, v in sorted(pcfg.items())
            if k not in _NOT_IDENTITY and not k.startswith(_NOT_IDENTITY_PREFIXES)}
    keep["bound-pilot-rounds"] = cfg.bound.bound_pilot_rounds
    keep["bound-pilot-local-steps"] = cfg.bound.bound_pilot_local_steps
    keep["num-nodes"] = int(num_nodes)
    return json.loads(json.dumps(keep))  # the form it has once read back from the file


def calibration_file(cfg: ConfigLike) -> Path:
    """``<run-dir>/calibration.json``, the file ``bound-calibration = "auto"`` reads."""
    cfg = RunConfig.coerce(cfg)
    if not cfg.run.run_dir:
        raise ConfigError("run-config key 'bound-calibration' = 'auto': needs a run-dir")
    return Path(cfg.run.run_dir) / CALIBRATION_FILE


def reusable(path: Path | str, ident: Mapping[str, Any]) -> bool:
    """True when ``path`` is a ``calibration.json`` written by a pilot with identity ``ident``
    (same config and node count) and sigma_bar values up to its pilot rank."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
        return (data.get("pilot") == dict(ident)
                and len(data["sigma_bar"]) >= int(ident["lora-rank"]))
    except (ValueError, KeyError, TypeError):
        return False


def simulate_pilot(cfg: ConfigLike, num_nodes: int, out_dir: Path | str) -> Path:
    """The pilot without Flower, for benches: the same client code
    (:func:`fedsoft.client_update.local_round`), seeded K-of-N sampling of partitions as
    :class:`strategies.lora_fedavg.LoRAFedAvg` draws it, eq.-(5) aggregation weighted by
    partition size, and the per-round score log ``<out_dir>/rank_scores.jsonl`` (round 0 = the
    initial adapter). No update-norm bound and no failure injection. Returns ``out_dir``."""
    cfg = RunConfig.coerce(cfg)
    from fedsoft.client_update import local_round  # torch training, imported when used

    pcfg = pilot_config(cfg, out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank_scores.jsonl").write_text("")
    workload.clear_cache()
    work = workload.build_workload(pcfg)
    global_arrays = lora.to_arrays(work.model)
    append_scores(out, 0, layer_scores(work.model))
    rng = random.Random(pcfg.run.seed)
    k = min(pcfg.run.clients_per_round, int(num_nodes))
    for t in range(1, pcfg.run.num_server_rounds + 1):
        chosen = sorted(rng.sample(list(range(int(num_nodes))), k))
        replies, weights = [], []
        for pid in chosen:
            arrays, metrics, _ = local_round(pcfg, global_arrays, pid, int(num_nodes), t,
                                             node_id=pid)
            replies.append(arrays)
            weights.append(float(metrics["num-examples"]))
        global_arrays = {key: np.asarray(v, dtype=np.float32)
                         for key, v in weighted_average(replies, weights).items()}
        lora.from_arrays(work.model, global_arrays)
        append_scores(out, t, layer_scores(work.model))
    workload.clear_cache()  # the run after the pilot starts from a fresh model
    return out
