"""Dense federated LoRA ("ideal LoRA"): seeded K-of-N sampling, validated FedAvg of A and B."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsoft.aggregate import ReplyError, check_like, check_weight, weighted_average
from strategies.records import to_numpy, to_record


class LoRAFedAvg(FedAvg):
    """FedAvg over LoRA factors and the dense head, the paper's ideal (uncompressed) LoRA.

    * samples ``clients_per_round`` of the connected nodes with a seeded ``random.Random``
      after waiting for ``min_available_nodes`` (K is capped at N);
    * sends one message per sampled node (hook :meth:`node_config` adds per-node values);
    * validates every reply (keys, shapes, finite values, weight) and drops invalid ones with a
      logged reason, so a bad reply never reaches the global model;
    * aggregates A and B separately, weighted by data share (eq. 5);
    * measures uplink bytes from the ArrayRecords actually received (``count_bytes``);
    * keeps per-round statistics in :attr:`round_stats` for the run's metrics.jsonl.

    Evaluation is server-side (``evaluate_fn`` of :meth:`start`), so no evaluate messages go out.
    """

    def __init__(
        self,
        clients_per_round: int,
        *,
        min_available_nodes: int = 1,
        seed: int = 0,
        weighted_by_key: str = "num-examples",
        node_wait_timeout: float = 600.0,
    ) -> None:
        if clients_per_round < 1:
            raise ValueError(f"clients-per-round = {clients_per_round}: must be >= 1")
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=1,
            min_evaluate_nodes=0,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
        )
        self.clients_per_round = clients_per_round
        self.rng = random.Random(seed)
        self.node_wait_timeout = node_wait_timeout
        self.round_stats: dict[int, dict[str, Any]] = {}
        self.global_arrays: dict[str, np.ndarray] = {}
        self._round_t0 = time.perf_counter()
        self.reply_bytes: dict[int, int] = {}  # node id -> bytes received this round (valid)

    # -- sampling -------------------------------------------------------------------------
    def sample_nodes(self, grid: Grid) -> tuple[list[int], list[int]]:
        """Wait for ``min_available_nodes``, then draw K = min(clients_per_round, N) nodes."""
        deadline = time.time() + self.node_wait_timeout
        while len(all_ids := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.time() > deadline:
                raise TimeoutError(
                    f"min-available-nodes = {self.min_available_nodes}: only {len(all_ids)} "
                    f"SuperNodes connected after {self.node_wait_timeout:.0f} s"
                )
            log(INFO, "waiting for SuperNodes: %d/%d", len(all_ids), self.min_available_nodes)
            time.sleep(1.0)
        k = min(self.clients_per_round, len(all_ids))
        return sorted(self.rng.sample(all_ids, k)), all_ids

    def prepare_round(self, server_round: int, node_ids: list[int], all_ids: list[int]) -> None:
        """Hook after sampling, before messages are built (TSFA decides rho and bandwidth)."""

    def node_config(self, server_round: int, node_id: int, config: ConfigRecord) -> ConfigRecord:
        """Per-node ConfigRecord; subclasses add their per-node values (ratio, bandwidth)."""
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        return cfg

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        node_ids, all_ids = self.sample_nodes(grid)
        self.global_arrays = to_numpy(arrays)
        self.round_stats[server_round] = {"num_available": len(all_ids), "sampled": node_ids}
        self._round_t0 = time.perf_counter()
        log(INFO, "round %d: sampled %d of %d nodes", server_round, len(node_ids), len(all_ids))
        self.prepare_round(server_round, node_ids, all_ids)
        return [
            Message(
                content=RecordDict(
                    {self.arrayrecord_key: arrays,
                     self.configrecord_key: self.node_config(server_round, nid, config)}
                ),
                message_type=MessageType.TRAIN,
                dst_node_id=nid,
                group_id=str(server_round),
            )
            for nid in node_ids
        ]

    # -- aggregation ----------------------------------------------------------------------
    def decode_reply(self, server_round: int, node_id: int, arrays: dict[str, np.ndarray],
                     metrics: MetricRecord) -> dict[str, np.ndarray]:
        """Validate one reply and return the arrays to aggregate (dense: the full factors)."""
        check_like(self.global_arrays, arrays, what=f"reply of node {node_id}")
        return arrays

    def combine(self, server_round: int, decoded: list[dict[str, np.ndarray]],
                weights: list[float]) -> dict[str, np.ndarray]:
        """New global arrays from the valid replies (eq. 5)."""
        return weighted_average(decoded, weights)

    def _unpack(self, msg: Message) -> tuple[dict[str, np.ndarray], MetricRecord, int]:
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise ReplyError(
                f"expected one ArrayRecord and one MetricRecord, got "
                f"{len(content.array_records)} and {len(content.metric_records)}"
            )
        record = next(iter(content.array_records.values()))
        metrics = next(iter(content.metric_records.values()))
        if self.weighted_by_key not in metrics:
            raise ReplyError(f"metrics lack the weighting key '{self.weighted_by_key}'")
        return to_numpy(record), metrics, int(record.count_bytes())

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.round_stats.setdefault(server_round, {})
        round_s = time.perf_counter() - self._round_t0
        self.reply_bytes = {}
        decoded, weights, losses, uplink, dropped, train_s = [], [], [], 0, [], 0.0
        received = 0
        for msg in replies:
            nid = msg.metadata.src_node_id
            if msg.has_error():
                dropped.append(f"node {nid}: error {msg.error.reason}")
                continue
            try:
                arrays, metrics, nbytes = self._unpack(msg)
                uplink += nbytes  # bytes received, valid or not
                received += 1
                weight = check_weight(metrics[self.weighted_by_key], self.weighted_by_key)
                decoded.append(self.decode_reply(server_round, nid, arrays, metrics))
                weights.append(weight)
                self.reply_bytes[nid] = nbytes
                if "train-loss" in metrics:
                    losses.append(float(metrics["train-loss"]))
                train_s += float(metrics.get("train-s", 0.0))
            except (ReplyError, ValueError, KeyError, TypeError) as err:
                dropped.append(f"node {nid}: {err}")
        for reason in dropped:
            log(WARNING, "round %d: dropped reply of %s", server_round, reason)
        stats.update(num_clients=len(decoded), uplink_bytes=uplink, dropped=len(dropped),
                     replies_received=received,
                     round_s=round(round_s, 3), train_s=round(train_s, 3))
        if not decoded:
            log(WARNING, "round %d: no valid replies, global model unchanged", server_round)
            return None, None
        new_arrays = self.combine(server_round, decoded, weights)
        train_loss = float(np.average(losses, weights=weights)) if len(losses) == len(weights) \
            else float("nan")
        stats["train_loss"] = train_loss
        return to_record(new_arrays), MetricRecord({"train-loss": train_loss})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation is centralised on the server's held-out split: no client messages."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "\t%s: K = %d clients per round, seeded sampling, server-side evaluation",
            type(self).__name__, self.clients_per_round)
