"""Hostile replies against the server's reply path at MiniLM's LoRA shapes: cases, rejections,
whether the model stayed what the honest replies make it, and the server's peak memory.

Run: ``.venv/bin/python bench/hostile_replies.py [--seeds 20] [--fuzz 300]``. In process, no
engine: for each strategy (dense ``LoRAFedAvg``, SOFT ``SparseLoRAFedAvg`` at rho = 0.5,
``SketchFedAvg``) and each class of :mod:`fedsoft.attacks`, a round of 3 clients in which one
sends the hostile reply; "model unchanged" means the aggregate equals, bit for bit, the one of
the same round without that client. ``fuzz`` mutates the raw bytes, dtype or shape of one Array
of a valid SOFT reply. Peak memory is ``tracemalloc``'s peak during ``aggregate_train``, shown
against the honest reply's size.
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`

from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402  (internal API, 1.42)

from fedsoft.attacks import CLASSES, hostile_reply  # noqa: E402
from fedsoft.compression.error_feedback import ErrorFeedback  # noqa: E402
from fedsoft.compression.update import SparseSettings, encode_update  # noqa: E402
from fedsoft.config import DEFAULTS  # noqa: E402
from fedsoft.sketching.optimizer import SamplingPlan  # noqa: E402
from fedsoft.sketching.sketch import layer_indices, sketch_reply  # noqa: E402
from fedsoft.sketching.wallclock import SystemModel, compute_speeds  # noqa: E402
from fedsoft.wireless.channel import Channel, ChannelConfig  # noqa: E402
from strategies import LoRAFedAvg, SketchFedAvg, SparseLoRAFedAvg  # noqa: E402
from strategies.records import to_numpy, to_record  # noqa: E402

NODES = [101, 202, 303]
PARTS = {101: 0, 202: 1, 303: 2}
SIZES = {0: 1333, 1: 1333, 2: 1334}
R, D, LAYERS, LABELS = 8, 384, 12, 10


class _Grid(Grid):
    def __init__(self, ids):
        self._ids = ids

    def set_run(self, run):  # noqa: D102
        pass

    @property
    def run(self):  # noqa: D102
        return None

    def create_message(self, *a, **k):  # noqa: D102
        raise NotImplementedError

    def get_node_ids(self):  # noqa: D102
        return list(self._ids)

    def push_messages(self, messages):  # noqa: D102
        return []

    def pull_messages(self, message_ids):  # noqa: D102
        return []

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        return []


def _global(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(LAYERS):
        out[f"l{i}.lora_A"] = (0.05 * rng.standard_normal((R, D))).astype(np.float32)
        out[f"l{i}.lora_B"] = (0.01 * rng.standard_normal((D, R))).astype(np.float32)
    out["head.classifier.weight"] = (0.05 * rng.standard_normal((LABELS, D))).astype(np.float32)
    out["head.classifier.bias"] = np.zeros(LABELS, np.float32)
    return out


def _strategy(kind: str):
    common = dict(seed=0, node_to_client=PARTS, data_sizes=SIZES)
    if kind == "dense":
        return LoRAFedAvg(3, **common)
    if kind == "soft":
        return SparseLoRAFedAvg(3, SparseSettings("soft", 0.5), **common)
    ch = Channel(ChannelConfig(num_clients=3), seed=0)
    system = SystemModel(compute_speeds(3, 0.2, 1.0, 0), 10, 0.3, R, 32 * 2 * D * LAYERS,
                         32 * LABELS * D, ch)
    plan = SamplingPlan(q=np.ones(3), k=np.array([4, 4, 4]), objective=0.0,
                        uniform_objective=0.0, expected_round_s=0.0)
    return SketchFedAvg(plan, system, np.array([SIZES[i] for i in range(3)]), **common)


def _honest(kind, strategy, msg, glob, seed):
    nid = msg.metadata.dst_node_id
    rng = np.random.default_rng([seed, nid])
    local = {k: (v + 0.003 * rng.standard_normal(v.shape)).astype(np.float32)
             for k, v in glob.items()}
    if kind == "soft":
        arrays, _ = encode_update(glob, local, strategy.settings, ErrorFeedback(),
                                  server_round=1, node_id=strategy.client_key(nid))
    elif kind == "sketch":
        idx = layer_indices(glob, int(msg.content["config"]["sketch-size"]), 0, 1,
                            strategy.client_key(nid))
        arrays = sketch_reply(glob, local, idx)
    else:
        arrays = local
    return arrays, {"num-examples": SIZES[PARTS[nid]], "train-loss": 1.0, "server-round": 1}


def _message(to, arrays, metrics, raw=None, mutate=None):
    record = to_record(arrays)
    for key, r in (raw or {}).items():
        record[key] = Array(dtype=r.dtype, shape=r.shape, stype="numpy.ndarray", data=r.data)
    if mutate is not None:
        mutate(record)
    msg = Message(content=RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}),
                  reply_to=to)
    msg.metadata.__dict__["_src_node_id"] = to.metadata.dst_node_id
    return msg


def _round(kind, seed, attack=None, mutate=None, drop=False):
    """(aggregate or None, stats, peak bytes, honest reply bytes)."""
    s = _strategy(kind)
    glob = _global(seed)
    msgs = list(s.configure_train(1, to_record(glob), ConfigRecord(dict(DEFAULTS)),
                                  _Grid(NODES)))
    replies, honest_bytes = [], 0
    for i, m in enumerate(msgs):
        arrays, metrics = _honest(kind, s, m, glob, seed)
        honest_bytes = max(honest_bytes, int(to_record(arrays).count_bytes()))
        if i == 1:
            if drop:
                continue
            if attack is not None:
                h = hostile_reply(attack, arrays, metrics, glob, seed=seed)
                replies.append(_message(m, h.arrays, h.metrics, h.raw))
                continue
            if mutate is not None:
                replies.append(_message(m, arrays, metrics, mutate=mutate))
                continue
        replies.append(_message(m, arrays, metrics))
    tracemalloc.start()
    new, _ = s.aggregate_train(1, replies)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (None if new is None else to_numpy(new)), s.round_stats[1], peak, honest_bytes


def _same(a, b) -> bool:
    return a is not None and b is not None and all(np.array_equal(a[k], b[k]) for k in b)


def _mutator(rng):
    op = rng.choice(["truncate", "flip", "extend", "shape", "dtype", "header"])

    def mutate(record):
        key = sorted(record.keys())[rng.integers(len(record))]
        arr = record[key]
        raw = bytearray(arr.data)
        shape, dtype = tuple(arr.shape), arr.dtype
        if op == "truncate":
            raw = raw[: rng.integers(0, len(raw))]
        elif op == "flip":
            raw[rng.integers(len(raw))] ^= int(rng.integers(1, 256))
        elif op == "extend":
            raw += rng.bytes(int(rng.integers(1, 64)))
        elif op == "header":
            raw[10:30] = rng.bytes(20)
        elif op == "shape":
            shape = tuple(int(x) for x in rng.integers(0, 1 << 40, rng.integers(0, 4)))
        else:
            dtype = str(rng.choice(["float64", "object", "int8", "<U4"]))
        record[key] = Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=bytes(raw))

    return op, mutate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="cases per class and strategy")
    parser.add_argument("--fuzz", type=int, default=300, help="record-layer mutations")
    args = parser.parse_args()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    print(f"{'class':<14} {'cases':>6} {'rejected':>9} {'unchanged':>10} {'peak MiB':>9} "
          f"{'peak / honest reply':>20}")
    base = {(k, s): _round(k, s, drop=True) for k in ("dense", "soft", "sketch")
            for s in range(args.seeds)}
    refs = {key: out[0] for key, out in base.items()}
    peak_max = max(out[2] for out in base.values())
    ratio = max(out[2] / out[3] for out in base.values())
    print(f"{'(no attacker)':<14} {len(base):>6} {'-':>9} {'-':>10} {peak_max / 2**20:>9.2f} "
          f"{ratio:>19.1f}x")
    for attack in CLASSES:
        cases = rejected = unchanged = 0
        peak_max, ratio = 0, 0.0
        for kind in ("dense", "soft", "sketch"):
            for seed in range(args.seeds):
                new, stats, peak, honest = _round(kind, seed, attack=attack)
                cases += 1
                rejected += int(stats["dropped"] == 1 and stats["num_clients"] == 2)
                unchanged += int(_same(new, refs[(kind, seed)]))
                peak_max, ratio = max(peak_max, peak), max(ratio, peak / honest)
        print(f"{attack:<14} {cases:>6} {rejected:>9} {unchanged:>10} {peak_max / 2**20:>9.2f} "
              f"{ratio:>19.1f}x")
    rng = np.random.default_rng(12345)
    cases = rejected = unchanged = accepted_ok = 0
    peak_max, ratio = 0, 0.0
    for _ in range(args.fuzz):
        seed = int(rng.integers(args.seeds))
        _, mutate = _mutator(rng)
        new, stats, peak, honest = _round("soft", seed, mutate=mutate)
        cases += 1
        dropped = stats["dropped"] == 1
        rejected += int(dropped)
        unchanged += int(_same(new, refs[("soft", seed)]))
        # a mutation that still decodes (e.g. a flipped mantissa bit) is a valid reply
        accepted_ok += int(not dropped and new is not None
                           and all(np.isfinite(v).all() for v in new.values()))
        peak_max, ratio = max(peak_max, peak), max(ratio, peak / honest)
    print(f"{'fuzz (bytes)':<14} {cases:>6} {rejected:>9} {unchanged:>10} "
          f"{peak_max / 2**20:>9.2f} {ratio:>19.1f}x")
    print(f"fuzz: {cases - rejected} mutated replies still decoded to a valid finite update "
          f"({accepted_ok} with a finite aggregate); none raised out of aggregate_train")


if __name__ == "__main__":
    main()
