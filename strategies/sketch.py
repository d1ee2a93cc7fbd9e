"""Paper B as a Flower strategy: LoRA sketching + independent client sampling (arXiv 2505.23555)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from fedsoft.aggregate import AcceptedReply
from fedsoft.config import RunConfig
from fedsoft.layout import HEAD_PREFIX, layer_specs
from fedsoft.sketching.independent_sampling import unbiased_update
from fedsoft.sketching.optimizer import SamplingPlan
from fedsoft.sketching.sketch import expand_reply, layer_indices
from fedsoft.sketching.wallclock import SystemModel

from .lora_fedavg import LoRAFedAvg
from .messages import RoundPlan
from .records import ReplyLayout
from .setup import ServerSetup, SetupResult


class SketchFedAvg(LoRAFedAvg):
    """Each client n takes part in a round independently with probability q_n (seeded), trains
    and uploads a sketch of k_n of the r rank components per layer (indices from a shared seed),
    and the server applies X + eta_s sum (a_n / q_n) Delta_n, an unbiased estimate of the
    full-participation update (B.1). ``plan`` holds q and k per client (from
    :func:`fedsoft.sketching.optimizer.optimize_sampling` or
    :func:`~fedsoft.sketching.optimizer.uniform_plan`);
    ``system`` simulates each round's wall-clock (compute + FDMA upload, B.3).

    ``node_to_client`` maps node ids to client indices (partition ids); ``data_shares`` are the
    a_n of all N clients. Per-round statistics: ``participants``, ``q``, ``k`` (per client),
    ``sim_round_s`` and ``sim_wallclock_s`` (cumulative), ``bandwidth_shares``.
    """

    def __init__(self, plan: SamplingPlan, system: SystemModel, data_shares: np.ndarray, *,
                 node_to_client: dict[int, int] | None = None, seed: int = 0,
                 server_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(clients_per_round=max(1, system.num_clients), seed=seed,
                         node_to_client=node_to_client, **kwargs)
        n = system.num_clients
        if plan.q.shape != (n,) or plan.k.shape != (n,):
            raise ValueError(f"plan q/k must have {n} entries, got {plan.q.shape}/{plan.k.shape}")
        a = np.asarray(data_shares, dtype=np.float64)
        if a.shape != (n,) or a.sum() <= 0:
            raise ValueError(f"data_shares must have {n} entries with a positive sum")
        self.plan = plan
        self.system = system
        self.data_shares = a / a.sum()
        self.sketch_seed = int(seed)
        self.server_lr = float(server_lr)
        self.np_rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(5,)))
        self.wallclock_s = 0.0
        self._clients: dict[int, int] = {}

    @classmethod
    def setup(cls, cfg: RunConfig, setup: ServerSetup) -> SetupResult:
        """System model, pilot and (q, k) plan (:func:`strategies.planning.setup_sketch`)."""
        from .planning import setup_sketch  # noqa: PLC0415 - planning imports the strategies

        return setup_sketch(cfg, setup)

    @classmethod
    def from_config(cls, cfg: RunConfig, *, node_to_client: dict[int, int] | None = None,
                    data_sizes: Mapping[int, int] | None = None, **parts: Any) -> SketchFedAvg:
        """``parts`` = plan, system, sizes (from :meth:`setup`); every node may take part."""
        return cls(parts["plan"], parts["system"], parts["sizes"],
                   server_lr=cfg.sketching.server_lr,
                   **cls.common_kwargs(cfg, node_to_client, data_sizes))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "np_rng": self.np_rng.bit_generator.state,
                "wallclock_s": self.wallclock_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.np_rng.bit_generator.state = state["np_rng"]
        self.wallclock_s = float(state["wallclock_s"])

    def sample_nodes(self, grid: Grid) -> tuple[list[int], list[int]]:
        """Independent sampling: node n takes part with probability q_n (may be none)."""
        _, all_ids = super().sample_nodes(grid)  # waits for min_available_nodes
        self._clients = self.client_slots(all_ids, self.system.num_clients)
        pool = [nid for nid in all_ids if nid in self._clients]
        draws = self.np_rng.random(len(pool))
        chosen = [nid for nid, u in zip(pool, draws, strict=True)
                  if u < self.plan.q[self._clients[nid]]]
        return chosen, all_ids

    def prepare_round(self, server_round: int, node_ids: list[int], all_ids: list[int]) -> None:
        self._replied = []
        idx = np.array([self._clients[n] for n in node_ids], dtype=np.int64)
        sim_s, shares = self.system.round(idx, self.plan.k, server_round)
        self.wallclock_s += sim_s
        stats = self.round_stats.setdefault(server_round, {})
        stats.update(participants=len(node_ids), sim_round_s=sim_s,
                     sim_wallclock_s=self.wallclock_s,
                     bandwidth_shares=[float(x) for x in shares],
                     q=[float(x) for x in self.plan.q], k=[int(x) for x in self.plan.k])
        log(INFO, "round %d: %d participants, simulated round %.2f s (total %.1f s)",
            server_round, len(node_ids), sim_s, self.wallclock_s)

    def round_plan(self, server_round: int, node_id: int) -> RoundPlan:
        return replace(super().round_plan(server_round, node_id),
                       sketch_size=int(self.plan.k[self._clients[node_id]]))

    def reply_layout(self, server_round: int, node_id: int) -> ReplyLayout:
        """Exactly the sketched rows of A, columns of B and the head, in float32."""
        k = int(self.plan.k[self._clients[node_id]])
        layout: dict[str, tuple[str, tuple[int, ...]]] = {}
        for spec in layer_specs(self.global_arrays):
            layout[spec.name + ".lora_A"] = ("float32", (k, spec.k))
            layout[spec.name + ".lora_B"] = ("float32", (spec.d, k))
        for key, value in self.global_arrays.items():
            if key.startswith(HEAD_PREFIX):
                layout[key] = ("float32", value.shape)
        return ReplyLayout.exact(layout)

    def decode_reply(self, server_round: int, node_id: int, arrays: dict[str, np.ndarray],
                     metrics: MetricRecord) -> dict[str, np.ndarray]:
        k = int(self.plan.k[self._clients[node_id]])
        indices = layer_indices(self.global_arrays, k, self.sketch_seed, server_round,
                                self.client_key(node_id))
        return expand_reply(self.global_arrays, arrays, indices)

    def update_norm(self, decoded: dict[str, np.ndarray]) -> float:
        """A sketched reply is already a delta: its own norm."""
        return float(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2)
                                 for v in decoded.values())))

    def aggregate_norm_limit(self, accepted: list[AcceptedReply]) -> float:
        """eta_s sum_n (a_n / q_n) ||Delta_n||: the most the unbiased update (B.1) can move."""
        idx = [self._clients[a.node_id] for a in accepted]
        w = self.data_shares[idx] / self.plan.q[idx]
        return float(self.server_lr * np.sum(w * np.array([a.norm for a in accepted])))

    def combine(self, server_round: int, decoded: list[dict[str, np.ndarray]],
                weights: list[float]) -> dict[str, np.ndarray]:
        idx = [self._clients[a.node_id] for a in self.accepted]
        self.record_dense_uplink(server_round, len(decoded))
        return unbiased_update(self.global_arrays, decoded, self.data_shares[idx],
                               self.plan.q[idx], self.server_lr)

    def summary(self) -> None:
        log(INFO, "\tSketchFedAvg: independent sampling, E[participants] = %.2f, k = %s",
            float(self.plan.q.sum()), self.plan.k.tolist())
