"""Strategy registry: the ``strategy`` run-config key -> class, set-up and construction."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedsoft.config import ConfigLike, RunConfig
from fedsoft.sketching.optimizer import SamplingPlan
from fedsoft.sketching.wallclock import SystemModel
from fedsoft.wireless.plan import TSFAPlan

from .lora_fedavg import LoRAFedAvg
from .setup import ServerSetup, SetupResult
from .sketch import SketchFedAvg
from .sparse_fedavg import SparseLoRAFedAvg
from .tsfa import TSFA

# ``strategy`` -> class; ``fedavg`` with a sparsifier other than dense runs SparseLoRAFedAvg
STRATEGIES: dict[str, type[LoRAFedAvg]] = {
    "fedavg": LoRAFedAvg, "tsfa": TSFA, "osfa": TSFA, "sketch": SketchFedAvg,
}


def strategy_class(cfg: RunConfig) -> type[LoRAFedAvg]:
    """The class that runs ``cfg``'s ``strategy`` (and ``sparsifier``, for fedavg)."""
    name = cfg.run.strategy
    if name not in STRATEGIES:
        raise ValueError(f"run-config key 'strategy' = {name!r}: one of {sorted(STRATEGIES)}")
    if name == "fedavg" and cfg.compression.sparsifier != "dense":
        return SparseLoRAFedAvg
    return STRATEGIES[name]


def build_strategy(cfg: ConfigLike, setup: ServerSetup) -> tuple[LoRAFedAvg, SetupResult]:
    """Set up (the class's :meth:`~LoRAFedAvg.setup`: TSFA's offline stage, paper B's plan)
    and construct the strategy; the result holds the run config it runs with and the JSON
    files for the run directory."""
    cfg = RunConfig.coerce(cfg)
    cls = strategy_class(cfg)
    result = cls.setup(cfg, setup)
    strategy = cls.from_config(result.run_config, node_to_client=setup.found.node_to_partition,
                               data_sizes=setup.data_sizes, **result.kwargs)
    return strategy, result


def make_strategy(cfg: ConfigLike, *, tsfa: TSFAPlan | None = None,
                  sampling: tuple[SamplingPlan, SystemModel, np.ndarray] | None = None,
                  node_to_client: dict[int, int] | None = None,
                  data_sizes: Mapping[int, int] | None = None) -> LoRAFedAvg:
    """Construct from parts already planned: ``tsfa`` (:func:`fedsoft.wireless.plan.plan`)
    for ``tsfa``/``osfa``, ``sampling`` = (plan, system model, data sizes) for ``sketch``."""
    cfg = RunConfig.coerce(cfg)
    cls = strategy_class(cfg)
    parts: dict = {}
    if cls is TSFA:
        if tsfa is None:
            raise ValueError(f"strategy = {cfg.run.strategy!r} needs a TSFA plan "
                             "(fedsoft.wireless.plan.plan)")
        parts = {"controller": tsfa.controller, "channel": tsfa.channel}
    elif cls is SketchFedAvg:
        if sampling is None:
            raise ValueError("strategy = 'sketch' needs a sampling plan (fedsoft.sketching.plan)")
        plan, system, sizes = sampling
        parts = {"plan": plan, "system": system, "sizes": sizes}
    return cls.from_config(cfg, node_to_client=node_to_client, data_sizes=data_sizes, **parts)
