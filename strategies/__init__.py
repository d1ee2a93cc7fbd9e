"""Flower strategies for federated LoRA (thin adapters over fedsoft)."""

from strategies.lora_fedavg import LoRAFedAvg
from strategies.sketch import SketchFedAvg
from strategies.sparse_fedavg import SparseLoRAFedAvg
from strategies.tsfa import TSFA

OSFA = TSFA  # same strategy class; OSFA differs by its controller (user-fixed rank)

__all__ = ["OSFA", "TSFA", "LoRAFedAvg", "SketchFedAvg", "SparseLoRAFedAvg"]
