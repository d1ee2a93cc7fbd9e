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
        min_replies: int = 1,
        node_to_client: dict[int, int] | None = None,
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
        if min_replies < 1:
            raise ValueError(f"min-replies = {min_replies}: must be >= 1")
        self.min_replies = int(min_replies)
        self.node_to_client: dict[int, int] = dict(node_to_client or {})
        self.dense_reply_bytes = 0  # count_bytes of the dense global record, set each round
        self.rng = random.Random(seed)
        self.node_wait_timeout = node_wait_timeout
        self.round_stats: dict[int, dict[str, Any]] = {}
        self.global_arrays: dict[str, np.ndarray] = {}
        self._round_t0 = time.perf_counter()
        self.reply_bytes: dict[int, int] = {}  # node id -> bytes received this round (valid)

    def start(self, *, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              first_round: int = 1, evaluate_fn: Any = None, **kwargs: Any) -> Any:
        """Flower's ``Strategy.start``; ``first_round`` > 1 resumes a run: rounds keep their
        numbers (seeds, channel draws and logs depend on them), ``num_rounds`` stays the total,
        and the round-0 evaluation is skipped."""
        off = int(first_round) - 1
        if off < 0:
            raise ValueError(f"first_round = {first_round}: must be >= 1")
        if off == 0:
            return super().start(grid=grid, initial_arrays=initial_arrays,
                                 num_rounds=num_rounds, evaluate_fn=evaluate_fn, **kwargs)
        names = ("configure_train", "aggregate_train")
        saved = {k: self.__dict__[k] for k in names if k in self.__dict__}
        configure, aggregate = self.configure_train, self.aggregate_train
        self.configure_train = lambda r, *a, **k: configure(r + off, *a, **k)  # type: ignore
        self.aggregate_train = lambda r, *a, **k: aggregate(r + off, *a, **k)  # type: ignore
        shifted = None if evaluate_fn is None else (
            lambda r, arrays: None if r == 0 else evaluate_fn(r + off, arrays))
        try:
            return super().start(grid=grid, initial_arrays=initial_arrays,
                                 num_rounds=max(num_rounds - off, 0), evaluate_fn=shifted,
                                 **kwargs)
        finally:
            for k in names:
                self.__dict__.pop(k, None)
            self.__dict__.update(saved)

    # -- checkpoint state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able strategy state between rounds (sampling RNG); subclasses extend it."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (e.g. when a run resumes from a checkpoint)."""
        version, internal, gauss = state["rng"]
        self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss))

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
        all_ids = self.stable_order(all_ids)
        return self.rng.sample(all_ids, k), all_ids

    def client_key(self, node_id: int) -> int:
        """A node's stable identity for seeds: its partition id when known, else its node id.

        Simulated node ids are random per run; partition ids are not, so keying sampling,
        seeded positions and sketch indices on them makes a seed reproduce a run."""
        return int(self.node_to_client.get(node_id, node_id))

    def client_index(self, node_id: int, all_ids: list[int], num_clients: int,
                     what: str = "clients") -> int:
        """Index of a node among ``num_clients`` model clients (channel, sampling plan): its
        partition id when known, else its rank among the connected ids."""
        idx = self.node_to_client.get(node_id, all_ids.index(node_id))
        if not 0 <= idx < num_clients:
            raise ValueError(f"node {node_id} maps to client {idx}, outside the {num_clients} "
                             f"{what}")
        return idx

    def record_dense_uplink(self, server_round: int, replies: int) -> None:
        """``dense_uplink_bytes``: what dense fp32 LoRA would have sent for this round's replies
        (incl. rejected ones)."""
        stats = self.round_stats.setdefault(server_round, {})
        stats["dense_uplink_bytes"] = int(stats.get("replies_received", replies)) \
            * self.dense_reply_bytes

    def stable_order(self, node_ids: list[int]) -> list[int]:
        """Node ids ordered by client key (partition id), unknown nodes last by id."""
        return sorted(node_ids, key=lambda n: (n not in self.node_to_client,
                                               self.node_to_client.get(n, 0), n))

    def prepare_round(self, server_round: int, node_ids: list[int], all_ids: list[int]) -> None:
        """Hook after sampling, before messages are built (TSFA decides rho and bandwidth)."""

    def node_config(self, server_round: int, node_id: int, config: ConfigRecord) -> ConfigRecord:
        """Per-node ConfigRecord; subclasses add their per-node values (ratio, bandwidth)."""
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        cfg["client-key"] = self.client_key(node_id)
        return cfg

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        node_ids, all_ids = self.sample_nodes(grid)
        self.global_arrays = to_numpy(arrays)
        self.dense_reply_bytes = int(to_record(self.global_arrays).count_bytes())
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
        if len(decoded) < self.min_replies:
            log(WARNING, "round %d: %d valid replies < min-replies = %d, global model unchanged",
                server_round, len(decoded), self.min_replies)
            stats["skipped"] = 1
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
