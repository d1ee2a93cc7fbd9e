"""``bound-calibration = "auto"`` on the ServerApp's Grid: pilot run, then calibration.json.

:func:`ensure_calibration` is the one call the ServerApp makes before the TSFA offline stage
(eqs. 25-29). It reuses ``<run-dir>/calibration.json`` when a pilot with the same identity
(:func:`fedsoft.wireless.pilot.identity`) wrote it, and on a resume (the pilot is never re-run
there, so
r* cannot move under a checkpoint); otherwise it runs :func:`run_pilot`, a small dense
:class:`~strategies.lora_fedavg.LoRAFedAvg` run through its own ``start`` on the same Grid and
clients, and measures sigma_bar_r (eq. 19) and sigma_max (Assumption 6) from its score log
(A.8, :func:`fedsoft.wireless.calibration.calibrate_run`). The real run then starts from a fresh
model
(the workload cache is cleared, the model is rebuilt from ``seed``) with its own strategy,
sampling RNG and round numbers 1..T, so the pilot leaves its seeds and rounds as they were.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import Grid

from fedsoft import lora
from fedsoft.config import ConfigError, ConfigLike, RunConfig
from fedsoft.durable import atomic_write_text
from fedsoft.runlog import RunLog
from fedsoft.task import workload
from fedsoft.wireless import plan as tsfa_plan
from fedsoft.wireless.calibration import (
    SCORES_FILE,
    append_scores,
    calibrate_run,
    layer_scores,
    load_calibration,
    write_calibration,
)
from fedsoft.wireless.offline_rank import Calibration
from fedsoft.wireless.pilot import AUTO, calibration_file, identity, pilot_config, reusable

from .discovery import discover
from .lora_fedavg import LoRAFedAvg
from .messages import train_config
from .records import to_numpy, to_record

__all__ = ["ensure_calibration", "run_pilot"]


def run_pilot(grid: Grid, cfg: ConfigLike, node_ids: Sequence[int],
              base: RunConfig | None = None) -> Calibration:
    """Dense federated LoRA for ``bound-pilot-rounds`` rounds at max(``tsfa-ranks``) on
    ``grid`` (config :func:`fedsoft.wireless.pilot.pilot_config`), the SOFT scores (eq. 8) of the
    global adapter logged after every applied round to ``<run-dir>/pilot/rank_scores.jsonl``,
    and their calibration (sigma_bar_r, sigma_max; A.8). A round every reply of which failed
    is not logged (its model is the previous one); a pilot with no applied round raises."""
    cfg = RunConfig.coerce(cfg)
    pcfg = pilot_config(cfg, cfg.run.run_dir)
    pilot_dir = Path(pcfg.run.run_dir)
    pilot_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(pilot_dir / SCORES_FILE, "")
    found = discover(grid, list(node_ids))
    workload.clear_cache()
    work = workload.build_workload(pcfg)
    strategy = LoRAFedAvg(
        pcfg.run.clients_per_round,
        min_available_nodes=pcfg.run.min_available_nodes,
        seed=pcfg.run.seed,
        min_replies=pcfg.run.min_replies,
        node_to_client=found.node_to_partition,
        data_sizes=workload.server_partition_sizes(pcfg, found.num_partitions),
        max_num_examples=pcfg.run.max_num_examples,
        update_norm_bound=pcfg.run.update_norm_bound,
    )
    runlog = RunLog(pilot_dir, pcfg)
    runlog.open()

    def log_scores(server_round: int, arrays: ArrayRecord, records: RecordDict) -> None:
        train = records["train"]
        if train.get("skipped"):
            return
        lora.from_arrays(work.model, to_numpy(arrays))
        append_scores(pilot_dir, server_round, layer_scores(work.model))
        runlog.append({"round": server_round, "num_clients": int(train["num_clients"]),
                       "uplink_bytes": int(train["uplink_bytes"]),
                       "train_loss": train.get("train_loss")})

    rounds = pcfg.run.num_server_rounds
    print(f"[fedsoft] bound-calibration = auto: pilot run, dense LoRA at rank "
          f"{pcfg.training.lora_rank}, {rounds} rounds x {pcfg.training.local_steps} local "
          "steps, K = "
          f"{pcfg.run.clients_per_round}, logging to {pilot_dir}", flush=True)
    try:
        strategy.start(grid=grid, initial_arrays=to_record(lora.to_arrays(work.model)),
                       num_rounds=rounds, timeout=pcfg.run.round_timeout,
                       train_config=train_config(pcfg, base), on_round=log_scores)
    finally:
        workload.clear_cache()  # the real run builds a fresh model from its seed
    try:
        return calibrate_run(pilot_dir)
    except ValueError as exc:
        raise RuntimeError(f"bound-calibration = 'auto': the pilot in {pilot_dir} applied no "
                           f"round (every reply failed?): {exc}") from exc


def ensure_calibration(
    grid: Grid, cfg: ConfigLike, node_ids: Sequence[int], *, d_plus_k_total: int,
    payload_bits: Callable[[int, float], float] | None = None,
    resume_config: Mapping[str, Any] | None = None, base: RunConfig | None = None,
) -> Path | None:
    """Make ``<run-dir>/calibration.json`` exist for ``bound-calibration = "auto"`` (TSFA);
    returns its path, or None when there is nothing to calibrate (another value, or a strategy
    other than ``tsfa``: OSFA's rank is fixed and P3, eq. 39, does not depend on sigma).

    * resume (``resume_config`` = the checkpoint's config): the file of the first run is used,
      copied from the checkpoint's run-dir when the run-dir changed; missing, it is an error;
    * a file written by a pilot with the same identity is reused;
    * otherwise the offline stage is first checked with the default constants (a config no
      rank can serve fails before any training), then :func:`run_pilot` runs and the file is
      written with the pilot's identity. The measured sigma_bar_r, sigma_max and the r* of
      both the default and the measured constants are printed.

    ``d_plus_k_total`` and ``payload_bits`` are those of :func:`fedsoft.wireless.plan.plan`."""
    cfg = RunConfig.coerce(cfg)
    if cfg.bound.bound_calibration != AUTO:
        return None
    if cfg.run.strategy != "tsfa":
        print(f"[fedsoft] bound-calibration = auto with strategy = {cfg.run.strategy!r}: no "
              "pilot (only TSFA's offline rank choice uses sigma_bar_r); the bound-sigma-bar/"
              "max keys stay in use", flush=True)
        return None
    path = calibration_file(cfg)
    n = len(node_ids)
    if resume_config is not None:
        if not path.is_file():
            old = Path(str(resume_config.get("run-dir", ""))) / path.name
            if not old.is_file():
                raise ConfigError(
                    f"run-config key 'bound-calibration' = 'auto' on resume: neither {path} nor "
                    f"{old} exists; a resume reuses the first run's pilot and never re-runs it")
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(old, path)
        _report(cfg, path, n, d_plus_k_total, payload_bits, "reused on resume")
        return path
    ident = identity(cfg, n)
    if reusable(path, ident):
        _report(cfg, path, n, d_plus_k_total, payload_bits, "reused (same pilot identity)")
        return path
    tsfa_plan.plan(cfg.with_values({"bound-calibration": ""}), n, d_plus_k_total, payload_bits)
    cal = run_pilot(grid, cfg, node_ids, base)
    write_calibration(path, cal, source=str(path.parent / "pilot"), pilot=ident)
    _report(cfg, path, n, d_plus_k_total, payload_bits,
            f"measured by the pilot ({cal.num_rounds} rounds)")
    print("[fedsoft] pilot done: the run starts from a fresh model (seed "
          f"{cfg.run.seed}), rounds 1..{cfg.run.num_server_rounds}", flush=True)
    return path


def _report(cfg: RunConfig, path: Path, n: int, d_plus_k_total: int,
            payload_bits: Callable[[int, float], float] | None, how: str) -> None:
    sigma_bar, sigma_max = load_calibration(path)
    default = tsfa_plan.plan(cfg.with_values({"bound-calibration": ""}), n, d_plus_k_total,
                             payload_bits)
    measured = tsfa_plan.plan(cfg, n, d_plus_k_total, payload_bits)
    shown = ", ".join(f"{v:.4g}" for v in sigma_bar)
    msg = (f"[fedsoft] bound-calibration = auto ({how}, {path}): sigma_max = {sigma_max:.4g}; "
           f"sigma_bar_r, r = 1..{sigma_bar.size}: [{shown}]\n"
           f"[fedsoft] r* = {measured.rank} with the measured spectra (r* = {default.rank} with "
           f"bound-sigma-bar = {cfg.bound.bound_sigma_bar}, bound-sigma-max = "
           f"{cfg.bound.bound_sigma_max}); assumed, not measured: bound-kappa-r = "
           f"{cfg.bound.bound_kappa_r}, bound-kappa-s = {cfg.bound.bound_kappa_s}, bound-kappa-c = "
           f"{cfg.bound.bound_kappa_c}, bound-kappa-e = {cfg.bound.bound_kappa_e}, "
           "bound-rank-ideal = "
           f"{cfg.bound.bound_rank_ideal}, bound-p = {cfg.bound.bound_p}")
    print(msg, flush=True)
