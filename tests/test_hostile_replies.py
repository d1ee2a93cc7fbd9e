"""The server's reply path against hostile clients, in process: every attack class on every
strategy, bounded weights and norms, round binding, partition discovery, record-layer fuzzing."""

import io
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsoft.attacks import CLASSES, hostile_reply
from fedsoft.compression.error_feedback import ErrorFeedback
from fedsoft.compression.update import SparseSettings, encode_update
from fedsoft.config import DEFAULTS
from fedsoft.sketching.optimizer import SamplingPlan
from fedsoft.sketching.sketch import layer_indices, sketch_reply
from fedsoft.sketching.wallclock import SystemModel, compute_speeds
from fedsoft.wireless.channel import Channel, ChannelConfig
from strategies import LoRAFedAvg, SketchFedAvg, SparseLoRAFedAvg
from strategies.discovery import discover
from strategies.records import RecordError, ReplyLayout, checked_numpy, to_numpy, to_record
from tests.test_strategies import FakeGrid, _arrays

NODES = [11, 22, 33]
PARTS = {11: 0, 22: 1, 33: 2}
SIZES = {0: 120, 1: 80, 2: 100}


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity  # internal API (1.42)

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _strategy(kind: str, **kw):
    q = np.array(kw.pop("q", [1.0, 1.0, 1.0]))
    common = dict(seed=0, node_to_client=PARTS, data_sizes=SIZES, **kw)
    if kind == "dense":
        return LoRAFedAvg(3, **common)
    if kind == "sparse":
        return SparseLoRAFedAvg(3, SparseSettings("soft", 0.5), **common)
    ch = Channel(ChannelConfig(num_clients=3), seed=0)
    system = SystemModel(compute_speeds(3, 0.2, 1.0, 0), 10, 0.3, 4, 32 * 32, 32 * 48, ch)
    plan = SamplingPlan(q=q, k=np.array([2, 3, 4]), objective=0.0, uniform_objective=0.0,
                        expected_round_s=0.0)
    return SketchFedAvg(plan, system, np.array([SIZES[i] for i in range(3)]), **common)


def _honest(kind: str, strategy, msg: Message, glob: dict, rnd: int):
    nid = msg.metadata.dst_node_id
    local = {k: v + 0.01 * _arrays(nid)[k] for k, v in glob.items()}
    if kind == "sparse":
        arrays, _ = encode_update(glob, local, strategy.settings, ErrorFeedback(),
                                  server_round=rnd, node_id=strategy.client_key(nid))
    elif kind == "sketch":
        k = int(msg.content["config"]["sketch-size"])
        idx = layer_indices(glob, k, 0, rnd, strategy.client_key(nid))
        arrays = sketch_reply(glob, local, idx)
    else:
        arrays = local
    metrics = {"num-examples": SIZES[PARTS[nid]], "train-loss": 1.0, "train-s": 0.5,
               "server-round": rnd}
    return arrays, metrics


def _message(to: Message, arrays: dict, metrics: dict, raw: dict | None = None) -> Message:
    record = to_record(arrays)
    for key, r in (raw or {}).items():
        record[key] = Array(dtype=r.dtype, shape=r.shape, stype="numpy.ndarray", data=r.data)
    msg = Message(content=RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}),
                  reply_to=to)
    msg.metadata.__dict__["_src_node_id"] = to.metadata.dst_node_id
    return msg


def _round(kind: str, rnd: int, bad: int | None, attack: str | None, **kw):
    """One round of ``kind`` in which node index ``bad`` sends class ``attack`` (None: its reply
    is missing). Returns (new arrays or None, stats, strategy)."""
    s = _strategy(kind, **kw)
    glob = _arrays(0)
    msgs = list(s.configure_train(rnd, to_record(glob), ConfigRecord(dict(DEFAULTS)),
                                  FakeGrid(NODES)))
    replies = []
    s.bad_node = None
    for i, m in enumerate(msgs):
        arrays, metrics = _honest(kind, s, m, glob, rnd)
        if i == bad:
            s.bad_node = m.metadata.dst_node_id
            if attack is None:
                continue
            h = hostile_reply(attack, arrays, metrics, glob, seed=rnd)
            replies.append(_message(m, h.arrays, h.metrics, h.raw))
        else:
            replies.append(_message(m, arrays, metrics))
    new, _ = s.aggregate_train(rnd, replies)
    return (None if new is None else to_numpy(new)), s.round_stats[rnd], s


@pytest.mark.parametrize("kind", ["dense", "sparse", "sketch"])
@pytest.mark.parametrize("attack", CLASSES)
def test_every_attack_class_is_dropped_and_the_model_equals_the_honest_only_one(kind, attack):
    got, stats, s = _round(kind, 1, 1, attack)
    ref, ref_stats, _ = _round(kind, 1, 1, None)
    assert stats["dropped"] == 1 and stats["num_clients"] == 2, stats["dropped_reasons"]
    assert stats["dropped_reasons"][0].startswith(f"node {s.bad_node}:")
    assert ref is not None and got is not None
    for key in ref:
        assert np.array_equal(got[key], ref[key]), key  # bit for bit


def test_reply_order_does_not_change_the_aggregate():
    s1, s2 = _strategy("dense"), _strategy("dense")
    glob = _arrays(0)
    outs = []
    for s, order in ((s1, [0, 1, 2]), (s2, [2, 0, 1])):
        msgs = list(s.configure_train(1, to_record(glob), ConfigRecord({}), FakeGrid(NODES)))
        replies = [_message(m, *_honest("dense", s, m, glob, 1)) for m in msgs]
        new, _ = s.aggregate_train(1, [replies[i] for i in order])
        outs.append(to_numpy(new))
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])


@pytest.mark.parametrize("count", [(1 << 63) - 1, 1e308, 1e30])
def test_unknown_share_weights_are_capped_and_huge_counts_cannot_zero_the_model(count):
    s = LoRAFedAvg(2, seed=0, max_num_examples=1000)  # no server-known shares
    glob = _arrays(0)
    msgs = list(s.configure_train(1, to_record(glob), ConfigRecord({}), FakeGrid([1, 2])))
    locals_ = [{k: v + 0.01 * _arrays(7 + i)[k] for k, v in glob.items()} for i in range(2)]
    replies = [_message(m, locals_[i], {"num-examples": count, "server-round": 1})
               for i, m in enumerate(msgs)]
    new, _ = s.aggregate_train(1, replies)
    got = to_numpy(new)
    assert [a.weight for a in s.accepted] == [1000.0, 1000.0]
    for key in glob:
        expect = (0.5 * locals_[0][key].astype(np.float64)
                  + 0.5 * locals_[1][key].astype(np.float64)).astype(np.float32)
        np.testing.assert_allclose(got[key], expect, rtol=1e-6, atol=1e-7)
        assert np.abs(got[key]).max() > 0  # not silently zeroed


def test_reported_count_is_checked_against_the_server_known_share():
    _, stats, s = _round("dense", 1, None, None)
    assert [a.weight for a in s.accepted] == [120.0, 80.0, 100.0]  # server-known, not reported
    s = _strategy("dense")
    glob = _arrays(0)
    msgs = list(s.configure_train(1, to_record(glob), ConfigRecord({}), FakeGrid(NODES)))
    arrays, metrics = _honest("dense", s, msgs[0], glob, 1)
    s.aggregate_train(1, [_message(msgs[0], arrays, {**metrics, "num-examples": 121})])
    pid = PARTS[msgs[0].metadata.dst_node_id]
    assert f"partition {pid} holds {SIZES[pid]}" in s.round_stats[1]["dropped_reasons"][0]


def test_update_norm_bound_keeps_honest_spread_and_uses_the_running_reference():
    s = _strategy("dense", update_norm_bound=10.0)
    glob = _arrays(0)
    for rnd, scales in ((1, [1.0, 3.0, 0.3]), (2, [1.0, 60.0, 1.0]), (3, [1.0, 9.0, 1.0]),
                        (4, [60.0])):
        msgs = list(s.configure_train(rnd, to_record(glob), ConfigRecord({}),
                                      FakeGrid(NODES)))[:len(scales)]
        replies = []
        for m, scale in zip(msgs, scales, strict=True):
            nid = m.metadata.dst_node_id
            local = {k: v + 0.01 * scale * _arrays(nid)[k] for k, v in glob.items()}
            replies.append(_message(m, local, {"num-examples": SIZES[PARTS[nid]],
                                               "server-round": rnd}))
        s.aggregate_train(rnd, replies)
    # a 10x spread of honest norms passes; 60x the others is dropped
    assert s.round_stats[1]["num_clients"] == 3
    assert s.round_stats[2]["num_clients"] == 2
    assert "update-norm-bound" in s.round_stats[2]["dropped_reasons"][0]
    assert s.round_stats[3]["num_clients"] == 3
    # a lone reply is judged against the last rounds' accepted norms
    assert s.round_stats[4]["num_clients"] == 0 and s.round_stats[4]["dropped"] == 1
    off = _strategy("dense", update_norm_bound=0.0)
    assert off._bound_norms(1, [type("R", (), {"norm": n})() for n in (1, 1e9)], []) != []


def test_a_non_finite_aggregate_is_never_applied():
    # sketching's 1/q weights can amplify a finite reply beyond float32: refused, logged
    s = _strategy("sketch")
    glob = _arrays(0)
    msgs = list(s.configure_train(1, to_record(glob), ConfigRecord(dict(DEFAULTS)),
                                  FakeGrid(NODES)))
    s.plan.q[:] = 1e-3  # as if drawn with a tiny probability: weight a_n / q_n = 400
    replies = []
    for m in msgs[:1]:
        arrays, metrics = _honest("sketch", s, m, glob, 1)
        replies.append(_message(m, {k: np.full_like(v, 1e37) for k, v in arrays.items()},
                                metrics))
    new, _ = s.aggregate_train(1, replies)
    assert new is None
    stats = s.round_stats[1]
    assert stats["skipped"] == 1 and stats["aggregate_rejected"] == 1
    assert "NaN or Inf" in stats["aggregate_problem"]


def test_huge_finite_sparse_values_do_not_break_the_diagnostics():
    s = SparseLoRAFedAvg(1, SparseSettings("soft", 0.5), seed=0, update_norm_bound=0.0)
    glob = _arrays(0)
    (m,) = s.configure_train(1, to_record(glob), ConfigRecord(dict(DEFAULTS)), FakeGrid([5]))
    payload, _ = encode_update(glob, _arrays(3), s.settings, ErrorFeedback(), server_round=1,
                               node_id=5)
    payload["vals"] = np.full_like(payload["vals"], 1e19)
    new, _ = s.aggregate_train(1, [_message(m, payload, {"num-examples": 10,
                                                         "server-round": 1})])
    stats = s.round_stats[1]
    assert new is not None and stats["num_clients"] == 1  # bound off: applied, nothing raised
    assert all(k in stats for k in ("cov_fro", "orth_offdiag", "svd_proxy_rel_err"))


class _QueryGrid(FakeGrid):
    def __init__(self, ids, answers):
        super().__init__(ids)
        self.answers = answers

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            info = self.answers.get(m.metadata.dst_node_id)
            content = RecordDict() if info is None else RecordDict(
                {"info": MetricRecord(info)})
            r = Message(content=content, reply_to=m)
            r.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            out.append(r)
        return out


def test_partition_discovery_survives_malformed_answers_and_slots_never_raise():
    answers = {1: {"partition-id": 0, "num-partitions": 6},
               2: None,                                              # no info record
               3: {"partition-id": 2.5, "num-partitions": 6},        # not an integer
               4: {"partition-id": 99, "num-partitions": 6},         # out of range
               5: {"partition-id": 3, "num-partitions": 6},
               6: {"partition-id": 3, "num-partitions": 6},          # duplicate of node 5
               7: {"partition-id": 1, "num-partitions": 7}}          # disagrees on the count
    found = discover(_QueryGrid(list(answers), answers), list(answers))
    assert found.node_to_partition == {1: 0} and found.num_partitions == 6
    s = LoRAFedAvg(3, node_to_client=found.node_to_partition)
    slots = s.client_slots(list(answers), 6)
    assert slots[1] == 0 and sorted(slots.values()) == list(range(6))  # node 7 left out
    assert len(s.client_slots(list(answers), 2)) == 2


# ---------------------------------------------------------------- record-layer fuzzing
def _valid_sparse():
    s = SparseLoRAFedAvg(2, SparseSettings("soft", 0.5), seed=0, node_to_client={1: 0, 2: 1},
                         data_sizes={0: 10, 1: 10})
    glob = _arrays(0)
    msgs = list(s.configure_train(1, to_record(glob), ConfigRecord(dict(DEFAULTS)),
                                  FakeGrid([1, 2])))
    replies = []
    for m in msgs:
        nid = m.metadata.dst_node_id
        payload, _ = encode_update(glob, _arrays(nid, 0.1), s.settings, ErrorFeedback(),
                                   server_round=1, node_id=nid)
        replies.append((m, payload))
    return s, replies


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_array_bytes_never_escape_the_reply_path(data):
    s, replies = _valid_sparse()
    (m0, p0), (m1, p1) = replies
    record = to_record(p1)
    key = data.draw(st.sampled_from(sorted(record.keys())))
    arr = record[key]
    raw = bytearray(arr.data)
    op = data.draw(st.sampled_from(["truncate", "flip", "extend", "shape", "dtype", "header"]))
    if op == "truncate":
        raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif op == "flip":
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    elif op == "extend":
        raw += bytes(data.draw(st.binary(min_size=1, max_size=64)))
    elif op == "header":
        raw[10:10 + 20] = data.draw(st.binary(min_size=20, max_size=20))
    shape = tuple(arr.shape)
    if op == "shape":
        shape = tuple(data.draw(st.lists(st.integers(0, 1 << 40), min_size=0, max_size=3)))
    dtype = data.draw(st.sampled_from(["float64", "object", "int8", "<U4"])) \
        if op == "dtype" else arr.dtype
    record[key] = Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=bytes(raw))
    bad = Message(content=RecordDict({"arrays": record, "metrics": MetricRecord(
        {"num-examples": 10, "server-round": 1})}), reply_to=m1)
    bad.metadata.__dict__["_src_node_id"] = 2
    good = _message(m0, p0, {"num-examples": 10, "server-round": 1})
    tracemalloc.start()
    try:
        new, _ = s.aggregate_train(1, [good, bad])  # must not raise, whatever the bytes
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stats = s.round_stats[1]
    assert stats["num_clients"] + stats["dropped"] == 2
    assert new is not None and all(np.all(np.isfinite(v)) for v in to_numpy(new).values())
    # never more than a few payloads' worth of memory, whatever the header declares
    assert peak < 50 * sum(len(a.data) for a in to_record(p0).values()) + (1 << 20)


def test_checked_numpy_checks_bytes_before_allocating():
    good = Array(np.arange(6, dtype=np.float32).reshape(2, 3))
    layout = ReplyLayout.exact({"x": ("float32", (2, 3))})
    assert np.array_equal(checked_numpy(ArrayRecord({"x": good}), layout)["x"],
                          np.arange(6, dtype=np.float32).reshape(2, 3))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": (1 << 40,)})
    huge = Array(dtype="float32", shape=(1 << 40,), stype="numpy.ndarray",
                 data=buf.getvalue() + b"\0" * 16)
    with pytest.raises(RecordError, match="header declares"):
        checked_numpy(ArrayRecord({"x": huge}), ReplyLayout({"x": (frozenset({"float32"}),
                                                                    None)}))
    with pytest.raises(RecordError, match="unexpected array keys"):
        checked_numpy(ArrayRecord({"y": good}), layout)
    with pytest.raises(RecordError, match="more than"):
        checked_numpy(ArrayRecord({"x": good}),
                      ReplyLayout({"x": (frozenset({"float32"}), None)}, max_bytes=8))


def test_zero_updates_do_not_switch_the_norm_bound_off():
    s = _strategy("dense")
    glob = _arrays(0)
    msgs = list(s.configure_train(1, to_record(glob), ConfigRecord({}), FakeGrid(NODES)))
    replies = []
    for i, m in enumerate(msgs):
        nid = m.metadata.dst_node_id
        local = {0: dict(glob),  # sends the global model back: norm 0
                 1: {k: v + 1e3 * _arrays(nid)[k] for k, v in glob.items()},
                 2: {k: v + 0.01 * _arrays(nid)[k] for k, v in glob.items()}}[i]
        replies.append(_message(m, local, {"num-examples": SIZES[PARTS[nid]],
                                           "server-round": 1}))
    s.aggregate_train(1, replies)
    stats = s.round_stats[1]
    assert stats["dropped"] == 1 and "update-norm-bound" in stats["dropped_reasons"][0]
    assert s._norm_history == [[a.norm for a in s.accepted if a.norm > 0]]


def test_a_node_without_a_known_partition_cannot_outweigh_the_known_ones():
    s = LoRAFedAvg(4, seed=0, node_to_client=PARTS, data_sizes=SIZES)
    glob = _arrays(0)
    msgs = list(s.configure_train(1, to_record(glob), ConfigRecord({}), FakeGrid(NODES + [44])))
    replies = []
    for m in msgs:
        nid = m.metadata.dst_node_id
        n = SIZES[PARTS[nid]] if nid in PARTS else 10**6
        local = {k: v + 0.01 * _arrays(nid)[k] for k, v in glob.items()}
        replies.append(_message(m, local, {"num-examples": n, "server-round": 1}))
    s.aggregate_train(1, replies)
    weights = {a.node_id: a.weight for a in s.accepted}
    assert weights[44] == max(SIZES.values())


def test_replies_from_nodes_not_messaged_or_twice_are_dropped():
    s = _strategy("dense")
    glob = _arrays(0)
    msgs = list(s.configure_train(1, to_record(glob), ConfigRecord({}), FakeGrid(NODES)))
    m = msgs[0]
    arrays, metrics = _honest("dense", s, m, glob, 1)
    stranger = _message(m, arrays, metrics)
    stranger.metadata.__dict__["_src_node_id"] = 999
    s.aggregate_train(1, [_message(m, arrays, metrics), _message(m, arrays, metrics), stranger])
    reasons = s.round_stats[1]["dropped_reasons"]
    assert s.round_stats[1]["num_clients"] == 1 and len(reasons) == 2
    assert any("a second reply" in r for r in reasons) and any("node 999" in r for r in reasons)


def test_a_tied_partition_count_is_not_trusted_and_absurd_counts_give_no_sizes():
    from fedsoft.task import workload

    answers = {1: {"partition-id": 0, "num-partitions": 1_000_000},
               2: {"partition-id": 0, "num-partitions": 2}}
    found = discover(_QueryGrid(list(answers), answers), list(answers))
    assert found.num_partitions is None
    cfg = dict(DEFAULTS, **{"max-train-examples": 50})
    assert workload.server_partition_sizes(cfg, 1_000_000) == {}
    assert sum(workload.server_partition_sizes(cfg, 2).values()) == 50


def test_a_checkpointed_norm_history_must_be_finite():
    s = _strategy("dense")
    state = s.state_dict()
    for bad in ([[float("nan")]], [[-1.0]]):
        with pytest.raises(ValueError, match="norm_history"):
            s.load_state_dict({**state, "norm_history": bad})
