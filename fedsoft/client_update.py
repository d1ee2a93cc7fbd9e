"""A client's round without Flower: load global arrays, train locally, build the reply."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedsoft import lora, workload
from fedsoft.models import pick_device
from fedsoft.train import train_local


def local_round(
    cfg: Mapping[str, Any],
    global_arrays: Mapping[str, np.ndarray],
    partition_id: int,
    num_partitions: int,
    server_round: int,
) -> tuple[dict[str, np.ndarray], dict[str, float | int]]:
    """Train on this node's partition starting from the global LoRA factors and head.

    Returns the reply arrays (dense: every factor and head parameter) and scalar metrics;
    ``num-examples`` is the partition size, the data share p_i of eq. (3)/(5).
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id = {partition_id}: must be in [0, {num_partitions})")
    work = workload.build_workload(cfg)
    lora.from_arrays(work.model, global_arrays)
    loader, n_part = workload.train_loader(cfg, work, partition_id, num_partitions, server_round)
    result = train_local(
        work.model,
        loader,
        epochs=int(cfg["local-epochs"]),
        steps=int(cfg["local-steps"]),
        lr=float(cfg["lr"]),
        weight_decay=float(cfg["weight-decay"]),
        zeta=float(cfg["zeta"]),
        device=pick_device(str(cfg["device"])),
    )
    work.model.cpu()
    metrics: dict[str, float | int] = {
        "num-examples": int(n_part),
        "train-loss": float(result.loss),
        "orth-loss": float(result.orth_loss),
        "steps": int(result.steps),
    }
    return lora.to_arrays(work.model), metrics
