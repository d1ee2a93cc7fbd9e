"""Sparsified federated LoRA (SOFT and baselines) at a fixed ratio: decode, validate, eq. (5)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import MetricRecord
from flwr.common import log

from fedsoft.compression.covariance import cov_fro
from fedsoft.compression.orthogonality import orth_offdiag
from fedsoft.compression.spectrum import svd_proxy_rel_err
from fedsoft.compression.update import SparseSettings, decode_update
from fedsoft.config import RunConfig
from fedsoft.layout import HEAD_PREFIX, head_arrays, layer_specs

from .lora_fedavg import LoRAFedAvg
from .messages import RoundPlan
from .records import ReplyLayout


def _factor_pairs(arrays: dict[str, np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.from_numpy(np.asarray(arrays[s.name + ".lora_A"], dtype=np.float64)),
         torch.from_numpy(np.asarray(arrays[s.name + ".lora_B"], dtype=np.float64)))
        for s in layer_specs(arrays)
    ]


class SparseLoRAFedAvg(LoRAFedAvg):
    """Clients upload sparse LoRA updates in fedsoft's wire format; the server decodes each one,
    rejects it if it is malformed or over budget (logged, the rest are aggregated), rebuilds
    the client's factors and averages them by data share (eq. 5).

    Per-round statistics added for metrics.jsonl: ``dense_uplink_bytes`` (an ArrayRecord of the
    dense fp32 factors + head per client, measured with ``count_bytes``), ``sparsity``,
    ``orth_offdiag`` (global factors), ``cov_fro`` (eqs. 20-22 over the decoded replies, root
    sum of squares over layers), ``svd_proxy_rel_err`` (SOFT scores vs singular values of the
    global B·A, mean over sampled layers) and ``kept_energy_ratio`` (client-reported, mean).
    """

    def __init__(self, clients_per_round: int, settings: SparseSettings, *,
                 probe_layers: int = 3, **kwargs: Any) -> None:
        super().__init__(clients_per_round, **kwargs)
        self.settings = settings
        self.probe_layers = probe_layers

    @classmethod
    def from_config(cls, cfg: RunConfig, *, node_to_client: dict[int, int] | None = None,
                    data_sizes: Mapping[int, int] | None = None, **parts: Any
                    ) -> SparseLoRAFedAvg:
        """``compression`` section -> :class:`SparseSettings`; the rest as the base class."""
        return cls(cfg.run.clients_per_round, SparseSettings.from_config(cfg),
                   **cls.common_kwargs(cfg, node_to_client, data_sizes), **parts)

    def round_settings(self, server_round: int, node_id: int) -> SparseSettings:
        """Settings a node uses this round (fixed here; TSFA varies the ratio per round)."""
        return self.settings

    def round_plan(self, server_round: int, node_id: int) -> RoundPlan:
        return replace(super().round_plan(server_round, node_id),
                       sparsity=float(self.round_settings(server_round, node_id).sparsity))

    def reply_layout(self, server_round: int, node_id: int) -> ReplyLayout:
        """The codec's keys and dtypes (:mod:`fedsoft.compression.codec`), a whole head in the
        wire dtype and its own shape (a sparse head travels with the LoRA rows), at most twice
        the dense reply's bytes (checked before deserialising)."""
        return ReplyLayout.payload(self.round_settings(server_round, node_id),
                                   self.global_arrays, 2 * self.dense_reply_bytes + 4096)

    def decode_reply(self, server_round: int, node_id: int, arrays: dict[str, np.ndarray],
                     metrics: MetricRecord) -> dict[str, np.ndarray]:
        """The client's factors rebuilt on the global ones (its change is added to x_{t-1});
        a whole head (dense head) was trained from the broadcast model, so with a compressed
        downlink the broadcast's unsent head residual is added back, as for dense replies."""
        settings = self.round_settings(server_round, node_id)
        out = decode_update(
            arrays, self.global_arrays, settings,
            server_round=server_round, node_id=self.client_key(node_id),
            max_bytes=2 * self.dense_reply_bytes + 4096,
        )
        if self._residual is not None and not settings.sparse_head:
            for key in head_arrays(self.global_arrays):
                k = HEAD_PREFIX + key
                out[k] = (out[k] + self._residual[k]).astype(np.float32)
        return out

    def combine(self, server_round: int, decoded: list[dict[str, np.ndarray]],
                weights: list[float]) -> dict[str, np.ndarray]:
        new = super().combine(server_round, decoded, weights)
        self.record_dense_uplink(server_round, len(decoded))
        stats = self.round_stats.setdefault(server_round, {})
        stats["sparsity"] = float(self.round_settings(server_round, 0).sparsity)
        stats.update(self.diagnostics(new, decoded, weights))
        energy = [a.metrics["kept-energy-ratio"] for a in self.accepted
                  if "kept-energy-ratio" in a.metrics]
        if energy:
            stats["kept_energy_ratio"] = float(np.mean(energy))
        return new

    def diagnostics(self, new: dict[str, np.ndarray], decoded: list[dict[str, np.ndarray]],
                    weights: list[float]) -> dict[str, float]:
        """``cov_fro`` (eqs. 20-22), ``orth_offdiag`` and ``svd_proxy_rel_err`` in float64;
        a diagnostic that fails is logged and reported as NaN, never fatal."""
        out: dict[str, float] = {}

        def cov() -> float:
            per_client = [_factor_pairs(d) for d in decoded]
            return float(np.sqrt(sum(
                cov_fro([pc[i][0] for pc in per_client], [pc[i][1] for pc in per_client],
                        weights) ** 2
                for i in range(len(layer_specs(new))))))

        def orth() -> float:
            return float(orth_offdiag(_factor_pairs(new)))

        def proxy() -> float:
            pairs = _factor_pairs(new)
            probe = np.linspace(0, len(pairs) - 1, min(self.probe_layers, len(pairs))).round()
            errs = [svd_proxy_rel_err(*pairs[int(i)]) for i in sorted(set(probe))]
            finite = [e for e in errs if np.isfinite(e)]
            return float(np.mean(finite)) if finite else float("nan")

        for name, fn in (("cov_fro", cov), ("orth_offdiag", orth), ("svd_proxy_rel_err", proxy)):
            try:
                out[name] = fn()
            except Exception as err:  # noqa: BLE001 - diagnostics never end a round
                log(WARNING, "diagnostic %s failed: %s: %s", name, type(err).__name__, err)
                out[name] = float("nan")
        return out
