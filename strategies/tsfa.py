"""TSFA / OSFA as a Flower strategy: per-round CSI, P3 ratio, eq. (41) bandwidth, virtual queue."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log

from fedsoft.compression.update import SparseSettings, estimate_payload_bytes
from fedsoft.config import RunConfig
from fedsoft.layout import head_specs, layer_specs
from fedsoft.wireless.channel import Channel
from fedsoft.wireless.controller import Decision, TSFAController, deadline_latency

from .messages import RoundPlan
from .setup import ServerSetup, SetupResult
from .sparse_fedavg import SparseLoRAFedAvg


class TSFA(SparseLoRAFedAvg):
    """Two-stage wireless federated LoRA (arXiv 2505.00333, Sec. IV) as a Message-API strategy.

    The rank is fixed before round 1 (offline stage, :func:`fedsoft.wireless.plan.plan`). Each
    round the strategy samples K nodes (seeded), draws their Rayleigh CSI from ``channel``,
    lets ``controller`` pick the common sparsification ratio rho_t (P3, eq. 39) and the FDMA
    bandwidth shares (equal finish, eq. 41) on the server's CSI estimate
    (``Channel.estimate``: the true gains unless ``csi-error`` > 0), and sends each node its
    own ConfigRecord (``sparsity-ratio``, ``bandwidth-share``, ``channel-gain``). After
    aggregation the realised uplink latency of the round, eq. (6) with the bytes actually
    received, the planned shares and the true gains, updates the virtual queue (eq. 30). When
    the running average latency stays above the budget (``budget_out_of_reach``) a WARNING says
    so, every 10 rounds while it lasts.

    Outage rule (PROPOSED, not in paper A; ``tsfa-deadline = "budget-multiple"``, the
    controller's ``deadline_factor`` F): :meth:`prepare_round` returns only the scheduled nodes
    that can upload within D = F T_bar on the server's CSI (:class:`TSFAController`); the
    others get no message this round (share 0, counted in the metric ``outage``), and eq. (5)
    averages over the nodes that upload, which favours good channels. With imperfect CSI a
    node whose true rate misses D for its planned payload is late: the server stops waiting
    at D and drops its reply (metric ``late``, also in ``dropped``), and the round lasts D.

    ``node_to_client`` maps Flower node ids to channel client indices (e.g. partition ids from
    a discovery query); unknown nodes get their rank among the connected node ids.
    """

    def __init__(self, clients_per_round: int, settings: SparseSettings, *,
                 controller: TSFAController, channel: Channel,
                 node_to_client: dict[int, int] | None = None, **kwargs: Any) -> None:
        super().__init__(clients_per_round, settings, node_to_client=node_to_client, **kwargs)
        self.controller = controller
        self.channel = channel
        self._decision: Decision | None = None
        self._round_nodes: list[int] = []
        self._gains: np.ndarray = np.zeros(0)
        self._est: np.ndarray = np.zeros(0)
        self._slots: dict[int, int] = {}

    @classmethod
    def setup(cls, cfg: RunConfig, setup: ServerSetup) -> SetupResult:
        """The offline stage before round 1 (:func:`strategies.planning.setup_tsfa`)."""
        from .planning import setup_tsfa  # noqa: PLC0415 - planning imports the strategies

        return setup_tsfa(cfg, setup)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.controller.load_state_dict(state["controller"])

    def eligible(self, all_ids: list[int]) -> list[int]:
        """Nodes with a channel client slot (partition id, else a free index)."""
        self._slots = self.client_slots(all_ids, self.channel.config.num_clients)
        return [nid for nid in all_ids if nid in self._slots]

    def prepare_round(self, server_round: int, node_ids: list[int], all_ids: list[int]
                      ) -> list[int]:
        """Observe the scheduled clients' CSI, solve P3 for rho_t, split the band (eq. 41);
        returns the nodes that upload (all of them unless the outage rule drops some)."""
        gains_all = self.channel.draw(server_round)
        est_all = self.channel.estimate(server_round)
        self._round_nodes = list(node_ids)
        self._gains = np.array([gains_all[self._slots[nid]] for nid in node_ids])
        self._est = np.array([est_all[self._slots[nid]] for nid in node_ids])
        specs = layer_specs(self.global_arrays)
        heads = head_specs(self.global_arrays)
        seeded = bool(self.settings.make().positions_from_seed)

        def payload_bits(rho: float) -> float:
            return 8.0 * estimate_payload_bytes(specs, heads, rho, dtype=self.settings.dtype,
                                                seeded_positions=seeded,
                                                head_sparsity=self.settings.head_sparsity)

        own_model = self.controller.payload_bits is not None  # planned with the wire payload
        self._decision = self.controller.step(self._est, None if own_model else payload_bits)
        d = self._decision
        log(INFO, "round %d: %s rho=%.4f Q=%.4f shares=%s%s", server_round,
            self.controller.mode.upper(), d.rho, d.queue, np.round(d.shares, 3).tolist(),
            f" outage={d.outage}" if d.active is not None else "")
        if d.active is None:
            return list(node_ids)
        return [nid for nid, on in zip(node_ids, d.active, strict=True) if on]

    def round_settings(self, server_round: int, node_id: int) -> SparseSettings:
        if self._decision is None:
            return self.settings
        return dataclasses.replace(self.settings, sparsity=float(self._decision.rho))

    def round_plan(self, server_round: int, node_id: int) -> RoundPlan:
        plan = super().round_plan(server_round, node_id)
        if self._decision is not None and node_id in self._round_nodes:
            i = self._round_nodes.index(node_id)
            plan = dataclasses.replace(plan, bandwidth_share=float(self._decision.shares[i]),
                                       channel_gain=float(self._est[i]))
        return plan

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        d = self._decision
        assert d is not None, "aggregate_train without configure_train"
        late_nodes: set[int] = set()
        if d.active is not None:  # outage rule: who misses the deadline on the true channel
            idx = np.flatnonzero(d.active)
            bits = d.payload_bits if np.ndim(d.payload_bits) == 0 else \
                np.asarray(d.payload_bits)[idx]
            _, late = deadline_latency(
                self.channel.fdma_delays(bits, d.shares[idx], self._gains[idx]), d.deadline_s)
            late_nodes = {self._round_nodes[i] for i in idx[late]}
            replies = list(replies)
            on_time = [m for m in replies if m.metadata.src_node_id not in late_nodes]
            late_nodes &= {m.metadata.src_node_id for m in replies if not m.has_error()}
            replies = on_time
        out = super().aggregate_train(server_round, replies)
        received = [(i, self.reply_bytes[n]) for i, n in enumerate(self._round_nodes)
                    if n in self.reply_bytes]
        if received:
            idx_r = [i for i, _ in received]
            bits_r = np.array([8.0 * b for _, b in received])
            latency = float(np.max(self.channel.fdma_delays(bits_r, d.shares[idx_r],
                                                            self._gains[idx_r])))
        else:
            latency = float(d.predicted_latency)
        if d.active is not None:
            latency = d.deadline_s if late_nodes else min(latency, d.deadline_s)
        queue = self.controller.observe(latency)
        problem = self.controller.budget_out_of_reach()
        if problem is not None and self.controller.over_budget_rounds % 10 == 5:
            log(WARNING, "round %d: %s", server_round, problem)
        stats = self.round_stats.setdefault(server_round, {})
        if late_nodes:
            reasons = [f"node {n}: late: true upload delay over the deadline "
                       f"{d.deadline_s:.4g} s (CSI error), reply dropped"
                       for n in sorted(late_nodes)]
            for reason in reasons:
                log(WARNING, "round %d: dropped reply of %s", server_round, reason)
            stats["dropped"] = int(stats.get("dropped", 0)) + len(reasons)
            stats["dropped_reasons"] = list(stats.get("dropped_reasons", [])) + reasons
        if d.active is not None:
            stats.update(outage=d.outage, late=len(late_nodes),
                         latency_deadline_s=d.deadline_s)
        stats.update(
            rank=self.controller.rank,
            queue=queue,
            latency_s=latency,
            latency_pred_s=float(d.predicted_latency),
            latency_avg_s=self.controller.average_latency,
            latency_budget_s=self.controller.T_bar,
            bandwidth_shares=[float(x) for x in d.shares],
            channel_gains=[float(x) for x in self._gains],
            channel_gains_planned=[float(x) for x in self._est],
            sparsity=float(d.rho),
        )
        self._decision = None
        return out
