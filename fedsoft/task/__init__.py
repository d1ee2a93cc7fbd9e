"""The learning task: pretrained models with LoRA, datasets, partitions, collation, training."""
