"""Dense federated LoRA ("ideal LoRA"): seeded K-of-N sampling, validated FedAvg of A and B."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedsoft.aggregate import (
    AcceptedReply,
    ReplyError,
    check_like,
    check_weight,
    weighted_average,
)
from fedsoft.compression.downlink import Broadcast
from fedsoft.config import RunConfig

from .messages import ReplyMetrics, RoundPlan
from .records import ReplyLayout, checked_numpy, to_numpy, to_record
from .setup import ServerSetup, SetupResult

NORM_ROUNDS = 3  # rounds of accepted update norms pooled into the norm bound's reference


class _NoEvaluateNotice(logging.Filter):
    """Drops FedAvg's "fraction_evaluate is set to 0.0" warning: fedsoft evaluates on the
    server (``evaluate_fn``) and never sends evaluate messages, so it says nothing to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("fraction_evaluate is set to 0.0")


_NO_EVALUATE_NOTICE = _NoEvaluateNotice()


class LoRAFedAvg(FedAvg):
    """FedAvg over LoRA factors and the dense head, the paper's ideal (uncompressed) LoRA.

    * samples ``clients_per_round`` of the connected nodes with a seeded ``random.Random``
      after waiting for ``min_available_nodes`` (K is capped at N);
    * sends one message per sampled node (hook :meth:`node_config` adds per-node values);
    * validates every reply in isolation (array bytes and layout before deserialising, the
      round it answers, weight, metrics, finite values, update norm) and drops invalid ones
      with a logged reason, so no reply can end the run or reach the global model;
    * aggregates A and B separately, weighted by data share (eq. 5): the server-known
      partition size (``data_sizes``) when it has one, else the reported ``num-examples``
      capped at ``max_num_examples``; an update whose norm exceeds ``update_norm_bound`` x the
      round's reference norm is dropped; a non-finite or out-of-bound aggregate is not applied;
    * measures uplink bytes from the ArrayRecords actually received and downlink bytes from
      the ones sent (``count_bytes``, as Flower counts them);
    * with a :class:`~fedsoft.compression.downlink.Broadcast` (``downlink-sparsity`` > 0)
      sends each client the compressed change of the broadcast model since it last
      synchronised (or the whole broadcast model) and adds the broadcast's unsent residual to
      replies that are whole models, so aggregation still moves the true global model;
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
        data_sizes: Mapping[int, int] | None = None,
        max_num_examples: int = 1_000_000,
        update_norm_bound: float = 10.0,
        downlink: Broadcast | None = None,
    ) -> None:
        if clients_per_round < 1:
            raise ValueError(f"clients-per-round = {clients_per_round}: must be >= 1")
        flwr_log = logging.getLogger("flwr")
        flwr_log.addFilter(_NO_EVALUATE_NOTICE)  # evaluation is server-side by design
        try:
            super().__init__(
                fraction_train=1.0,
                fraction_evaluate=0.0,
                min_train_nodes=1,
                min_evaluate_nodes=0,
                min_available_nodes=min_available_nodes,
                weighted_by_key=weighted_by_key,
            )
        finally:
            flwr_log.removeFilter(_NO_EVALUATE_NOTICE)
        self.clients_per_round = clients_per_round
        if min_replies < 1:
            raise ValueError(f"min-replies = {min_replies}: must be >= 1")
        self.min_replies = int(min_replies)
        self.node_to_client: dict[int, int] = dict(node_to_client or {})
        self.data_sizes: dict[int, int] = {int(k): int(v) for k, v in (data_sizes or {}).items()}
        if max_num_examples < 1:
            raise ValueError(f"max-num-examples = {max_num_examples}: must be >= 1")
        self.max_num_examples = int(max_num_examples)
        if not np.isfinite(update_norm_bound) or update_norm_bound < 0:
            raise ValueError(f"update-norm-bound = {update_norm_bound}: must be finite and >= 0")
        self.update_norm_bound = float(update_norm_bound)
        self._norm_history: list[list[float]] = []
        self.accepted: list[AcceptedReply] = []
        self._sent: set[int] = set()  # nodes sent a train message this round
        self.dense_reply_bytes = 0  # count_bytes of the dense global record, set each round
        self.rng = random.Random(seed)
        self.node_wait_timeout = node_wait_timeout
        self.round_stats: dict[int, dict[str, Any]] = {}
        self.global_arrays: dict[str, np.ndarray] = {}
        self._round_t0 = time.perf_counter()
        self.reply_bytes: dict[int, int] = {}  # node id -> bytes received this round (valid)
        self.downlink = downlink
        self._synced: dict[int, int] = {}  # node id -> last round it confirmed (downlink)
        self._bases: dict[int, int | None] = {}  # node id -> this round's downlink base
        self._residual: dict[str, np.ndarray] | None = None  # x_{t-1} - xh_t (downlink)

    @classmethod
    def setup(cls, cfg: RunConfig, setup: ServerSetup) -> SetupResult:
        """What this strategy needs before round 1 (nothing here; TSFA and sketching plan)."""
        return SetupResult(cfg)

    @classmethod
    def from_config(cls, cfg: RunConfig, *, node_to_client: dict[int, int] | None = None,
                    data_sizes: Mapping[int, int] | None = None, **parts: Any) -> LoRAFedAvg:
        """Construct from the typed run config (``run`` section) and set-up ``parts``."""
        return cls(cfg.run.clients_per_round, **cls.common_kwargs(cfg, node_to_client,
                                                                  data_sizes), **parts)

    @staticmethod
    def common_kwargs(cfg: RunConfig, node_to_client: dict[int, int] | None,
                      data_sizes: Mapping[int, int] | None) -> dict[str, Any]:
        """Constructor arguments every strategy takes from the ``run`` section."""
        c = cfg.compression
        downlink = (Broadcast(c.downlink_sparsity, c.wire_dtype, c.downlink_history)
                    if c.downlink_sparsity > 0 else None)
        return dict(min_available_nodes=cfg.run.min_available_nodes, seed=cfg.run.seed,
                    min_replies=cfg.run.min_replies, node_to_client=node_to_client,
                    data_sizes=data_sizes, max_num_examples=cfg.run.max_num_examples,
                    update_norm_bound=cfg.run.update_norm_bound, downlink=downlink)

    def start(self, *, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              first_round: int = 1, timeout: float = 3600.0,
              train_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              on_round: Callable[[int, ArrayRecord, RecordDict], None] | None = None,
              **unused: Any) -> Result:
        """Run rounds ``first_round`` .. ``num_rounds`` (Flower's ``Strategy.start``, owned here).

        Each round: :meth:`configure_train`, ``grid.send_and_receive``, :meth:`aggregate_train`,
        then ``evaluate_fn(round, arrays)`` (server-side evaluation; no evaluate messages go
        out) and ``on_round(round, arrays, records)`` with ``records`` a RecordDict of
        ``"train"`` (the round's statistics, a MetricRecord), ``"notes"`` (its text, e.g.
        ``dropped_reasons``, a ConfigRecord) and ``"evaluate"`` (what ``evaluate_fn``
        returned). Round 0 (the initial model) is evaluated when ``first_round`` is 1; a resumed
        run (``first_round`` > 1) keeps the round numbers its seeds and channel draws use."""
        if int(first_round) < 1:
            raise ValueError(f"first_round = {first_round}: must be >= 1")
        if unused.get("evaluate_config") is not None:
            raise ValueError("evaluate_config: evaluation is server-side (evaluate_fn) only")
        config = ConfigRecord() if train_config is None else train_config
        result = Result()
        arrays = initial_arrays
        log(INFO, "%s: rounds %d..%d", type(self).__name__, first_round, num_rounds)
        if first_round == 1:
            self._finish_round(0, arrays, result, evaluate_fn, on_round)
        for server_round in range(int(first_round), int(num_rounds) + 1):
            replies = grid.send_and_receive(
                messages=self.configure_train(server_round, arrays, config, grid),
                timeout=timeout)
            new, _ = self.aggregate_train(server_round, replies)
            if new is not None:
                result.arrays = arrays = new
            self._finish_round(server_round, arrays, result, evaluate_fn, on_round)
        return result

    def _finish_round(self, server_round: int, arrays: ArrayRecord, result: Result,
                      evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
                      on_round: Callable[[int, ArrayRecord, RecordDict], None] | None) -> None:
        train, notes = self.round_records(server_round)
        result.train_metrics_clientapp[server_round] = train
        records = RecordDict({"train": train, "notes": notes})
        if evaluate_fn is not None:
            evaluation = evaluate_fn(server_round, arrays)
            if evaluation is not None:
                result.evaluate_metrics_serverapp[server_round] = evaluation
                records["evaluate"] = evaluation
        if on_round is not None:
            on_round(server_round, arrays, records)

    def round_records(self, server_round: int) -> tuple[MetricRecord, ConfigRecord]:
        """The round's statistics, handed out once: numbers (and lists of numbers) as a
        MetricRecord, everything else (e.g. ``dropped_reasons``, ``aggregate_problem``) as a
        ConfigRecord; the sampled node ids stay inside the strategy. Never raises: numpy
        scalars become Python numbers, a mixed int/float list becomes floats, and a value
        neither record can hold is kept as its JSON text."""
        stats = self.round_stats.pop(server_round, {})
        numbers: dict[str, Any] = {"num_clients": 0, "uplink_bytes": 0, "downlink_bytes": 0}
        text: dict[str, Any] = {}
        for key, value in stats.items():
            if key == "sampled":
                continue
            value = _plain(value)
            if _is_number(value):
                numbers[key] = value
            elif isinstance(value, list) and all(_is_number(v) for v in value):
                numbers[key] = ([float(v) for v in value]
                                if len({type(v) for v in value}) > 1 else value)
            elif isinstance(value, str) or (isinstance(value, list)
                                             and all(isinstance(v, str) for v in value)):
                text[key] = value
            else:
                text[key] = json.dumps(value, default=str)
        return MetricRecord(numbers), ConfigRecord(text)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able strategy state between rounds (sampling RNG); subclasses extend it."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "norm_history": self._norm_history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (e.g. when a run resumes from a checkpoint)."""
        version, internal, gauss = state["rng"]
        self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
        history = [[float(n) for n in r] for r in state.get("norm_history", [])]
        if not all(np.isfinite(n) and n >= 0 for r in history for n in r):
            raise ValueError(f"norm_history holds a negative or non-finite norm: {history}")
        self._norm_history = history

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
        all_ids = self.stable_order(all_ids)
        pool = self.eligible(all_ids)
        k = min(self.clients_per_round, len(pool))
        return self.rng.sample(pool, k), all_ids

    def eligible(self, all_ids: list[int]) -> list[int]:
        """Connected nodes that may be sampled (all here; TSFA and sketching need a slot)."""
        return all_ids

    def client_key(self, node_id: int) -> int:
        """A node's stable identity for seeds: its partition id when known, else its node id.

        Simulated node ids are random per run; partition ids are not, so keying sampling,
        seeded positions and sketch indices on them makes a seed reproduce a run."""
        return int(self.node_to_client.get(node_id, node_id))

    def client_slots(self, all_ids: list[int], num_clients: int) -> dict[int, int]:
        """Each connected node's index among ``num_clients`` model clients (channel, sampling
        plan): its partition id when known and in range, else the lowest free index in
        :meth:`stable_order`. Nodes left without an index are not in the result (and are not
        sampled); this never raises, whatever the partition query returned."""
        slots: dict[int, int] = {}
        for nid in all_ids:
            pid = self.node_to_client.get(nid)
            if pid is not None and 0 <= pid < num_clients and pid not in slots.values():
                slots[nid] = pid
        free = iter(sorted(set(range(num_clients)) - set(slots.values())))
        for nid in self.stable_order([n for n in all_ids if n not in slots]):
            idx = next(free, None)
            if idx is None:
                log(WARNING, "node %s has no client slot (%d clients): not sampled", nid,
                    num_clients)
                continue
            slots[nid] = idx
        return slots

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

    def prepare_round(self, server_round: int, node_ids: list[int], all_ids: list[int]
                      ) -> list[int] | None:
        """Hook after sampling, before messages are built (TSFA decides rho and bandwidth).

        Returns the nodes that get a training message this round (a subset of ``node_ids``,
        e.g. TSFA's outage rule leaves out clients in a deep fade), or None for all of them."""
        return None

    def round_plan(self, server_round: int, node_id: int) -> RoundPlan:
        """What this node is told this round (:class:`strategies.messages.RoundPlan`);
        subclasses add their per-node values (ratio, bandwidth share, sketch size)."""
        return RoundPlan(server_round=server_round, client_key=self.client_key(node_id),
                         downlink_base=self._bases.get(node_id))

    def node_config(self, server_round: int, node_id: int, config: ConfigRecord) -> ConfigRecord:
        """The TRAIN message's ConfigRecord: ``config`` (the ``train_config`` of :meth:`start`,
        see :func:`strategies.messages.train_config`) plus the node's round plan."""
        return ConfigRecord({**dict(config), **self.round_plan(server_round, node_id).to_values()})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        node_ids, all_ids = self.sample_nodes(grid)
        self.global_arrays = to_numpy(arrays)
        self.dense_reply_bytes = int(to_record(self.global_arrays).count_bytes())
        self.round_stats[server_round] = {"num_available": len(all_ids), "sampled": node_ids}
        self._round_t0 = time.perf_counter()
        log(INFO, "round %d: sampled %d of %d nodes", server_round, len(node_ids), len(all_ids))
        chosen = self.prepare_round(server_round, node_ids, all_ids)
        send = node_ids if chosen is None else [nid for nid in node_ids if nid in set(chosen)]
        self._sent = set(send)
        records = self.downlink_records(server_round, arrays, send)
        return [
            Message(
                content=RecordDict(
                    {self.arrayrecord_key: records[nid],
                     self.configrecord_key: self.node_config(server_round, nid, config)}
                ),
                message_type=MessageType.TRAIN,
                dst_node_id=nid,
                group_id=str(server_round),
            )
            for nid in send
        ]

    def downlink_records(self, server_round: int, arrays: ArrayRecord, send: list[int]
                         ) -> dict[int, ArrayRecord]:
        """The ArrayRecord each node receives, and ``downlink_bytes`` (what they weigh, as
        Flower counts them), ``dense_downlink_bytes`` (the whole global model to each) and
        ``downlink_full`` (nodes sent a whole model) for the round's metrics."""
        stats = self.round_stats.setdefault(server_round, {})
        full_bytes = int(arrays.count_bytes())
        self._bases = {}
        if self.downlink is None:
            stats.update(downlink_bytes=full_bytes * len(send),
                         dense_downlink_bytes=full_bytes * len(send), downlink_full=len(send))
            return {nid: arrays for nid in send}
        self.downlink.advance(server_round, self.global_arrays)
        self._residual = self.downlink.residual(self.global_arrays)
        full = to_record(self.downlink.reference)
        full_ref = int(full.count_bytes())
        by_sync: dict[int | None, tuple[ArrayRecord, int | None]] = {}
        records: dict[int, ArrayRecord] = {}
        total = 0
        for nid in send:
            last = self._synced.get(nid)
            if last not in by_sync:
                out = self.downlink.outgoing(last, full_ref,
                                             nbytes=lambda p: int(to_record(p).count_bytes()))
                by_sync[last] = (full if out.base is None else to_record(out.arrays), out.base)
            records[nid], self._bases[nid] = by_sync[last]
            total += int(records[nid].count_bytes())
        stats.update(downlink_bytes=total, dense_downlink_bytes=full_bytes * len(send),
                     downlink_full=sum(b is None for b in self._bases.values()))
        return records

    # -- aggregation ----------------------------------------------------------------------
    def reply_layout(self, server_round: int, node_id: int) -> ReplyLayout:
        """What a reply of ``node_id`` may hold this round, checked before deserialising
        (dense: exactly the global keys and shapes in the global arrays' dtype)."""
        return ReplyLayout.exact({k: (v.dtype.name, v.shape)
                                  for k, v in self.global_arrays.items()})

    def decode_reply(self, server_round: int, node_id: int, arrays: dict[str, np.ndarray],
                     metrics: MetricRecord) -> dict[str, np.ndarray]:
        """Validate one reply and return the arrays to aggregate (dense: the full factors; with a
        compressed downlink the client trained from the broadcast model, so the broadcast's
        unsent residual x - xh is added back)."""
        check_like(self.global_arrays, arrays, what=f"reply of node {node_id}")
        if self._residual is not None:
            return {k: (np.asarray(v, np.float32) + self._residual[k]).astype(np.float32)
                    for k, v in arrays.items()}
        return arrays

    def distance(self, arrays: dict[str, np.ndarray]) -> float:
        """||arrays - x_global||_2 over every array, in float64."""
        return float(np.sqrt(sum(
            np.sum((np.asarray(v, np.float64) - np.asarray(self.global_arrays[k], np.float64)) ** 2)
            for k, v in arrays.items())))

    def update_norm(self, decoded: dict[str, np.ndarray]) -> float:
        """||x_i - x_global||_2 of a decoded reply, the quantity ``update-norm-bound`` bounds."""
        return self.distance(decoded)

    def aggregate_norm_limit(self, accepted: list[AcceptedReply]) -> float:
        """Largest ||aggregate - global|| the accepted replies can produce: a convex
        combination (eq. 5) never moves further than its largest update."""
        return max(a.norm for a in accepted)

    def combine(self, server_round: int, decoded: list[dict[str, np.ndarray]],
                weights: list[float]) -> dict[str, np.ndarray]:
        """New global arrays from the valid replies (eq. 5)."""
        return weighted_average(decoded, weights)

    def reply_weight(self, node_id: int, reported: int) -> float:
        """A reply's aggregation weight: the server-known size of the node's partition when the
        server knows it (a different reported count is refused), otherwise the reported
        ``num-examples`` capped at ``max-num-examples`` and, when the server knows the other
        partitions' sizes, at the largest of them (a node without a known partition, e.g. one
        that joined after discovery or claimed another's id, cannot outweigh a known one)."""
        pid = self.node_to_client.get(node_id)
        if pid is not None and pid in self.data_sizes:
            known = int(self.data_sizes[pid])
            if reported != known:
                raise ReplyError(f"num-examples = {reported}, but partition {pid} holds {known}")
            return float(known)
        cap = self.max_num_examples
        if self.data_sizes:
            cap = min(cap, max(self.data_sizes.values()))
        return float(min(reported, cap))

    def _accept(self, server_round: int, msg: Message) -> AcceptedReply:
        """Unpack, check and decode one reply; any failure raises (the caller drops it)."""
        nid = msg.metadata.src_node_id
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise ReplyError(
                f"expected one ArrayRecord and one MetricRecord, got "
                f"{len(content.array_records)} and {len(content.metric_records)}"
            )
        record = next(iter(content.array_records.values()))
        metrics = next(iter(content.metric_records.values()))
        nbytes = int(record.count_bytes())
        reply = ReplyMetrics.from_record(metrics, self.weighted_by_key)
        if reply.server_round != server_round:
            raise ReplyError(f"reply answers round {reply.server_round}, this is round "
                             f"{server_round}")
        weight = check_weight(self.reply_weight(nid, reply.num_examples), self.weighted_by_key)
        arrays = checked_numpy(record, self.reply_layout(server_round, nid),
                               what=f"reply of node {nid}")
        decoded = self.decode_reply(server_round, nid, arrays, metrics)
        norm = self.update_norm(decoded)
        if not np.isfinite(norm):
            raise ReplyError(f"update norm {norm} is not finite")
        return AcceptedReply(nid, decoded, weight, norm, nbytes, reply.train_loss, reply.train_s,
                             reply.extra)

    def _bound_norms(self, server_round: int, accepted: list[AcceptedReply],
                     dropped: list[str]) -> list[AcceptedReply]:
        """Drop replies whose update norm exceeds ``update-norm-bound`` x the reference: the
        lower median of this round's norms, pooled with the accepted norms of the last
        ``NORM_ROUNDS`` rounds when the round has fewer than 3 replies (one or two replies
        cannot outvote each other; with 3 or more the round alone decides, so a change of
        regime, e.g. TSFA moving rho, does not count against honest clients)."""
        if self.update_norm_bound <= 0 or not accepted:
            return accepted
        # a zero update (a client that sent the global model back) is harmless but says
        # nothing about the scale of honest updates: it never sets the reference
        pool = [a.norm for a in accepted if a.norm > 0]
        if len(pool) < 3:
            pool += [n for r in self._norm_history for n in r if n > 0]
        if not pool:
            return accepted  # every update is zero: nothing to bound
        pool.sort()
        ref = pool[(len(pool) - 1) // 2]
        limit = self.update_norm_bound * ref
        kept = []
        for a in accepted:
            if a.norm > limit:
                dropped.append(f"node {a.node_id}: update norm {a.norm:.4g} > update-norm-bound "
                               f"{self.update_norm_bound:g} x reference {ref:.4g}")
            else:
                kept.append(a)
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the round's valid replies; nothing one reply holds can end the run.

        Each reply is checked in isolation (record layout and byte sizes before deserialising,
        the round it answers, its weight, metrics, decoded values, update norm); a failing reply
        is dropped with its reason logged and listed in ``dropped_reasons``. A non-finite or
        out-of-bound aggregate is never applied (``skipped`` and ``aggregate_rejected``)."""
        stats = self.round_stats.setdefault(server_round, {})
        round_s = time.perf_counter() - self._round_t0
        self.reply_bytes = {}
        accepted: list[AcceptedReply] = []
        dropped: list[str] = []
        uplink, received = 0, 0
        seen: set[int] = set()
        for msg in replies:
            nid = msg.metadata.src_node_id
            if msg.has_error():
                dropped.append(f"node {nid}: error {msg.error.reason}")
                continue
            if nid not in self._sent or nid in seen:  # the SuperLink prevents both; a check
                dropped.append(f"node {nid}: {'a second reply' if nid in seen else 'not sent'}"
                               f" a train message this round")
                continue
            seen.add(nid)
            received += 1
            if self.downlink is not None:  # it applied this round's broadcast and trained
                self._synced[nid] = server_round
            try:
                uplink += sum(int(r.count_bytes()) for r in msg.content.array_records.values())
            except Exception:  # noqa: BLE001, S110 - a record we cannot size is dropped below
                pass
            try:
                accepted.append(self._accept(server_round, msg))
            except Exception as err:  # noqa: BLE001 - one reply never ends a run
                dropped.append(f"node {nid}: {type(err).__name__}: {err}"[:500])
        if self.downlink is not None:
            # a node sent a message without a reply here (an error, a lost or late reply, one
            # the strategy filtered before this point) may or may not have applied the
            # broadcast: its next message is the full model
            for nid in self._sent - seen:
                self._synced.pop(nid, None)
        accepted = self._bound_norms(server_round, accepted, dropped)
        accepted.sort(key=lambda a: (self.client_key(a.node_id), a.node_id))  # reply order free
        for reason in dropped:
            log(WARNING, "round %d: dropped reply of %s", server_round, reason)
        self.accepted = accepted
        self.reply_bytes = {a.node_id: a.nbytes for a in accepted}
        stats.update(num_clients=len(accepted), uplink_bytes=uplink, dropped=len(dropped),
                     dropped_reasons=dropped, replies_received=received,
                     round_s=round(round_s, 3),
                     train_s=round(sum(a.train_s for a in accepted), 3))
        if len(accepted) < self.min_replies:
            log(WARNING, "round %d: %d valid replies < min-replies = %d, global model unchanged",
                server_round, len(accepted), self.min_replies)
            stats["skipped"] = 1
            return None, None
        weights = [a.weight for a in accepted]
        try:
            new_arrays = self.combine(server_round, [a.decoded for a in accepted], weights)
            problem = self._check_aggregate(new_arrays, accepted)
        except Exception as err:  # noqa: BLE001 - a failed aggregation leaves the model as is
            problem = f"aggregation failed ({type(err).__name__}: {err})"
        if problem is not None:
            log(WARNING, "round %d: aggregate not applied, global model unchanged: %s",
                server_round, problem)
            stats.update(skipped=1, aggregate_rejected=1, aggregate_problem=problem[:500])
            return None, None
        self._norm_history = (self._norm_history
                              + [[a.norm for a in accepted if a.norm > 0]])[-NORM_ROUNDS:]
        losses = [a.loss for a in accepted]
        train_loss = float(np.average(losses, weights=weights)) \
            if all(v is not None for v in losses) else float("nan")
        stats["train_loss"] = train_loss
        return to_record(new_arrays), MetricRecord({"train-loss": train_loss})

    def _check_aggregate(self, new: dict[str, np.ndarray],
                         accepted: list[AcceptedReply]) -> str | None:
        """Why ``new`` must not become the global model (None when it may)."""
        if set(new) != set(self.global_arrays):
            return "aggregate keys differ from the global model's"
        for key, value in new.items():
            if np.shape(value) != np.shape(self.global_arrays[key]):
                return f"aggregate {key!r} has shape {np.shape(value)}"
            if not np.all(np.isfinite(value)):
                return f"aggregate {key!r} holds NaN or Inf"
        if self.update_norm_bound > 0:
            moved = self.distance(new)
            limit = self.aggregate_norm_limit(accepted)
            if moved > limit * (1 + 1e-3) + 1e-6:
                return f"aggregate moved {moved:.4g}, more than the bound {limit:.4g}"
        return None

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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """numpy scalars (and lists of them) as Python values, for Flower's records."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return value
