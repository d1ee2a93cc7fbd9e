"""fedsoft ClientApp: local LoRA training on this SuperNode's partition."""

from __future__ import annotations

import os

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsoft.client_update import local_round
from fedsoft.config import split_message_config
from strategies.records import to_numpy, to_record

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EF_KEY = "error-feedback"

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train from the received global LoRA state; reply with the (sparse) update and metrics.

    The error-feedback memory (eqs. 11-14) stays on this node in ``context.state`` across rounds.
    """
    cfg, extras = split_message_config(dict(msg.content["config"]))
    ef_state = to_numpy(context.state[EF_KEY]) if EF_KEY in context.state else None
    arrays, metrics, ef_new = local_round(
        cfg,
        to_numpy(msg.content["arrays"]),
        partition_id=int(context.node_config["partition-id"]),
        num_partitions=int(context.node_config["num-partitions"]),
        server_round=int(extras.get("server-round", 0)),
        node_id=int(context.node_id),
        sparsity=float(extras["sparsity-ratio"]) if "sparsity-ratio" in extras else None,
        ef_state=ef_state,
        sketch_k=int(extras["sketch-size"]) if "sketch-size" in extras else None,
    )
    if ef_new is not None:
        context.state[EF_KEY] = to_record(ef_new)
    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    info = MetricRecord({
        "partition-id": int(context.node_config.get("partition-id", -1)),
        "num-partitions": int(context.node_config.get("num-partitions", 0)),
    })
    return Message(content=RecordDict({"info": info}), reply_to=msg)
