"""What a strategy's set-up gets from the ServerApp (ServerSetup) and gives back (SetupResult)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp import Grid

from fedsoft.config import RunConfig

from .discovery import Discovery

__all__ = ["ServerSetup", "SetupResult"]


@dataclass
class ServerSetup:
    """What a strategy may use to set itself up before round 1 (built by the ServerApp).

    ``base`` is the run config every node resolves from ``context.run_config``; ``found`` the
    discovered partition of each node; ``data_sizes`` the server-known partition sizes (the
    weights of eq. 5); ``resume_config`` the checkpoint's config when the run resumes."""

    grid: Grid
    base: RunConfig
    node_ids: list[int]
    found: Discovery
    data_sizes: dict[int, int] = field(default_factory=dict)
    resume_config: Mapping[str, Any] | None = None


@dataclass
class SetupResult:
    """The run config the strategy runs with (e.g. TSFA's r* as ``lora-rank``), the strategy's
    constructor arguments and the files it wants in the run directory: name -> a JSON value,
    or a writer ``f(path)`` for a file with its own format (``sketch_calibration.json``)."""

    run_config: RunConfig
    kwargs: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
