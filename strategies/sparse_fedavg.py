"""Sparsified federated LoRA (SOFT and baselines) at a fixed ratio: decode, validate, eq. (5)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord

from fedsoft.covariance import cov_fro
from fedsoft.orthogonality import orth_offdiag
from fedsoft.sparse_update import SparseSettings, decode_update, layer_specs
from fedsoft.spectrum import svd_proxy_rel_err
from strategies.lora_fedavg import LoRAFedAvg


def _factor_pairs(arrays: dict[str, np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.from_numpy(arrays[s.name + ".lora_A"]), torch.from_numpy(arrays[s.name + ".lora_B"]))
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
        self._client_metrics: list[dict[str, float]] = []

    def configure_train(self, server_round: int, arrays, config, grid):
        self._client_metrics = []
        return super().configure_train(server_round, arrays, config, grid)

    def round_settings(self, server_round: int, node_id: int) -> SparseSettings:
        """Settings a node uses this round (fixed here; TSFA varies the ratio per round)."""
        return self.settings

    def node_config(self, server_round: int, node_id: int, config: ConfigRecord) -> ConfigRecord:
        cfg = super().node_config(server_round, node_id, config)
        cfg["sparsity-ratio"] = float(self.round_settings(server_round, node_id).sparsity)
        return cfg

    def decode_reply(self, server_round: int, node_id: int, arrays: dict[str, np.ndarray],
                     metrics: MetricRecord) -> dict[str, np.ndarray]:
        decoded = decode_update(
            arrays, self.global_arrays, self.round_settings(server_round, node_id),
            server_round=server_round, node_id=self.client_key(node_id),
            max_bytes=2 * self.dense_reply_bytes + 4096,
        )
        self._client_metrics.append({k: float(v) for k, v in metrics.items()
                                     if isinstance(v, int | float)})
        return decoded

    def combine(self, server_round: int, decoded: list[dict[str, np.ndarray]],
                weights: list[float]) -> dict[str, np.ndarray]:
        new = super().combine(server_round, decoded, weights)
        self.record_dense_uplink(server_round, len(decoded))
        stats = self.round_stats.setdefault(server_round, {})
        stats["sparsity"] = float(self.round_settings(server_round, 0).sparsity)
        specs = layer_specs(new)
        per_client = [_factor_pairs(d) for d in decoded]
        cov_sq = sum(
            cov_fro([pc[i][0] for pc in per_client], [pc[i][1] for pc in per_client], weights) ** 2
            for i in range(len(specs))
        )
        stats["cov_fro"] = float(np.sqrt(cov_sq))
        pairs = _factor_pairs(new)
        stats["orth_offdiag"] = orth_offdiag(pairs)
        probe = np.linspace(0, len(pairs) - 1, min(self.probe_layers, len(pairs))).round()
        errs = [svd_proxy_rel_err(*pairs[int(i)]) for i in sorted(set(probe))]
        finite = [e for e in errs if np.isfinite(e)]
        stats["svd_proxy_rel_err"] = float(np.mean(finite)) if finite else float("nan")
        energy = [m["kept-energy-ratio"] for m in self._client_metrics if "kept-energy-ratio" in m]
        if energy:
            stats["kept_energy_ratio"] = float(np.mean(energy))
        self._client_metrics = []
        return new
