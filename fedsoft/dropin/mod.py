"""ClientApp mod: encode any app's train reply as a SOFT-sparsified LoRA update (eqs. 10-14)."""

from __future__ import annotations

from collections.abc import Mapping
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import log

from fedsoft.compression import codec
from fedsoft.compression.error_feedback import ErrorFeedback, ErrorFeedbackError
from fedsoft.compression.update import SparseSettings, encode_update
from fedsoft.dropin.keys import KeyMap

__all__ = ["CONFIG_KEYS", "EF_STATE_KEY", "FORMAT", "MARKER", "PREFIX", "find_config",
           "is_train", "settings_from_config", "settings_to_config", "soft_mod"]

FORMAT = f"fedsoft-soft/{codec.FORMAT_VERSION}"  # wire format of an encoded reply
PREFIX = "fedsoft."  # the server wrapper's keys in the instruction's ConfigRecord
MARKER = "fedsoft"  # name of the ConfigRecord that marks an encoded reply
EF_STATE_KEY = "fedsoft.error-feedback"  # ArrayRecord in context.state: the error memory
# SparseSettings field -> config key (after PREFIX)
CONFIG_KEYS = {"sparsifier": "sparsifier", "sparsity": "sparsity", "dtype": "wire-dtype",
               "head_sparsity": "head-sparsity", "target": "target", "split": "split",
               "seed": "seed"}


def is_train(msg: Message) -> bool:
    """A TRAIN instruction (``"train"`` or ``"train.<action>"``)."""
    kind = msg.metadata.message_type
    return kind == MessageType.TRAIN or kind.startswith(MessageType.TRAIN + ".")


def settings_to_config(settings: SparseSettings, server_round: int) -> dict[str, Any]:
    """The ``fedsoft.*`` config entries the server wrapper sends with each TRAIN instruction."""
    out: dict[str, Any] = {PREFIX + "format": FORMAT, PREFIX + "round": int(server_round)}
    for field, key in CONFIG_KEYS.items():
        value = getattr(settings, field)
        out[PREFIX + key] = float(value) if isinstance(value, float) else value
    return out


def settings_from_config(config: Mapping[str, Any], defaults: SparseSettings
                         ) -> SparseSettings:
    """``defaults`` with every ``fedsoft.*`` value present in ``config`` taken from it (the
    server's settings win, so both sides decode with the same ones); validated."""
    values = {field: config.get(PREFIX + key, getattr(defaults, field))
              for field, key in CONFIG_KEYS.items()}
    return SparseSettings(**values)


def find_config(content: RecordDict) -> ConfigRecord | None:
    """The instruction's ConfigRecord that carries ``fedsoft.format``, else its only one."""
    records = list(content.config_records.values())
    for record in records:
        if PREFIX + "format" in record:
            return record
    return records[0] if len(records) == 1 else None


def _marker(settings: SparseSettings, server_round: int, info: Mapping[str, float],
            ef_reset: bool) -> ConfigRecord:
    """What the reply says about itself (the server checks it against its own settings)."""
    out = {k[len(PREFIX):]: v for k, v in settings_to_config(settings, server_round).items()}
    out.update({k.replace("_", "-"): float(v) for k, v in info.items()})
    out["ef-reset"] = int(ef_reset)
    return ConfigRecord(out)


def _load_ef(context: Context, signature: str) -> ErrorFeedback:
    record = context.state.array_records.get(EF_STATE_KEY)
    if record is None:
        return ErrorFeedback(signature)
    try:
        return ErrorFeedback.from_arrays({k: a.numpy() for k, a in record.items()}, signature)
    except (ErrorFeedbackError, ValueError, TypeError) as exc:
        log(WARNING, "soft_mod: stored error memory unusable (%s): reset to zero", exc)
        ef = ErrorFeedback(signature)
        ef.reset_reason = f"stored memory unusable: {exc}"
        return ef


def soft_mod(
    sparsifier: str = "soft",
    sparsity: float = 0.9,
    wire_dtype: str = "float32",
    head_sparsity: float = 0.0,
    seed: int = 0,
    *,
    target: str = "update",
    split: str = "joint",
    error_feedback: bool = True,
    require_server: bool = True,
) -> Mod:
    """A Flower ``Mod`` that uploads a TRAIN reply's LoRA arrays as fedsoft's sparse payload.

    Register it outermost: ``ClientApp(mods=[soft_mod(...), fixedclipping_mod])``. For a TRAIN
    instruction with one ArrayRecord of peft arrays (``get_peft_model_state_dict`` keys, see
    :class:`~fedsoft.dropin.keys.KeyMap`) it snapshots the global arrays, runs the app and, if
    the reply has no error and exactly one ArrayRecord with the same keys, replaces that
    record by the payload of :func:`fedsoft.compression.update.encode_update`: the local change
    plus the error memory ``e_t`` (kept per node in ``context.state``), sparsified by
    ``sparsifier`` with ``e_{t+1} = u - S(u)`` (eqs. 10-14 of paper A), plus a ``"fedsoft"``
    ConfigRecord naming the format and settings. The reply's MetricRecords (``num-examples``,
    clipping mods' ``norm_bit``, ...) and other records are left as they are; every other
    message passes through untouched, and the instruction is never modified.

    The arguments are defaults: the ``fedsoft.*`` keys that :class:`SoftDecode` puts into the
    instruction's ``config`` record override them, so client and server always agree. Without
    those keys (a server without the wrapper, which could not decode) the reply stays plain,
    unless ``require_server=False``. The node id that seeds the sparsifier is the
    instruction's ``dst_node_id`` (the server uses the reply's ``src_node_id``: the same id).
    ``error_feedback=False`` sends ``S(x)`` with no memory (e.g. for client-side DP clipping:
    with memory the sent update's norm is no longer bounded by the clipping norm).
    """
    defaults = SparseSettings(sparsifier=sparsifier, sparsity=sparsity, target=target,
                              dtype=wire_dtype, split=split, seed=seed,
                              head_sparsity=head_sparsity)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not is_train(msg) or not msg.has_content():
            return call_next(msg, context)
        config = find_config(msg.content)
        sent = config is not None and PREFIX + "format" in config
        if not sent and require_server:
            return call_next(msg, context)
        if sent and config[PREFIX + "format"] != FORMAT:
            log(WARNING, "soft_mod: server format %r, this client speaks %r: plain reply",
                config[PREFIX + "format"], FORMAT)
            return call_next(msg, context)
        settings = settings_from_config(config or {}, defaults)
        server_round = int((config or {}).get(PREFIX + "round",
                                              (config or {}).get("server-round", 0)))
        if len(msg.content.array_records) != 1:
            log(WARNING, "soft_mod: instruction has %d ArrayRecords (need 1): plain reply",
                len(msg.content.array_records))
            return call_next(msg, context)
        record = next(iter(msg.content.array_records.values()))
        global_np = {k: a.numpy() for k, a in record.items()}  # before the app runs
        keymap = KeyMap.from_arrays(global_np)  # refuses an unmappable model (KeyMapError)

        reply = call_next(msg, context)

        if reply.has_error() or not reply.has_content():
            return reply
        records = reply.content.array_records
        if len(records) != 1:
            log(WARNING, "soft_mod: reply has %d ArrayRecords (need 1): sent as it is",
                len(records))
            return reply
        name, local = next(iter(records.items()))
        if set(local.keys()) != set(global_np):
            log(WARNING, "soft_mod: reply's array keys differ from the instruction's: sent "
                "as it is")
            return reply
        g = keymap.to_fedsoft(global_np)
        x = keymap.to_fedsoft({k: a.numpy() for k, a in local.items()})
        signature = f"dropin|{settings.signature}|{keymap.signature}"
        ef = _load_ef(context, signature) if error_feedback else ErrorFeedback(signature)
        payload, info = encode_update(g, x, settings, ef, server_round=server_round,
                                      node_id=int(msg.metadata.dst_node_id))
        if error_feedback:
            context.state[EF_STATE_KEY] = ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in ef.to_arrays().items()})
        reply.content[name] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in payload.items()})
        reply.content[MARKER] = _marker(settings, server_round, info,
                                        ef.reset_reason is not None)
        return reply

    return mod
