"""A client's round without Flower: load global arrays, train locally, build the reply."""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import nullcontext

import numpy as np
import torch

from fedsoft import lora
from fedsoft.compression.error_feedback import ErrorFeedback
from fedsoft.compression.update import SparseSettings, encode_update
from fedsoft.config import ConfigLike, RunConfig
from fedsoft.sketching.sketch import layer_indices, sketch_reply, sketched_training
from fedsoft.task import workload
from fedsoft.task.models import pick_device, release
from fedsoft.task.train import train_local


def ef_signature(cfg: ConfigLike, settings: SparseSettings) -> str:
    """Error memory is reset when the model, rank or compression layout changes."""
    cfg = RunConfig.coerce(cfg)
    return f"{cfg.training.model}|r={cfg.training.lora_rank}|{settings.signature}"


def local_round(
    cfg: ConfigLike,
    global_arrays: Mapping[str, np.ndarray],
    partition_id: int,
    num_partitions: int,
    server_round: int,
    *,
    node_id: int = 0,
    sparsity: float | None = None,
    ef_state: Mapping[str, np.ndarray] | None = None,
    sketch_k: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float | int], dict[str, np.ndarray] | None]:
    """Train on this node's partition starting from the global LoRA factors and head.

    Returns the reply arrays, scalar metrics and the new error-feedback state. With
    ``sparsifier = dense`` the reply is every factor and head parameter (ideal LoRA) and there is
    no error memory; otherwise it is the wire payload of :func:`encode_update` (eqs. 10-14).
    ``num-examples`` is the partition size, the data share p_i of eqs. (3)/(5).
    With ``sketch_k`` (paper B) only ``sketch_k`` of the r rank components per layer are trained
    (indices from the shared seed) and the reply is their deltas (:mod:`fedsoft.sketching.sketch`).
    """
    cfg = RunConfig.coerce(cfg)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id = {partition_id}: must be in [0, {num_partitions})")
    work = workload.build_workload(cfg)
    lora.from_arrays(work.model, global_arrays)
    loader, n_part = workload.train_loader(cfg, work, partition_id, num_partitions, server_round)
    indices = None
    if sketch_k is not None:
        indices = layer_indices(global_arrays, int(sketch_k), cfg.run.seed, server_round,
                                node_id)
    # dropout & co.: seeded per (run, round, partition) so the same seed gives the same run
    torch.manual_seed(int(np.random.SeedSequence(
        [cfg.run.seed, server_round, partition_id]).generate_state(1)[0]))
    t0 = time.perf_counter()
    with sketched_training(work.model, indices) if indices is not None else nullcontext():
        result = train_local(
            work.runner,
            loader,
            epochs=cfg.training.local_epochs,
            steps=cfg.training.local_steps,
            lr=cfg.training.lr,
            weight_decay=cfg.training.weight_decay,
            zeta=cfg.compression.zeta,
            device=pick_device(cfg.run.device),
        )
    train_s = time.perf_counter() - t0
    release(work.model)
    metrics: dict[str, float | int] = {
        "num-examples": int(n_part),
        "train-loss": float(result.loss),
        "orth-loss": float(result.orth_loss),
        "steps": int(result.steps),
        "train-s": float(train_s),
    }
    local_arrays = lora.to_arrays(work.model)
    if indices is not None:
        metrics["sketch-size"] = int(sketch_k)
        return sketch_reply(global_arrays, local_arrays, indices), metrics, None
    if cfg.compression.sparsifier == "dense":
        return local_arrays, metrics, None
    settings = SparseSettings.from_config(cfg, sparsity)
    signature = ef_signature(cfg, settings)
    ef = ErrorFeedback.from_arrays(ef_state or {}, signature)
    payload, info = encode_update(global_arrays, local_arrays, settings, ef,
                                  server_round=server_round, node_id=node_id)
    metrics["sparsity-ratio"] = settings.sparsity
    metrics["ef-reset"] = int(ef.reset_reason is not None)
    metrics.update({k.replace("_", "-"): float(v) for k, v in info.items()})
    return payload, metrics, ef.to_arrays()
