"""Flower strategies for federated LoRA (thin adapters over fedsoft)."""

from strategies.lora_fedavg import LoRAFedAvg

__all__ = ["LoRAFedAvg"]
