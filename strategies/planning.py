"""Set-up before round 1: TSFA's offline stage (pilot, rank r*, controller; eqs. 25-29) and
paper B's system model, pilot and (q, k) plan (B.3-B.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from fedsoft import checkpoint, lora
from fedsoft.config import ConfigLike, RunConfig
from fedsoft.layout import rows_spec
from fedsoft.sketching import calibration as sketch_calibration
from fedsoft.sketching import plan as sketch_plan
from fedsoft.sketching.optimizer import uniform_plan
from fedsoft.task import partition as partitioning
from fedsoft.task import workload
from fedsoft.task.models import pick_device, release
from fedsoft.task.train import evaluate
from fedsoft.wireless import plan as tsfa_plan
from fedsoft.wireless.channel import snr_line

from . import pilot
from .messages import train_config
from .records import to_numpy, to_record
from .setup import ServerSetup, SetupResult

__all__ = ["setup_sketch", "setup_tsfa"]


def _channel_summary(channel, k: int, cfg: RunConfig) -> dict[str, Any]:
    summary = channel.snr_summary(k)
    print(f"[fedsoft] {snr_line(summary)} (mean SNR over the average channel, "
          f"{cfg.channel.path_loss_model}, equal share 1/{k} of {cfg.channel.bandwidth_hz:g} Hz)",
          flush=True)
    return summary


def setup_tsfa(cfg: RunConfig, setup: ServerSetup) -> SetupResult:
    """TSFA / OSFA before round 1: ``bound-calibration = "auto"``'s pilot, the offline stage
    (rank r*, Lemma 2) or OSFA's fixed rank, the online controller and the channel."""
    work = workload.build_workload(cfg)
    shapes = lora.factor_shapes(work.model)
    heads = [rows_spec(n, tuple(v.shape)) for n, v in lora.get_head(work.model).items()]
    payload = tsfa_plan.payload_bits_fn(cfg, [(s.name, s.d, s.k) for s in shapes], heads)
    d_plus_k = sum(s.d + s.k for s in shapes)
    pilot.ensure_calibration(  # bound-calibration = "auto": pilot run -> calibration.json
        setup.grid, cfg, setup.node_ids, base=setup.base, d_plus_k_total=d_plus_k,
        payload_bits=payload, resume_config=setup.resume_config)
    plan = tsfa_plan.plan(cfg, num_clients=len(setup.node_ids), d_plus_k_total=d_plus_k,
                          payload_bits=payload)
    print(f"[fedsoft] {cfg.run.strategy.upper()} budget T_bar = {plan.T_bar:.4g} s "
          f"(nominal dense round {plan.dense_nominal_s:.4g} s), payload model "
          f"{plan.payload_model}, P3 {plan.controller.solver_used}, empty-queue rho "
          f"{'rho_min' if plan.start_rho is None else f'{plan.start_rho:.4f}'}", flush=True)
    artifacts: dict[str, Any] = {}
    if plan.offline is not None:
        artifacts["offline.json"] = tsfa_plan.offline_table(plan.offline)
        print(tsfa_plan.format_table(artifacts["offline.json"]), flush=True)
    k = min(cfg.run.clients_per_round, len(setup.node_ids))
    artifacts["channel.json"] = _channel_summary(plan.channel, k, cfg)
    return SetupResult(cfg.with_values({"lora-rank": plan.rank}),
                       {"controller": plan.controller, "channel": plan.channel}, artifacts)


def setup_sketch(cfg: RunConfig, setup: ServerSetup) -> SetupResult:
    """Paper B before round 1: system model (B.3), data shares a_n, ``sketch-calibration =
    "auto"``'s pilot (never re-run on resume) and the (q, k) plan."""
    work = workload.build_workload(cfg)
    n = len(setup.node_ids)
    system, psizes = sketch_system(cfg, work, n, known=setup.data_sizes)
    cal = None
    if cfg.sketching.sketch_calibration == "auto":
        run_dir = Path(cfg.run.run_dir)
        saved = run_dir / sketch_calibration.CALIBRATION_FILE
        if setup.resume_config is not None:  # the plan the run started with
            first = Path(str(setup.resume_config.get("run-dir", ""))) / saved.name
            src = saved if saved.is_file() else first
            if not src.is_file():
                raise checkpoint.CheckpointError(
                    f"resume-from={cfg.run.resume_from!r}: sketch-calibration = 'auto' but no "
                    f"{saved.name} in {run_dir} or in the checkpoint's run-dir, so the "
                    "sampling plan the run started with is unknown")
            cal = sketch_calibration.load_sketch_calibration(src)
        else:
            test = workload.test_loader(cfg, work)
            cal = sketch_pilot(cfg, setup.grid, work, test, pick_device(cfg.run.device), system,
                               psizes, setup.found.node_to_partition, setup.data_sizes,
                               setup.base)
    sampling, summary = sketch_setup(cfg, work, n, system, psizes, cal)
    artifacts: dict[str, Any] = {"sampling_plan.json": summary}
    if cal is not None:
        artifacts[sketch_calibration.CALIBRATION_FILE] = (  # keeps NaN, as its reader expects
            lambda path, cal=cal: sketch_calibration.write_sketch_calibration(path, cal))
    k = max(1, round(float(sampling[0].q.sum())))
    artifacts["channel.json"] = _channel_summary(system.channel, k, cfg)
    plan, system, sizes = sampling
    return SetupResult(cfg, {"plan": plan, "system": system, "sizes": sizes}, artifacts)


def sketch_system(cfg: ConfigLike, work, num_clients: int, known: dict[int, int] | None = None):
    """Paper B's system model (B.3) and the clients' data sizes a_n; ``known`` (the
    server-known partition sizes) is reused when it covers exactly the ``num_clients``
    partitions, so the training set is partitioned once."""
    cfg = RunConfig.coerce(cfg)
    shapes = lora.factor_shapes(work.model)
    head = sum(v.numel() for v in lora.get_head(work.model).values())
    system = sketch_plan.system_model(cfg, num_clients, cfg.training.lora_rank,
                                      sum(s.d + s.k for s in shapes), head)
    if known and sorted(known) == list(range(num_clients)):
        return system, [known[i] for i in range(num_clients)]
    train, _ = workload.splits(cfg)
    sizes = partitioning.partition_sizes(
        train, cfg.partitioning.partitioner, num_clients, seed=cfg.run.seed,
        dirichlet_alpha=cfg.partitioning.dirichlet_alpha,
        shards_per_client=cfg.partitioning.shards_per_client,
    )
    return system, sizes


def sketch_pilot(cfg: ConfigLike, grid: Grid, work, test, device, system, sizes, node_to_client,
                 data_sizes, base=None) -> sketch_calibration.SketchCalibration:
    """``sketch-calibration = "auto"``: ``sketch-pilot-rounds`` rounds of the sketch strategy
    at each (q, k) of :func:`fedsoft.sketching.calibration.pilot_settings` (uniform q, common k),
    each from the initial adapter on this federation, the server-side test loss after every
    round; then alpha0, alpha1, xi fitted to the loss curves (B.4)."""
    cfg = RunConfig.coerce(cfg)
    rank, rounds = cfg.training.lora_rank, cfg.sketching.sketch_pilot_rounds
    fallback = sketch_plan.objective(cfg.with_values({"sketch-calibration": ""}))
    initial = to_record(lora.to_arrays(work.model))
    runs = []
    for name, q, k in sketch_calibration.pilot_settings(rank, cfg.sketching.sampling_q):
        pcfg = cfg.with_values({"sampling": "uniform", "sketch-k": "fixed", "sampling-q": q,
                                "sketch-ratio": k / rank, "checkpoint-every": 0})
        p = uniform_plan(system, np.asarray(sizes, dtype=np.float64), fallback, q, k,
                         draws=cfg.sketching.sketch_mc_draws, seed=cfg.run.seed)
        from .factory import make_strategy  # noqa: PLC0415 - the factory imports this module

        strategy = make_strategy(pcfg, sampling=(p, system, np.asarray(sizes, np.float64)),
                                 node_to_client=node_to_client, data_sizes=data_sizes)
        losses: dict[int, float] = {}

        def pilot_eval(server_round: int, arrays: ArrayRecord, losses=losses) -> MetricRecord:
            lora.from_arrays(work.model, to_numpy(arrays))
            loss, acc, _ = evaluate(work.runner, test, device)
            release(work.model)
            losses[server_round] = loss
            return MetricRecord({"accuracy": acc, "loss": loss})

        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                       timeout=cfg.run.round_timeout,
                       train_config=train_config(pcfg, base), evaluate_fn=pilot_eval)
        curve = np.array([losses.get(t, np.nan) for t in range(rounds + 1)])
        print(f"[fedsoft] sketch pilot {name}: q {q:g}, k {k}/{rank}, loss "
              f"{[round(float(x), 4) for x in curve]}", flush=True)
        runs.append(sketch_calibration.PilotRun(name, p.q, p.k, np.asarray(sizes, np.float64),
                                                rank, sketch_calibration.fill_losses(curve)))
    lora.from_arrays(work.model, to_numpy(initial))
    cal = sketch_calibration.fit_constants(runs, fallback,
                                           target_fraction=cfg.sketching.sketch_pilot_target,
                                           source="auto pilot")
    for w in cal.warnings:
        print(f"[fedsoft] WARNING sketch calibration: {w}", flush=True)
    return cal


def sketch_setup(cfg: ConfigLike, work, num_clients: int, system=None, sizes=None,
                 calibration: sketch_calibration.SketchCalibration | None = None):
    """Paper B before round 1: system model, data shares a_n, the (q, k) plan (printed; its
    table goes to sampling_plan.json once the run directory is opened). The constants of J come
    from ``calibration`` when given (the auto pilot), else from the run config."""
    cfg = RunConfig.coerce(cfg)
    if system is None or sizes is None:
        system, sizes = sketch_system(cfg, work, num_clients)
    plan = sketch_plan.plan(cfg, system, sizes, calibration)
    obj = sketch_plan.objective(cfg, calibration)
    table = sketch_plan.plan_table(plan, system, sizes)
    summary = {"sampling": cfg.sketching.sampling, "objective": plan.objective,
               "uniform_objective": plan.uniform_objective,
               "expected_round_s": plan.expected_round_s,
               "constants": {"alpha0": obj.alpha0, "alpha1": obj.alpha1, "xi": obj.xi,
                             "calibration": cfg.sketching.sketch_calibration},
               "clients": table}
    print(f"[fedsoft] sketch plan ({cfg.sketching.sampling}): E[participants] "
          f"{float(plan.q.sum()):.2f}, E[round] {plan.expected_round_s:.2f} s, objective "
          f"{plan.objective:.4g} (uniform {plan.uniform_objective:.4g}); alpha0 "
          f"{obj.alpha0:.4g}, alpha1 {obj.alpha1:.4g}, xi {obj.xi:.4g}; q "
          f"{[round(float(x), 3) for x in plan.q]}, k {plan.k.tolist()}", flush=True)
    return (plan, system, np.asarray(sizes, dtype=np.float64)), summary


