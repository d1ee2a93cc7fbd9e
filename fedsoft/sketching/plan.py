"""Paper B set-up from a run config: system model, data shares and the (q, k) sampling plan."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedsoft.config import ConfigError, ConfigLike, RunConfig
from fedsoft.sketching.calibration import SketchCalibration, load_sketch_calibration
from fedsoft.sketching.optimizer import (
    SamplingPlan,
    SketchObjective,
    optimize_sampling,
    uniform_plan,
)
from fedsoft.sketching.wallclock import SystemModel, compute_speeds
from fedsoft.wireless.channel import Channel
from fedsoft.wireless.plan import CHANNEL_KEYS, channel_config, run_config_errors

__all__ = ["objective", "plan", "plan_table", "system_model"]

SYSTEM_KEYS = ("compute-s-per-step", "compute-heterogeneity", "compute-lora-share",
               "bandwidth-allocation", "round-overhead-s", "local-steps", *CHANNEL_KEYS)
SAMPLING_KEYS = ("sampling", "sampling-q", "sampling-q-min", "sketch-ratio", "sketch-k",
                 "sketch-alpha0", "sketch-alpha1", "sketch-xi", "sketch-mc-draws",
                 "sketch-calibration")


def system_model(cfg: ConfigLike, num_clients: int, rank: int, d_plus_k_total: int,
                 head_values: int) -> SystemModel:
    """Heterogeneous compute (B.3) and the channel of A.3 for ``num_clients`` clients; a bad
    value is a ConfigError naming its run-config key."""
    cfg = RunConfig.coerce(cfg)
    with run_config_errors(cfg, SYSTEM_KEYS):
        return _system_model(cfg, num_clients, rank, d_plus_k_total, head_values)


def _system_model(cfg: RunConfig, num_clients: int, rank: int, d_plus_k_total: int,
                  head_values: int) -> SystemModel:
    cc = channel_config(cfg, num_clients)
    steps = cfg.training.local_steps or 1
    return SystemModel(
        compute_s=compute_speeds(num_clients, cfg.sketching.compute_s_per_step,
                                 cfg.sketching.compute_heterogeneity, cfg.run.seed),
        steps=steps,
        lora_share=cfg.sketching.compute_lora_share,
        rank=int(rank),
        bits_per_rank=float(d_plus_k_total * cc.bits_per_value),
        head_bits=float(head_values * cc.bits_per_value),
        channel=Channel(cc, seed=cfg.run.seed),
        allocation=cfg.sketching.bandwidth_allocation,  # type: ignore[arg-type]
        round_overhead_s=cfg.sketching.round_overhead_s,
    )


def objective(cfg: ConfigLike, calibration: SketchCalibration | None = None
              ) -> SketchObjective:
    """alpha0, alpha1, xi of R_eps (B.4): from ``calibration`` (the ``auto`` pilot's fit), from
    the file ``sketch-calibration`` names, or the ``sketch-alpha0/alpha1/xi`` keys (``""``).
    A missing or malformed file is a ConfigError naming ``sketch-calibration``."""
    cfg = RunConfig.coerce(cfg)
    if calibration is not None:
        return calibration.objective()
    source = cfg.sketching.sketch_calibration
    if source == "auto":
        raise ConfigError("run-config key 'sketch-calibration' = 'auto': the pilot's fit must "
                          "be passed in (fedsoft.sketching.calibration.fit_constants)")
    if source:
        try:
            return load_sketch_calibration(source).objective()
        except ValueError as exc:
            raise ConfigError(f"run-config key 'sketch-calibration' = {source!r}: {exc}") from exc
    return SketchObjective(cfg.sketching.sketch_alpha0, cfg.sketching.sketch_alpha1,
                           cfg.sketching.sketch_xi)


def plan(cfg: ConfigLike, system: SystemModel, data_sizes: Sequence[int],
         calibration: SketchCalibration | None = None) -> SamplingPlan:
    """q and k per client for ``sampling`` = optimized | uniform | full (B.5 baselines), J
    priced with :func:`objective`; a bad value is a ConfigError naming its run-config key."""
    cfg = RunConfig.coerce(cfg)
    with run_config_errors(cfg, SAMPLING_KEYS):
        return _plan(cfg, system, data_sizes, objective(cfg, calibration))


def _plan(cfg: RunConfig, system: SystemModel, data_sizes: Sequence[int],
          obj: SketchObjective) -> SamplingPlan:
    a = np.asarray(data_sizes, dtype=np.float64)
    k0 = max(1, int(round(cfg.sketching.sketch_ratio * system.rank)))
    draws, seed = cfg.sketching.sketch_mc_draws, cfg.run.seed
    mode = cfg.sketching.sampling
    if mode == "full":
        return uniform_plan(system, a, obj, 1.0, k0, draws=draws, seed=seed)
    if mode == "uniform":
        return uniform_plan(system, a, obj, cfg.sketching.sampling_q, k0,
                            draws=draws, seed=seed)
    return optimize_sampling(
        system, a, obj, budget=cfg.sketching.sampling_q * system.num_clients, k_init=k0,
        optimize_k=cfg.sketching.sketch_k == "optimized", q_min=cfg.sketching.sampling_q_min,
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
