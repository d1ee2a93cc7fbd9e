"""The message contract of a training round: what the server sends a node and what it returns."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from flwr.app import ConfigRecord

from fedsoft.aggregate import ReplyError, metric_float, metric_int
from fedsoft.config import ConfigError, RunConfig, Scalar, check_sparsity, validate

__all__ = ["ARRAYS", "CONFIG", "METRICS", "MessageError", "ReplyMetrics", "RoundPlan",
           "TrainInstruction", "config_digest", "train_config"]

# RecordDict keys of a TRAIN message and of its reply (Flower FedAvg's defaults)
ARRAYS = "arrays"    # ArrayRecord: the global LoRA state (server) / the update (node)
CONFIG = "config"    # ConfigRecord: a TrainInstruction (server -> node)
METRICS = "metrics"  # MetricRecord: ReplyMetrics (node -> server)
DIGEST = "config-digest"


class MessageError(ValueError):
    """A message field is missing, of the wrong type or out of range (the field is named)."""


def _int(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(f"{name} = {value!r}: must be an integer")
    if minimum is not None and value < minimum:
        raise MessageError(f"{name} = {value!r}: must be >= {minimum}")
    return int(value)


def _float(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError(f"{name} = {value!r}: must be a number")
    out = float(value)
    if not math.isfinite(out):
        raise MessageError(f"{name} = {value!r}: must be finite")
    if lo is not None and out < lo:
        raise MessageError(f"{name} = {value!r}: must be >= {lo}")
    if hi is not None and out > hi:
        raise MessageError(f"{name} = {value!r}: must be <= {hi}")
    return out


@dataclass(frozen=True)
class RoundPlan:
    """What the server decided for one node in one round; ``None`` = not part of this run's plan.

    Each field travels under the name in its metadata (the names users see in messages)."""

    server_round: int = field(metadata={"key": "server-round"})
    client_key: int = field(metadata={"key": "client-key"})  # seeds: the partition id if known
    sparsity: float | None = field(default=None, metadata={"key": "sparsity-ratio"})  # rho_t
    sketch_size: int | None = field(default=None, metadata={"key": "sketch-size"})    # k_n
    bandwidth_share: float | None = field(default=None, metadata={"key": "bandwidth-share"})
    channel_gain: float | None = field(default=None, metadata={"key": "channel-gain"})
    # compressed downlink: the round of the reference the sent change applies to (None: the
    # arrays are the whole model)
    downlink_base: int | None = field(default=None, metadata={"key": "downlink-base"})

    def __post_init__(self) -> None:
        _int("server-round", self.server_round, 0)
        _int("client-key", self.client_key)
        if self.sparsity is not None:
            try:
                check_sparsity(self.sparsity, "sparsity-ratio")
            except (TypeError, ValueError) as exc:
                raise MessageError(str(exc)) from None
        if self.sketch_size is not None:
            _int("sketch-size", self.sketch_size, 1)
        if self.bandwidth_share is not None:
            _float("bandwidth-share", self.bandwidth_share, 0.0, 1.0)
        if self.channel_gain is not None:
            _float("channel-gain", self.channel_gain, 0.0)
        if self.downlink_base is not None:
            _int("downlink-base", self.downlink_base, 0)
            if self.downlink_base >= self.server_round:
                raise MessageError(f"downlink-base = {self.downlink_base}: must be before "
                                   f"server-round = {self.server_round}")

    def to_values(self) -> dict[str, Scalar]:
        return {f.metadata["key"]: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RoundPlan:
        kw = {f.name: values[f.metadata["key"]] for f in fields(cls) if f.metadata["key"] in values}
        missing = [k for k in ("server-round", "client-key") if k not in values]
        if missing:
            raise MessageError(f"train config lacks {missing}")
        return cls(**kw)


PLAN_KEYS = frozenset(f.metadata["key"] for f in fields(RoundPlan))


def config_digest(cfg: RunConfig) -> str:
    """A short hash of every flat key and value: server and node must hold the same config."""
    text = json.dumps(cfg.flat(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainInstruction:
    """The ConfigRecord of a TRAIN message: the run config as changes to what every node
    resolves itself from ``context.run_config`` (e.g. the rank TSFA's offline stage chose,
    the run directory, a pilot's settings), its digest, and the node's :class:`RoundPlan`."""

    overrides: dict[str, Scalar]
    digest: str
    plan: RoundPlan

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({**self.overrides, DIGEST: self.digest, **self.plan.to_values()})

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainInstruction:
        values = dict(record)
        digest = values.pop(DIGEST, None)
        if not isinstance(digest, str):
            raise MessageError(f"train config lacks '{DIGEST}' (a string), got {digest!r}")
        plan = RoundPlan.from_values({k: v for k, v in values.items() if k in PLAN_KEYS})
        rest = {k: v for k, v in values.items() if k not in PLAN_KEYS}
        try:
            overrides = validate(rest)
        except ConfigError as exc:
            raise MessageError(f"train config: {exc}") from None
        return cls(overrides, digest, plan)

    def config(self, base: RunConfig) -> RunConfig:
        """The server's run config, rebuilt on the node from its own ``base`` (the resolved
        ``context.run_config``); a different digest means the two do not hold the same app
        (e.g. a SuperNode with another conf/ or fedsoft version) and is an error."""
        cfg = base.with_values(self.overrides)
        mine = config_digest(cfg)
        if mine != self.digest:
            raise MessageError(
                f"run config differs from the server's (digest {mine} vs {self.digest}): this "
                "node resolves context.run_config to other values than the ServerApp (another "
                "conf/ preset or fedsoft version?)")
        return cfg


def train_config(cfg: RunConfig, base: RunConfig | None = None) -> ConfigRecord:
    """What a strategy's ``start`` gets as ``train_config``: the keys where ``cfg`` differs
    from ``base`` (what each node resolves from ``context.run_config``; None: every key) and
    the digest of ``cfg``; the strategies add each node's :class:`RoundPlan`."""
    flat = cfg.flat()
    ref = base.flat() if base is not None else {}
    changed = {k: v for k, v in flat.items()  # as the digest sees them: -0.0 differs from 0.0
               if k not in ref or json.dumps(ref[k]) != json.dumps(v)}
    return ConfigRecord({**changed, DIGEST: config_digest(cfg)})


@dataclass(frozen=True)
class ReplyMetrics:
    """The MetricRecord of a reply: what the server checks and aggregates (eq. 5's weight is
    ``num-examples``); ``extra`` holds the other finite numbers (diagnostics)."""

    server_round: int            # "server-round": the round this reply answers
    num_examples: int            # "num-examples": the node's partition size
    train_loss: float | None = None  # "train-loss"
    train_s: float = 0.0         # "train-s": wall seconds of local training
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], weight_key: str = "num-examples"
                    ) -> ReplyMetrics:
        """Checked fields of a reply's MetricRecord (a :class:`ReplyError` names the field)."""
        values = dict(record)
        n = metric_int(values, weight_key)
        if n < 1:
            raise ReplyError(f"{weight_key} = {n}: must be >= 1")
        extra = {k: float(v) for k, v in values.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)
                 and math.isfinite(float(v))}
        return cls(server_round=metric_int(values, "server-round"), num_examples=n,
                   train_loss=metric_float(values, "train-loss", required=False),
                   train_s=metric_float(values, "train-s", required=False, minimum=0.0) or 0.0,
                   extra=extra)
