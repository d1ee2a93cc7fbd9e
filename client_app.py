"""fedsoft ClientApp: local LoRA training on this SuperNode's partition."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

from flwr.app import Array, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsoft.attacks import attack_class, hostile_reply
from fedsoft.client_update import local_round
from fedsoft.compression.client_state import load_ef, save_ef, simulated_failure
from fedsoft.compression.downlink import apply_change
from fedsoft.config import RunConfig, resolve
from strategies.messages import ARRAYS, CONFIG, METRICS, TrainInstruction
from strategies.records import to_numpy, to_record

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# dependencies' deprecation notices (transformers, peft, ray) tell a fedsoft user nothing
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|ray)\b")

EF_KEY = "error-feedback"
DOWNLINK_KEY = "downlink-reference"  # the broadcast model this node holds, and its round
DOWNLINK_ROUND_KEY = "downlink-round"
APP_DIR = Path(__file__).resolve().parent
_BASE: dict[str, RunConfig] = {}  # resolved context.run_config, once per run and process


def base_config(context: Context) -> RunConfig:
    """This node's own resolution of ``context.run_config`` (defaults, preset, overrides),
    computed once per run config and process; the server sends only what it changed."""
    key = repr(sorted(context.run_config.items()))
    if key not in _BASE:
        _BASE.clear()
        _BASE[key] = resolve(context.run_config, APP_DIR / "conf")
    return _BASE[key]

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train from the received global LoRA state; reply with the (sparse) update and metrics.

    The error-feedback memory (eqs. 11-14) stays on this node in ``context.state`` across rounds.
    """
    instruction = TrainInstruction.from_record(msg.content[CONFIG])
    cfg, plan = instruction.config(base_config(context)), instruction.plan
    partition_id = int(context.node_config["partition-id"])
    server_round = plan.server_round
    if simulated_failure(cfg.run.seed, server_round, partition_id,
                         cfg.run.fail_fraction):
        if cfg.run.fail_mode == "timeout":
            time.sleep(cfg.run.round_timeout + 5.0)
        raise RuntimeError(f"simulated failure of partition {partition_id} in round "
                           f"{server_round} (fail-fraction = {cfg.run.fail_fraction})")
    hostile = cfg.run.attack_partition == partition_id
    if hostile and cfg.run.attack_mode == "crash":
        raise RuntimeError(f"attack-mode = 'crash': partition {partition_id} fails round "
                           f"{server_round}")
    received = to_numpy(msg.content[ARRAYS])
    global_arrays = _broadcast_model(received, plan.downlink_base, server_round, context,
                                     keep=cfg.compression.downlink_sparsity > 0)
    state_dir = _state_dir(cfg, context)
    if EF_KEY in context.state:
        ef_state = to_numpy(context.state[EF_KEY])
    elif state_dir is not None:  # a restarted node or a resumed run: continue from disk
        ef_state, _ = load_ef(state_dir, partition_id, server_round)
    else:
        ef_state = None
    arrays, metrics, ef_new = local_round(
        cfg,
        global_arrays,
        partition_id=partition_id,
        num_partitions=int(context.node_config["num-partitions"]),
        server_round=server_round,
        node_id=plan.client_key,  # the server's seed key
        sparsity=plan.sparsity,
        ef_state=ef_state,
        sketch_k=plan.sketch_size,
    )
    if ef_new is not None:
        context.state[EF_KEY] = to_record(ef_new)
        if state_dir is not None:
            save_ef(state_dir, partition_id, server_round, ef_new,
                    keep_every=cfg.run.checkpoint_every)
    metrics["server-round"] = server_round  # binds the reply to the round it answers
    record = to_record(arrays)
    if hostile:  # fault injection (attack-partition): a reply the server must drop
        bad = hostile_reply(attack_class(cfg.run.attack_mode, server_round), arrays,
                            metrics, global_arrays, seed=server_round)
        record = to_record(bad.arrays)
        for key, raw in bad.raw.items():
            record[key] = Array(dtype=raw.dtype, shape=raw.shape, stype="numpy.ndarray",
                                data=raw.data)
        metrics = bad.metrics
    content = RecordDict({ARRAYS: record, METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def _broadcast_model(received: dict, base: int | None, server_round: int, context: Context,
                     *, keep: bool) -> dict:
    """The model to train from: ``received`` itself, or (``base`` set) the broadcast change
    applied to the reference this node kept from round ``base``; kept for the next round when
    the downlink is compressed (``keep``)."""
    if base is None:
        model = received
    else:
        held = (int(context.state[DOWNLINK_ROUND_KEY]["round"])
                if DOWNLINK_ROUND_KEY in context.state and DOWNLINK_KEY in context.state
                else None)
        if held != base:
            raise RuntimeError(
                f"downlink: round {server_round} sends the change since round {base}, but this "
                f"node holds {'no broadcast model' if held is None else f'round {held}'}; the "
                "server sends it the full model next time")
        model = apply_change(to_numpy(context.state[DOWNLINK_KEY]), received)
    if keep:
        context.state[DOWNLINK_KEY] = to_record(model)
        context.state[DOWNLINK_ROUND_KEY] = ConfigRecord({"round": server_round})
    return model


def _state_dir(cfg: RunConfig, context: Context) -> Path | None:
    """Where this node keeps its error memory: node-config ``state-dir``, ``client-state-dir``,
    or ``<run-dir>/client-state``; None when none is known."""
    if context.node_config.get("state-dir"):
        return Path(str(context.node_config["state-dir"]))
    if cfg.run.client_state_dir:
        return Path(cfg.run.client_state_dir)
    return Path(cfg.run.run_dir) / "client-state" if cfg.run.run_dir else None


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    info = MetricRecord({
        "partition-id": int(context.node_config.get("partition-id", -1)),
        "num-partitions": int(context.node_config.get("num-partitions", 0)),
    })
    return Message(content=RecordDict({"info": info}), reply_to=msg)
