"""Sparse LoRA update exchange (arXiv 2505.00333 Sec. III): sparsifiers, codec, error feedback."""
