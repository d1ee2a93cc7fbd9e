"""Paper B set-up from a run config: system model, data shares and the (q, k) sampling plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedsoft.channel import Channel
from fedsoft.sketch_opt import SamplingPlan, SketchObjective, optimize_sampling, uniform_plan
from fedsoft.tsfa_plan import CHANNEL_KEYS, channel_config, run_config_errors
from fedsoft.wallclock import SystemModel, compute_speeds

__all__ = ["plan", "plan_table", "system_model"]

SYSTEM_KEYS = ("compute-s-per-step", "compute-heterogeneity", "compute-lora-share",
               "bandwidth-allocation", "round-overhead-s", "local-steps", *CHANNEL_KEYS)
SAMPLING_KEYS = ("sampling", "sampling-q", "sampling-q-min", "sketch-ratio", "sketch-k",
                 "sketch-alpha0", "sketch-alpha1", "sketch-xi", "sketch-mc-draws")


def system_model(cfg: Mapping[str, Any], num_clients: int, rank: int, d_plus_k_total: int,
                 head_values: int) -> SystemModel:
    """Heterogeneous compute (B.3) and the channel of A.3 for ``num_clients`` clients; a bad
    value is a ConfigError naming its run-config key."""
    with run_config_errors(cfg, SYSTEM_KEYS):
        return _system_model(cfg, num_clients, rank, d_plus_k_total, head_values)


def _system_model(cfg: Mapping[str, Any], num_clients: int, rank: int, d_plus_k_total: int,
                  head_values: int) -> SystemModel:
    cc = channel_config(cfg, num_clients)
    steps = int(cfg["local-steps"]) or 1
    return SystemModel(
        compute_s=compute_speeds(num_clients, float(cfg["compute-s-per-step"]),
                                 float(cfg["compute-heterogeneity"]), int(cfg["seed"])),
        steps=steps,
        lora_share=float(cfg["compute-lora-share"]),
        rank=int(rank),
        bits_per_rank=float(d_plus_k_total * cc.bits_per_value),
        head_bits=float(head_values * cc.bits_per_value),
        channel=Channel(cc, seed=int(cfg["seed"])),
        allocation=str(cfg["bandwidth-allocation"]),  # type: ignore[arg-type]
        round_overhead_s=float(cfg["round-overhead-s"]),
    )


def plan(cfg: Mapping[str, Any], system: SystemModel,
         data_sizes: Sequence[int]) -> SamplingPlan:
    """q and k per client for ``sampling`` = optimized | uniform | full (B.5 baselines); a bad
    value is a ConfigError naming its run-config key."""
    with run_config_errors(cfg, SAMPLING_KEYS):
        return _plan(cfg, system, data_sizes)


def _plan(cfg: Mapping[str, Any], system: SystemModel, data_sizes: Sequence[int]) -> SamplingPlan:
    a = np.asarray(data_sizes, dtype=np.float64)
    k0 = max(1, int(round(float(cfg["sketch-ratio"]) * system.rank)))
    objective = SketchObjective(float(cfg["sketch-alpha0"]), float(cfg["sketch-alpha1"]),
                                float(cfg["sketch-xi"]))
    draws, seed = int(cfg["sketch-mc-draws"]), int(cfg["seed"])
    mode = str(cfg["sampling"])
    if mode == "full":
        return uniform_plan(system, a, objective, 1.0, k0, draws=draws, seed=seed)
    if mode == "uniform":
        return uniform_plan(system, a, objective, float(cfg["sampling-q"]), k0,
                            draws=draws, seed=seed)
    return optimize_sampling(
        system, a, objective, budget=float(cfg["sampling-q"]) * system.num_clients, k_init=k0,
        optimize_k=str(cfg["sketch-k"]) == "optimized", q_min=float(cfg["sampling-q-min"]),
        draws=draws, seed=seed,
    )


def plan_table(p: SamplingPlan, system: SystemModel, data_sizes: Sequence[int]
               ) -> list[dict[str, Any]]:
    """Per-client rows (JSON-able): q, k, data size, compute s/step, mean spectral efficiency."""
    gamma = system.channel.spectral_eff(system.channel.mean_gains())
    return [
        {"client": i, "q": float(p.q[i]), "k": int(p.k[i]), "examples": int(data_sizes[i]),
         "compute_s_per_step": float(system.compute_s[i]), "mean_spectral_eff": float(gamma[i])}
        for i in range(system.num_clients)
    ]
