"""Server wrapper: decode soft_mod's sparse replies to full weights for any Flower strategy."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsoft.compression.update import SparseSettings, decode_update
from fedsoft.dropin.keys import KeyMap
from fedsoft.dropin.mod import CONFIG_KEYS, FORMAT, MARKER, PREFIX, settings_to_config

try:  # the wheel ships the app's strategies/ as fedsoft.strategies; a checkout has strategies
    from fedsoft.strategies.records import ReplyLayout, checked_numpy
except ModuleNotFoundError:  # pragma: no cover - depends on how fedsoft is installed
    from strategies.records import ReplyLayout, checked_numpy

__all__ = ["PLAIN_POLICIES", "SoftDecode"]

PLAIN_POLICIES = ("reject", "accept")


@dataclass
class _Round:
    """What configure_train saw, for aggregate_train of the same round."""

    settings: SparseSettings
    keymap: KeyMap
    global_fedsoft: dict[str, np.ndarray]
    dense_bytes: int
    stats: dict[str, Any] = field(default_factory=dict)


class SoftDecode(Strategy):
    """Wrap any Flower strategy so that it aggregates full weights from ``soft_mod`` replies.

    ``SoftDecode(FedAvg(...), sparsity=0.9)`` (or FedProx, FedAdam, ...; put it *outside*
    Flower's DP wrappers: ``SoftDecode(DifferentialPrivacyServerSideFixedClipping(FedAvg(),
    ...))``, so that they clip and noise full weights). Per TRAIN round:

    * ``configure_train`` snapshots the global arrays (their key order and the peft <-> fedsoft
      :class:`~fedsoft.dropin.keys.KeyMap`, refusing an unmappable model), puts the
      ``fedsoft.*`` settings and the round into the config record the inner strategy sends
      (a copy: the caller's record is not changed) and delegates;
    * ``aggregate_train`` measures each reply's ArrayRecord bytes (``count_bytes``, as Flower
      counts them) *before* decoding, validates and decodes the encoded replies with
      :func:`fedsoft.compression.update.decode_update` (the codec's checks, the per-layer
      budget at this round's sparsity, at most ``max_bytes_factor`` x the dense reply), and
      gives the inner strategy each client's full weights ``global + decoded update`` in the
      global key order with its original MetricRecord, so eq. (5)'s weighted mean (FedAvg), a
      server optimiser (FedAdam's pseudo-gradient) or a DP wrapper's clipping sees what a dense
      client would have sent. A reply that fails to decode is dropped with a warning naming
      the node and the reason, and the round goes on with the others; a plain reply (no
      ``"fedsoft"`` marker: a client without the mod) is dropped (``plain_replies="reject"``)
      or aggregated as it is (``"accept"``); error replies are handed on unchanged.

    The aggregated MetricRecord gains ``uplink_bytes`` (the received ArrayRecords' bytes,
    dropped replies included), ``dense_uplink_bytes`` (the same replies as dense full-weight
    ArrayRecords), ``soft_decoded`` and ``soft_dropped``; ``history`` keeps one dict per round.
    """

    def __init__(
        self,
        inner: Strategy,
        sparsifier: str = "soft",
        sparsity: float = 0.9,
        wire_dtype: str = "float32",
        head_sparsity: float = 0.0,
        seed: int = 0,
        *,
        target: str = "update",
        split: str = "joint",
        plain_replies: str = "reject",
        max_bytes_factor: float = 2.0,
    ) -> None:
        super().__init__()
        if not isinstance(inner, Strategy):
            raise TypeError(f"inner must be a flwr.serverapp.strategy.Strategy, got "
                            f"{type(inner).__name__}")
        if plain_replies not in PLAIN_POLICIES:
            raise ValueError(f"plain_replies = {plain_replies!r}: must be one of "
                             f"{PLAIN_POLICIES}")
        if not max_bytes_factor > 0:
            raise ValueError(f"max_bytes_factor must be > 0, got {max_bytes_factor!r}")
        self.inner = inner
        self.settings = SparseSettings(sparsifier=sparsifier, sparsity=sparsity, target=target,
                                       dtype=wire_dtype, split=split, seed=seed,
                                       head_sparsity=head_sparsity)
        self.plain_replies = plain_replies
        self.max_bytes_factor = float(max_bytes_factor)
        self.history: list[dict[str, Any]] = []
        self._rounds: dict[int, _Round] = {}

    def __repr__(self) -> str:
        return f"SoftDecode({self.inner!r}, {self.settings})"

    def summary(self) -> None:
        """Log the compression settings, then the inner strategy's summary."""
        s = self.settings
        log(INFO, "\t├──> SoftDecode: sparsifier=%s sparsity=%s wire-dtype=%s head-sparsity=%s "
            "plain replies: %s", s.sparsifier, s.sparsity, s.dtype, s.head_sparsity,
            self.plain_replies)
        self.inner.summary()

    # ---- train ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Snapshot the global arrays, add the ``fedsoft.*`` keys, delegate."""
        global_np = {k: a.numpy() for k, a in arrays.items()}
        keymap = KeyMap.from_arrays(global_np)
        self._rounds[server_round] = _Round(self.settings, keymap, keymap.to_fedsoft(global_np),
                                            int(arrays.count_bytes()))
        keys = settings_to_config(self.settings, server_round)
        config = ConfigRecord(dict(config))
        config.update(keys)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        for msg in messages:
            _ensure_keys(msg, keys)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the encoded replies to full weights, then the inner strategy aggregates."""
        rnd = self._rounds.pop(server_round, None)
        if rnd is None:
            raise RuntimeError(f"SoftDecode.aggregate_train({server_round}) without "
                               "configure_train of that round")
        for old in [r for r in self._rounds if r < server_round]:
            del self._rounds[old]  # rounds that were configured but never aggregated
        uplink = dense = decoded = plain = 0
        dropped: list[str] = []
        kept: list[Message] = []
        for reply in replies:
            if reply.has_error() or not reply.has_content():
                kept.append(reply)
                continue
            nid = int(reply.metadata.src_node_id)
            content = reply.content
            uplink += sum(int(r.count_bytes()) for r in content.array_records.values())
            dense += rnd.dense_bytes
            marker = content.config_records.get(MARKER)
            if marker is None:
                if self.plain_replies == "accept":
                    plain += 1
                    kept.append(reply)
                else:
                    dropped.append(f"node {nid}: plain reply without the {MARKER!r} marker (a "
                                   "client without soft_mod?)")
                continue
            try:
                full = self._decode(server_round, rnd, nid, content, marker)
            except Exception as err:  # noqa: BLE001 - an untrusted reply never ends a round
                dropped.append(f"node {nid}: {type(err).__name__}: {err}")
                continue
            name = next(iter(content.array_records))
            out = RecordDict()
            for key, record in content.items():
                if key == MARKER:
                    continue
                out[key] = full if key == name else record
            reply.content = out
            decoded += 1
            kept.append(reply)
        for reason in dropped:
            log(WARNING, "SoftDecode: round %d: dropped the reply of %s", server_round, reason)
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        stats = {"round": server_round, "uplink_bytes": uplink, "dense_uplink_bytes": dense,
                 "soft_decoded": decoded, "soft_dropped": len(dropped), "plain_accepted": plain,
                 "dropped": dropped}
        self.history.append(stats)
        metrics = MetricRecord(dict(metrics) if metrics is not None else {})
        for key in ("uplink_bytes", "dense_uplink_bytes", "soft_decoded", "soft_dropped"):
            metrics[key] = int(stats[key])
        if dense:
            log(INFO, "SoftDecode: round %d: %d uplink bytes for %d dense (%.3f), %d decoded, "
                "%d dropped", server_round, uplink, dense, uplink / dense, decoded,
                len(dropped))
        return arrays, metrics

    def _decode(self, server_round: int, rnd: _Round, nid: int, content: RecordDict,
                marker: ConfigRecord) -> ArrayRecord:
        """One encoded reply -> its full-weight ArrayRecord (raises on anything invalid)."""
        if marker.get("format") != FORMAT:
            raise ValueError(f"format {marker.get('format')!r}, expected {FORMAT!r}")
        if marker.get("round") != server_round:
            raise ValueError(f"reply encoded for round {marker.get('round')!r}, this is round "
                             f"{server_round}")
        for fld, key in CONFIG_KEYS.items():
            mine = getattr(rnd.settings, fld)
            if marker.get(key) != mine:
                raise ValueError(f"encoded with {key} = {marker.get(key)!r}, the server decodes "
                                 f"with {mine!r}")
        if len(content.array_records) != 1:
            raise ValueError(f"{len(content.array_records)} ArrayRecords, expected 1")
        record = next(iter(content.array_records.values()))
        max_bytes = int(self.max_bytes_factor * rnd.dense_bytes) + 4096
        layout = ReplyLayout.payload(rnd.settings, rnd.global_fedsoft, max_bytes)
        payload = checked_numpy(record, layout, what="payload")
        out = decode_update(payload, rnd.global_fedsoft, rnd.settings, server_round=server_round,
                            node_id=nid, max_bytes=max_bytes)
        full = rnd.keymap.to_peft(out)
        return ArrayRecord({k: Array(v) for k, v in full.items()})

    # ---- evaluate: delegated ---------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Delegated to the inner strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Delegated to the inner strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)


def _ensure_keys(msg: Message, keys: dict[str, Any]) -> None:
    """Make sure the instruction's (single) config record carries ``keys``: an inner strategy
    that built its own config gets a per-message copy with them; never a second record."""
    content = msg.content
    records = content.config_records
    for record in records.values():
        if record.get(PREFIX + "format") == keys[PREFIX + "format"] and all(
                record.get(k) == v for k, v in keys.items()):
            return
    name = next(iter(records), "config")
    copy = ConfigRecord(dict(records[name]) if name in records else {})
    copy.update(keys)
    out = RecordDict()
    for key, record in content.items():
        out[key] = copy if key == name else record
    if name not in out:
        out[name] = copy
    msg.content = out
