"""fedsoft ServerApp: resolve the run config, build the strategy, run, log, save the adapter."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsoft import checkpoint, lora
from fedsoft.config import resolve
from fedsoft.runlog import RunLog, default_run_dir, progress_line
from fedsoft.sketching import calibration as sketch_calibration
from fedsoft.sketching import plan as sketch_plan
from fedsoft.sketching.optimizer import uniform_plan
from fedsoft.task import data, workload
from fedsoft.task.models import pick_device
from fedsoft.task.train import evaluate
from fedsoft.wireless import plan as tsfa_plan
from fedsoft.wireless.calibration import append_scores, keep_scores_through, layer_scores
from fedsoft.wireless.channel import snr_line
from strategies import messages, pilot
from strategies.discovery import discover, wait_for_nodes
from strategies.factory import make_strategy
from strategies.records import to_numpy, to_record

APP_DIR = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = ServerApp()


def sketch_system(cfg, work, num_clients: int, known: dict[int, int] | None = None):
    """Paper B's system model (B.3) and the clients' data sizes a_n; ``known`` (the
    server-known partition sizes) is reused when it covers exactly the ``num_clients``
    partitions, so the training set is partitioned once."""
    shapes = lora.factor_shapes(work.model)
    head = sum(v.numel() for v in lora.get_head(work.model).values())
    system = sketch_plan.system_model(cfg, num_clients, cfg.training.lora_rank,
                                      sum(s.d + s.k for s in shapes), head)
    if known and sorted(known) == list(range(num_clients)):
        return system, [known[i] for i in range(num_clients)]
    train, _ = workload.splits(cfg)
    sizes = data.partition_sizes(
        train, cfg.partitioning.partitioner, num_clients, seed=cfg.run.seed,
        dirichlet_alpha=cfg.partitioning.dirichlet_alpha,
        shards_per_client=cfg.partitioning.shards_per_client,
    )
    return system, sizes


def sketch_pilot(cfg, grid: Grid, work, test, device, system, sizes, node_to_client,
                 data_sizes, base=None) -> sketch_calibration.SketchCalibration:
    """``sketch-calibration = "auto"``: ``sketch-pilot-rounds`` rounds of the sketch strategy
    at each (q, k) of :func:`fedsoft.sketching.calibration.pilot_settings` (uniform q, common k),
    each from the initial adapter on this federation, the server-side test loss after every
    round; then alpha0, alpha1, xi fitted to the loss curves (B.4)."""
    rank, rounds = cfg.training.lora_rank, cfg.sketching.sketch_pilot_rounds
    fallback = sketch_plan.objective(cfg.with_values({"sketch-calibration": ""}))
    initial = to_record(lora.to_arrays(work.model))
    runs = []
    for name, q, k in sketch_calibration.pilot_settings(rank, cfg.sketching.sampling_q):
        pcfg = cfg.with_values({"sampling": "uniform", "sketch-k": "fixed", "sampling-q": q,
                                "sketch-ratio": k / rank, "checkpoint-every": 0})
        p = uniform_plan(system, np.asarray(sizes, dtype=np.float64), fallback, q, k,
                         draws=cfg.sketching.sketch_mc_draws, seed=cfg.run.seed)
        strategy = make_strategy(pcfg, sampling=(p, system, np.asarray(sizes, np.float64)),
                                 node_to_client=node_to_client, data_sizes=data_sizes)
        losses: dict[int, float] = {}

        def pilot_eval(server_round: int, arrays: ArrayRecord, losses=losses) -> MetricRecord:
            lora.from_arrays(work.model, to_numpy(arrays))
            loss, acc, _ = evaluate(work.model, test, device)
            work.model.cpu()
            losses[server_round] = loss
            return MetricRecord({"accuracy": acc, "loss": loss})

        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                       timeout=cfg.run.round_timeout,
                       train_config=messages.train_config(pcfg, base), evaluate_fn=pilot_eval)
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


def sketch_setup(cfg, work, num_clients: int, system=None, sizes=None,
                 calibration: sketch_calibration.SketchCalibration | None = None):
    """Paper B before round 1: system model, data shares a_n, the (q, k) plan (printed; its
    table goes to sampling_plan.json once the run directory is opened). The constants of J come
    from ``calibration`` when given (the auto pilot), else from the run config."""
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


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds with server-side evaluation after each.

    Nothing in the run directory is written or replaced until the config is resolved, the
    strategy is built and a resume is known to be compatible with its checkpoint."""
    base = resolve(context.run_config, APP_DIR / "conf")  # what every node resolves too
    cfg = base
    resume = checkpoint.load(cfg.run.resume_from) if cfg.run.resume_from else None
    if resume is not None and not cfg.run.run_dir:  # continue in the checkpoint's run directory
        cfg = cfg.with_values({"run-dir": str(resume[2]["config"]["run-dir"])})
    run_dir = Path(cfg.run.run_dir or default_run_dir(cfg.run.strategy)).resolve()
    cfg = cfg.with_values({"run-dir": str(run_dir)})  # clients keep their error memory there
    run = RunLog(run_dir, cfg)  # writes nothing before run.open()
    num_rounds = cfg.run.num_server_rounds
    print(f"[fedsoft] run dir: {run.dir}", flush=True)

    node_ids = wait_for_nodes(grid, cfg.run.min_available_nodes)
    work = workload.build_workload(cfg)
    tsfa, offline = None, None
    if cfg.run.strategy in ("tsfa", "osfa"):
        shapes = lora.factor_shapes(work.model)
        heads = [v.numel() for v in lora.get_head(work.model).values()]
        payload = tsfa_plan.payload_bits_fn(cfg, [(s.name, s.d, s.k) for s in shapes], heads)
        pilot.ensure_calibration(  # bound-calibration = "auto": pilot run -> calibration.json
            grid, cfg, node_ids, base=base, d_plus_k_total=sum(s.d + s.k for s in shapes),
            payload_bits=payload, resume_config=resume[2]["config"] if resume else None)
        tsfa = tsfa_plan.plan(cfg, num_clients=len(node_ids),
                              d_plus_k_total=sum(s.d + s.k for s in shapes), payload_bits=payload)
        print(f"[fedsoft] {cfg.run.strategy.upper()} budget T_bar = {tsfa.T_bar:.4g} s "
              f"(nominal dense round {tsfa.dense_nominal_s:.4g} s), payload model "
              f"{tsfa.payload_model}, P3 {tsfa.controller.solver_used}, empty-queue rho "
              f"{'rho_min' if tsfa.start_rho is None else f'{tsfa.start_rho:.4f}'}", flush=True)
        if tsfa.offline is not None:
            offline = tsfa_plan.offline_table(tsfa.offline)
            print(tsfa_plan.format_table(offline), flush=True)
        cfg = cfg.with_values({"lora-rank": tsfa.rank})
        work = workload.build_workload(cfg)
    test = workload.test_loader(cfg, work)
    device = pick_device(cfg.run.device)
    found = discover(grid, node_ids)  # stable client identities and partition count
    sizes = workload.server_partition_sizes(cfg, found.num_partitions)
    sampling, sketch_summary, sketch_cal = None, None, None
    if cfg.run.strategy == "sketch":
        system, psizes = sketch_system(cfg, work, len(node_ids), known=sizes)
        if cfg.sketching.sketch_calibration == "auto":
            saved = run_dir / sketch_calibration.CALIBRATION_FILE
            if resume is not None:  # the plan the run started with; a resume never re-pilots
                first = Path(str(resume[2]["config"]["run-dir"])) / saved.name
                src = saved if saved.is_file() else first
                if not src.is_file():
                    raise checkpoint.CheckpointError(
                        f"resume-from={cfg.run.resume_from!r}: sketch-calibration = 'auto' but no "
                        f"{saved.name} in {run_dir} or in the checkpoint's run-dir, so the "
                        "sampling plan the run started with is unknown")
                sketch_cal = sketch_calibration.load_sketch_calibration(src)
            else:
                sketch_cal = sketch_pilot(cfg, grid, work, test, device, system, psizes,
                                          found.node_to_partition, sizes, base)
        sampling, sketch_summary = sketch_setup(cfg, work, len(node_ids), system, psizes,
                                                sketch_cal)
    channel_summary = None
    if tsfa is not None or sampling is not None:
        channel = tsfa.channel if tsfa is not None else sampling[1].channel
        k = (min(cfg.run.clients_per_round, len(node_ids)) if tsfa is not None
             else max(1, round(float(sampling[0].q.sum()))))
        channel_summary = channel.snr_summary(k)
        print(f"[fedsoft] {snr_line(channel_summary)} (mean SNR over the average channel, "
              f"{cfg.channel.path_loss_model}, equal share 1/{k} of "
              f"{cfg.channel.bandwidth_hz:g} Hz)",
              flush=True)
    strategy = make_strategy(cfg, tsfa=tsfa, sampling=sampling,
                             node_to_client=found.node_to_partition, data_sizes=sizes)
    initial_arrays = lora.to_arrays(work.model)
    first_round = 1
    if resume is not None:
        done, saved_arrays, state = resume
        checkpoint.check_compatible(state["config"], cfg.flat())
        lora.check_arrays(work.model, saved_arrays)
        try:
            strategy.load_state_dict(state["strategy"])
        except Exception as exc:  # noqa: BLE001 - any malformed state is a checkpoint error
            raise checkpoint.CheckpointError(
                f"resume-from={cfg.run.resume_from!r}: strategy state does not fit this run "
                f"({type(exc).__name__}: {exc})") from exc
    # validated and compatible: from here on the run directory is written
    run.config = cfg.flat()
    run.open(resume[2]["metrics"] if resume is not None else None)
    if offline is not None:
        run.write_json("offline.json", offline)
    if sketch_summary is not None:
        run.write_json("sampling_plan.json", sketch_summary)
    if sketch_cal is not None:
        sketch_calibration.write_sketch_calibration(
            run.dir / sketch_calibration.CALIBRATION_FILE, sketch_cal)
    if channel_summary is not None:
        run.write_json("channel.json", channel_summary)
    if resume is not None:
        done, saved_arrays, state = resume
        initial_arrays = saved_arrays
        first_round = done + 1
        print(f"[fedsoft] resumed from {cfg.run.resume_from} after round {done}", flush=True)
    # a reused run-dir: rounds after the checkpoint (resume) or every round (fresh run) go
    keep_scores_through(run.dir, first_round - 1 if resume is not None else -1)
    every = cfg.run.checkpoint_every

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Server-side evaluation of the global adapter (and its SOFT scores, for calibration)."""
        lora.from_arrays(work.model, to_numpy(arrays))
        append_scores(run.dir, server_round, layer_scores(work.model))
        loss, acc, _ = evaluate(work.model, test, device)
        work.model.cpu()
        return MetricRecord({"accuracy": acc, "loss": loss})

    def on_round(server_round: int, arrays: ArrayRecord, records: RecordDict) -> None:
        """One metrics.jsonl row per round (fsynced), the progress line, checkpoints."""
        train, notes = records["train"], records["notes"]
        evaluation = records.get("evaluate", MetricRecord({}))
        row = run.append({"round": server_round, **dict(evaluation), **dict(train),
                          **dict(notes)})
        print(progress_line(row, num_rounds), flush=True)
        if every and server_round > 0 and (server_round % every == 0 or server_round == num_rounds):
            path = checkpoint.save(
                run.dir / "checkpoints", server_round, to_numpy(arrays),
                {"config": cfg.flat(), "strategy": strategy.state_dict(), "metrics": run.rows},
                save_adapter=lambda p: work.model.save_pretrained(str(p)),
            )
            print(f"[fedsoft] checkpoint {path}", flush=True)

    initial = to_record(initial_arrays)
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=num_rounds,
        first_round=first_round,
        timeout=cfg.run.round_timeout,
        train_config=messages.train_config(cfg, base),
        evaluate_fn=evaluate_fn,
        on_round=on_round,
    )
    # no aggregated round at all (every reply failed): the adapter is the initial one
    lora.from_arrays(work.model, to_numpy(result.arrays if len(result.arrays) else initial))
    work.model.save_pretrained(str(run.dir / "adapter"))
    rounds_done = sum(1 for r in run.rows if int(r.get("round", 0)) > 0)
    skipped = sum(1 for r in run.rows if r.get("skipped"))
    print(f"[fedsoft] done: {rounds_done}/{num_rounds} rounds ({skipped} skipped), metrics "
          f"{run.metrics_path}, adapter {run.dir / 'adapter'}", flush=True)
