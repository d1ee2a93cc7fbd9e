"""Build the strategy named by the run config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedsoft.client_update import sparse_settings
from strategies.lora_fedavg import LoRAFedAvg
from strategies.sparse_fedavg import SparseLoRAFedAvg


def make_strategy(cfg: Mapping[str, Any]) -> LoRAFedAvg:
    """``strategy`` + ``sparsifier`` keys -> strategy instance (config already validated)."""
    name = str(cfg["strategy"])
    common = dict(
        clients_per_round=int(cfg["clients-per-round"]),
        min_available_nodes=int(cfg["min-available-nodes"]),
        seed=int(cfg["seed"]),
    )
    if name == "fedavg":
        if str(cfg["sparsifier"]) == "dense":
            return LoRAFedAvg(**common)
        return SparseLoRAFedAvg(settings=sparse_settings(cfg), **common)
    raise ValueError(f"strategy = {name!r}: not available")
