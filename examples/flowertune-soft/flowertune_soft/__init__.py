"""flowertune-soft: a FlowerTune-shaped LLM fine-tuning app with SOFT-sparsified uploads."""
