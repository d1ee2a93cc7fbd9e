"""fedsoft: communication-efficient federated LoRA (SOFT, TSFA, sketching)."""
