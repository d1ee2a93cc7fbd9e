"""TSFA over a wireless uplink (arXiv 2505.00333 Sec. IV): channel, bound, rank, controller."""
