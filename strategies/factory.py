"""Build the strategy named by the run config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strategies.lora_fedavg import LoRAFedAvg


def make_strategy(cfg: Mapping[str, Any]) -> LoRAFedAvg:
    """``strategy`` key -> strategy instance (config already validated)."""
    name = str(cfg["strategy"])
    common = dict(
        clients_per_round=int(cfg["clients-per-round"]),
        min_available_nodes=int(cfg["min-available-nodes"]),
        seed=int(cfg["seed"]),
    )
    if name == "fedavg":
        return LoRAFedAvg(**common)
    raise ValueError(f"strategy = {name!r}: not available")
