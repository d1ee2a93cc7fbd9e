"""LoRA sketching, independent client sampling and the (q, k) plan (arXiv 2505.23555)."""
