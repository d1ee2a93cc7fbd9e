"""fedsoft ServerApp: resolve the run config, set up the strategy, run, log, save the adapter."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsoft import checkpoint, lora
from fedsoft.config import resolve
from fedsoft.runlog import RunLog, default_run_dir, progress_line
from fedsoft.task import workload
from fedsoft.task.models import pick_device, release
from fedsoft.task.train import evaluate
from fedsoft.wireless.calibration import append_scores, keep_scores_through, layer_scores
from strategies import messages
from strategies.discovery import discover, wait_for_nodes
from strategies.factory import build_strategy
from strategies.records import to_numpy, to_record
from strategies.setup import ServerSetup

APP_DIR = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# dependencies' deprecation notices (transformers, peft, ray) tell a fedsoft user nothing
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|ray)\b")

app = ServerApp()


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
    found = discover(grid, node_ids)  # stable client identities and partition count
    setup = ServerSetup(grid, base, node_ids, found,
                        workload.server_partition_sizes(cfg, found.num_partitions),
                        resume[2]["config"] if resume is not None else None)
    strategy, planned = build_strategy(cfg, setup)  # TSFA's offline stage, paper B's plan
    cfg = planned.run_config
    work = workload.build_workload(cfg)
    test = workload.test_loader(cfg, work)
    device = pick_device(cfg.run.device)
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
    for name, content in planned.artifacts.items():  # offline.json, channel.json, ...
        if callable(content):
            content(run.dir / name)
        else:
            run.write_json(name, content)
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
        loss, acc, _ = evaluate(work.runner, test, device)
        release(work.model)
        out = {"accuracy": acc, "loss": loss}
        if work.spec.causal:  # loss per response token; accuracy = exact match of the answer
            out["perplexity"] = math.exp(loss) if loss < 700.0 else math.inf
        return MetricRecord(out)

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
