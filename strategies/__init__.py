"""Flower strategies for federated LoRA (thin adapters over fedsoft)."""

from .lora_fedavg import LoRAFedAvg
from .sketch import SketchFedAvg
from .sparse_fedavg import SparseLoRAFedAvg
from .tsfa import TSFA

OSFA = TSFA  # same strategy class; OSFA differs by its controller (user-fixed rank)

__all__ = ["OSFA", "TSFA", "LoRAFedAvg", "SketchFedAvg", "SparseLoRAFedAvg"]
