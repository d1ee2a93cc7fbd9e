"""Build the strategy named by the run config."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedsoft.client_update import sparse_settings
from fedsoft.config import ConfigLike, RunConfig
from fedsoft.sketching.optimizer import SamplingPlan
from fedsoft.sketching.wallclock import SystemModel
from fedsoft.wireless.plan import TSFAPlan

from .lora_fedavg import LoRAFedAvg
from .sketch import SketchFedAvg
from .sparse_fedavg import SparseLoRAFedAvg
from .tsfa import TSFA


def make_strategy(cfg: ConfigLike, *, tsfa: TSFAPlan | None = None,
                  sampling: tuple[SamplingPlan, SystemModel, np.ndarray] | None = None,
                  node_to_client: dict[int, int] | None = None,
                  data_sizes: Mapping[int, int] | None = None) -> LoRAFedAvg:
    """``strategy`` + ``sparsifier`` keys -> strategy instance (config already validated).

    ``tsfa`` (from :func:`fedsoft.wireless.plan.plan`) is required for ``tsfa``/``osfa``;
    ``sampling`` = (plan, system model, data sizes) (:mod:`fedsoft.sketching.plan`) for ``sketch``.
    ``data_sizes`` (partition id -> examples) are the server-known weights of eq. (5).
    """
    cfg = RunConfig.coerce(cfg)
    name = cfg.run.strategy
    common = dict(
        clients_per_round=cfg.run.clients_per_round,
        min_available_nodes=cfg.run.min_available_nodes,
        seed=cfg.run.seed,
        min_replies=cfg.run.min_replies,
        node_to_client=node_to_client,
        data_sizes=data_sizes,
        max_num_examples=cfg.run.max_num_examples,
        update_norm_bound=cfg.run.update_norm_bound,
    )
    if name == "fedavg":
        if cfg.compression.sparsifier == "dense":
            return LoRAFedAvg(**common)
        return SparseLoRAFedAvg(settings=sparse_settings(cfg), **common)
    if name in ("tsfa", "osfa"):
        if tsfa is None:
            raise ValueError(f"strategy = {name!r} needs a TSFA plan (fedsoft.wireless.plan.plan)")
        return TSFA(settings=sparse_settings(cfg), controller=tsfa.controller,
                    channel=tsfa.channel, **common)
    if name == "sketch":
        if sampling is None:
            raise ValueError("strategy = 'sketch' needs a sampling plan (fedsoft.sketching.plan)")
        plan, system, sizes = sampling
        rest = {k: v for k, v in common.items() if k != "clients_per_round"}  # all nodes may go
        return SketchFedAvg(plan, system, sizes, server_lr=cfg.sketching.server_lr, **rest)
    raise ValueError(f"strategy = {name!r}: not available")
