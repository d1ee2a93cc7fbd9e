"""Strategies without an engine: per-node messages, sparse decode, bad replies, TSFA queue."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsoft.aggregate import weighted_average
from fedsoft.compression.error_feedback import ErrorFeedback
from fedsoft.compression.update import SparseSettings, decode_update, encode_update
from fedsoft.config import DEFAULTS
from fedsoft.wireless.plan import plan
from strategies import TSFA, LoRAFedAvg, SparseLoRAFedAvg
from strategies.records import to_numpy, to_record


@pytest.fixture(autouse=True)
def _task_identity():
    """Message(...) needs a task identity; Flower sets it inside real runs only."""
    from flwr.supercore.task_identity import TaskIdentity  # internal API (1.42)

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class FakeGrid(Grid):
    """Minimal Grid: fixed node ids, no transport."""

    def __init__(self, ids):
        self._ids = ids

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, *a, **k):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self._ids)

    def push_messages(self, messages):
        return []

    def pull_messages(self, message_ids):
        return []

    def send_and_receive(self, messages, *, timeout=None):
        return []


def _arrays(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(2):
        out[f"l{i}.lora_A"] = (scale * rng.standard_normal((4, 16))).astype(np.float32)
        out[f"l{i}.lora_B"] = (scale * rng.standard_normal((16, 4))).astype(np.float32)
    out["head.w"] = rng.standard_normal((3, 16)).astype(np.float32)
    return out


def _reply(to: Message, arrays: dict, n: int, src: int, **metrics) -> Message:
    rnd = int(to.content["config"]["server-round"])
    content = RecordDict({"arrays": to_record(arrays),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0,
                                                   "server-round": rnd, **metrics})})
    msg = Message(content=content, reply_to=to)
    msg.metadata.__dict__["_src_node_id"] = src  # replies carry the sender's node id
    return msg


def test_sampling_is_seeded_and_capped():
    grid = FakeGrid([11, 22, 33, 44, 55])
    picks = [LoRAFedAvg(3, seed=7).sample_nodes(grid)[0] for _ in range(2)]
    assert picks[0] == picks[1] and len(picks[0]) == 3
    assert len(LoRAFedAvg(10, seed=7).sample_nodes(grid)[0]) == 5  # K capped at N


def test_bad_reply_is_dropped_and_model_equals_aggregation_without_it():
    glob = _arrays(0)
    s = SparseLoRAFedAvg(3, SparseSettings("soft", 0.5), seed=0)
    msgs = list(s.configure_train(1, to_record(glob), ConfigRecord(dict(DEFAULTS)),
                                  FakeGrid([1, 2, 3])))
    assert all(m.content["config"]["sparsity-ratio"] == 0.5 for m in msgs)
    replies, good = [], []
    for i, m in enumerate(msgs):
        nid = m.metadata.dst_node_id
        payload, _ = encode_update(glob, _arrays(10 + i, 0.1), s.settings, ErrorFeedback(),
                                   server_round=1, node_id=nid)
        if i == 1:  # hostile: NaN value
            payload = dict(payload, vals=np.full_like(payload["vals"], np.nan))
        else:
            good.append(decode_update(payload, glob, s.settings, server_round=1, node_id=nid))
        replies.append(_reply(m, payload, 100, nid))
    new, _ = s.aggregate_train(1, replies)
    expected = weighted_average(good, [100, 100])
    got = to_numpy(new)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    stats = s.round_stats[1]
    assert stats["num_clients"] == 2 and stats["dropped"] == 1
    assert stats["uplink_bytes"] < stats["dense_uplink_bytes"]
    assert 0 <= stats["orth_offdiag"] <= 1 and stats["cov_fro"] > 0


def test_no_valid_reply_leaves_global_unchanged():
    s = LoRAFedAvg(2, seed=0)
    glob = _arrays(0)
    msgs = list(s.configure_train(1, to_record(glob), ConfigRecord({}), FakeGrid([1, 2])))
    bad = dict(glob, **{"l0.lora_A": np.zeros((2, 2), np.float32)})
    arrays, metrics = s.aggregate_train(1, [_reply(msgs[0], bad, 10, 1)])
    assert arrays is None and s.round_stats[1]["dropped"] == 1


def _tsfa(strategy="tsfa", **over):
    cfg = dict(DEFAULTS, strategy=strategy, sparsifier="soft")
    cfg.update({"tsfa-deadline": "off", **over})
    cfg["clients-per-round"] = 3
    cfg["payload-model"] = "values"  # fake 2-layer arrays: the values-only payload of eq. (6)
    return plan(cfg, num_clients=5, d_plus_k_total=2 * 32), cfg


def _tsfa_round(strategy, rnd, glob, cfg, grid):
    """One TSFA round against fake clients that send SOFT updates at the ratio they were told."""
    msgs = list(strategy.configure_train(rnd, to_record(glob), ConfigRecord(dict(cfg)), grid))
    rho = msgs[0].content["config"]["sparsity-ratio"]
    replies = []
    for m in msgs:
        nid = m.metadata.dst_node_id
        payload, _ = encode_update(glob, _arrays(nid, 0.1), SparseSettings("soft", rho),
                                   ErrorFeedback(), server_round=rnd, node_id=nid)
        replies.append(_reply(m, payload, 50, nid))
    strategy.aggregate_train(rnd, replies)
    return msgs, strategy.round_stats[rnd]


def test_tsfa_sends_each_node_its_share_and_updates_the_queue():
    p, cfg = _tsfa(**{"latency-budget": 1e-4, "lyapunov-v": 1e-9})
    glob = _arrays(0)
    s = TSFA(3, SparseSettings("soft", 0.0), controller=p.controller, channel=p.channel, seed=0)
    queue_before = p.controller.backlog
    for rnd in (1, 2):
        msgs, st = _tsfa_round(s, rnd, glob, cfg, FakeGrid([5, 6, 7, 8, 9]))
        cfgs = [m.content["config"] for m in msgs]
        shares = [c["bandwidth-share"] for c in cfgs]
        assert abs(sum(shares) - 1) < 1e-12
        assert len({c["sparsity-ratio"] for c in cfgs}) == 1  # common ratio (A.9)
        rho = cfgs[0]["sparsity-ratio"]
        assert st["sparsity"] == rho and st["rank"] == p.rank
        assert st["latency_s"] > 0 and len(st["bandwidth_shares"]) == 3
        # eq. (30): Q(t+1) = max(Q + T - T_bar, 0)
        assert st["queue"] == pytest.approx(max(queue_before + st["latency_s"] - 1e-4, 0.0))
        queue_before = st["queue"]
    # an impossible budget builds a backlog, which raises the ratio in the next round
    assert s.round_stats[2]["sparsity"] > s.round_stats[1]["sparsity"]


def test_tsfa_outage_rule_messages_only_the_nodes_that_can_meet_the_deadline():
    """PROPOSED outage rule (tsfa-deadline = budget-multiple, F = 1): nodes in outage get no
    message and share 0, the others split the whole band, the round lasts at most the
    deadline (perfect CSI: nobody late) and ``outage`` counts the left-out nodes."""
    p, cfg = _tsfa(**{"latency-budget": 1e-2, "lyapunov-v": 1e-9,
                      "tsfa-deadline": "budget-multiple", "tsfa-deadline-factor": 1.0})
    assert p.controller.deadline_factor == 1.0
    glob = _arrays(0)
    s = TSFA(3, SparseSettings("soft", 0.0), controller=p.controller, channel=p.channel, seed=0)
    outages = []
    for rnd in (1, 2, 3):
        msgs, st = _tsfa_round(s, rnd, glob, cfg, FakeGrid([5, 6, 7, 8, 9]))
        sent = [m.metadata.dst_node_id for m in msgs]
        shares = dict(zip(st["sampled"], st["bandwidth_shares"], strict=True))
        assert len(sent) == 3 - st["outage"] and st["num_clients"] == len(sent)
        assert sorted(n for n, b in shares.items() if b > 0) == sorted(sent)
        assert sum(m.content["config"]["bandwidth-share"] for m in msgs) == pytest.approx(1.0)
        assert st["late"] == 0 and st["dropped"] == 0
        assert st["latency_s"] <= st["latency_deadline_s"] == pytest.approx(1e-2)
        outages.append(st["outage"])
    assert sum(outages) > 0 and p.controller.outage_total == sum(outages)


def test_tsfa_outage_off_messages_every_sampled_node():
    p, cfg = _tsfa(**{"latency-budget": 1e-2, "lyapunov-v": 1e-9})
    s = TSFA(3, SparseSettings("soft", 0.0), controller=p.controller, channel=p.channel, seed=0)
    msgs, st = _tsfa_round(s, 1, _arrays(0), cfg, FakeGrid([5, 6, 7, 8, 9]))
    assert len(msgs) == 3 and "outage" not in st and p.controller.deadline_factor is None


def test_message_type_is_train():
    s = LoRAFedAvg(1, seed=0)
    msgs = list(s.configure_train(4, ArrayRecord(), ConfigRecord({"lr": 0.1}), FakeGrid([3])))
    assert msgs[0].metadata.message_type == MessageType.TRAIN
    assert msgs[0].content["config"]["server-round"] == 4


def test_min_replies_threshold_keeps_the_model():
    s = LoRAFedAvg(3, seed=0, min_replies=3)
    glob = _arrays(0)
    msgs = list(s.configure_train(1, to_record(glob), ConfigRecord({}), FakeGrid([1, 2, 3])))
    replies = [_reply(m, _arrays(5 + i), 10, m.metadata.dst_node_id)
               for i, m in enumerate(msgs[:2])]  # the third client crashed
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is None and s.round_stats[1]["skipped"] == 1
    assert s.round_stats[1]["num_clients"] == 2


def test_state_dict_restores_sampling_and_the_tsfa_queue():
    p, cfg = _tsfa(**{"latency-budget": 1e-4, "lyapunov-v": 1e-9})
    glob = _arrays(0)
    grid = FakeGrid([5, 6, 7, 8, 9])
    s = TSFA(3, SparseSettings("soft", 0.0), controller=p.controller, channel=p.channel, seed=3)

    def run_round(strategy, rnd):
        msgs, stats = _tsfa_round(strategy, rnd, glob, cfg, grid)
        return [m.metadata.dst_node_id for m in msgs], stats

    run_round(s, 1)
    import json
    state = json.loads(json.dumps(s.state_dict()))  # what a checkpoint stores
    nodes_a, stats_a = run_round(s, 2)
    p2, _ = _tsfa(**{"latency-budget": 1e-4, "lyapunov-v": 1e-9})
    fresh = TSFA(3, SparseSettings("soft", 0.0), controller=p2.controller, channel=p2.channel,
                 seed=99)
    fresh.load_state_dict(state)
    nodes_b, stats_b = run_round(fresh, 2)
    assert nodes_a == nodes_b
    for key in ("sparsity", "queue", "latency_s", "bandwidth_shares"):
        assert stats_a[key] == pytest.approx(stats_b[key])


def test_start_resumes_with_the_original_round_numbers():
    s = LoRAFedAvg(1, seed=0)
    seen = []
    s.configure_train = lambda r, *a, **k: seen.append(r) or []  # type: ignore[method-assign]
    s.start(grid=FakeGrid([1]), initial_arrays=to_record(_arrays(0)), num_rounds=5,
            first_round=4, evaluate_fn=lambda r, a: seen.append(("eval", r)))
    assert seen == [4, ("eval", 4), 5, ("eval", 5)]
    assert "configure_train" in s.__dict__  # the instance override set by this test survives


def test_every_strategy_name_of_the_config_has_a_class_in_the_registry():
    from fedsoft.config import STRATEGIES as NAMES
    from strategies.factory import STRATEGIES, strategy_class

    assert set(NAMES) == set(STRATEGIES)
    from fedsoft.config import resolve

    assert strategy_class(resolve({"sparsifier": "soft", "sparsity": 0.5})).__name__ == \
        "SparseLoRAFedAvg"
    assert strategy_class(resolve({"strategy": "osfa"})).__name__ == "TSFA"


def test_round_records_never_raise_whatever_a_statistic_holds():
    s = LoRAFedAvg(2)
    s.round_stats[1] = {"x": None, "n": np.int64(3), "mixed": [1, 2.5], "d": {"a": 1},
                        "reasons": ["a"], "empty": [], "nested": [[1]], "sampled": [7]}
    numbers, text = s.round_records(1)
    assert dict(numbers) == {"num_clients": 0, "uplink_bytes": 0, "downlink_bytes": 0, "n": 3,
                             "mixed": [1.0, 2.5], "empty": []}
    assert dict(text) == {"x": "null", "d": '{"a": 1}', "reasons": ["a"], "nested": "[[1]]"}
    assert 1 not in s.round_stats  # handed out once


def test_override_that_only_prints_differently_is_sent_so_digests_agree():
    from fedsoft.config import resolve
    from strategies.messages import RoundPlan, TrainInstruction, train_config

    base = resolve({})
    cfg = base.with_values({"zeta": -0.0})
    record = train_config(cfg, base)
    assert "zeta" in record
    record.update(RoundPlan(1, 0).to_values())
    assert TrainInstruction.from_record(record).config(base) == cfg


def _downlink_round(s, rnd, glob, grid, clients, reply_to=None):
    """One round of ``s`` with a compressed downlink: the clients apply what they were sent
    (client_app's own function) and reply with their change; ``reply_to`` picks who replies."""
    from client_app import _broadcast_model
    from fedsoft.config import resolve
    from strategies.messages import TrainInstruction, train_config

    msgs = list(s.configure_train(rnd, to_record(glob), train_config(resolve({})), grid))
    replies = []
    for m in msgs:
        nid = m.metadata.dst_node_id
        plan = TrainInstruction.from_record(m.content["config"]).plan
        try:
            model = _broadcast_model(to_numpy(m.content["arrays"]), plan.downlink_base, rnd,
                                     clients[nid], keep=True)
        except RuntimeError:
            continue  # the node's error reply
        if reply_to is None or nid in reply_to:
            local = {k: v + 0.01 for k, v in model.items()}
            payload, _ = encode_update(model, local, s.settings, ErrorFeedback(),
                                       server_round=rnd, node_id=s.client_key(nid))
            replies.append(_reply(m, payload, 100, nid))
    return replies


def test_downlink_node_without_a_reply_gets_the_full_model_and_never_desyncs():
    """A node that applied a broadcast but whose reply never arrived (lost, late, filtered)
    is sent the full model next: no round fails because server and node disagree on its
    reference."""
    from flwr.app import Context

    from fedsoft.compression.downlink import Broadcast

    glob = _arrays(0, 0.1)
    s = SparseLoRAFedAvg(2, SparseSettings("soft", 0.5), seed=0,
                         downlink=Broadcast(0.8, "float32", history=4))
    grid = FakeGrid([1, 2])
    clients = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                          run_config={}) for n in (1, 2)}
    for rnd in range(1, 7):
        lost = {2} if rnd == 2 else set()
        replies = _downlink_round(s, rnd, glob, grid, clients, reply_to={1, 2} - lost)
        assert len(replies) == 2 - len(lost), rnd  # every node could apply what it got
        new, _ = s.aggregate_train(rnd, replies)
        full = s.round_stats[rnd]["downlink_full"]
        assert full == {1: 2, 3: 1}.get(rnd, 0), (rnd, full)
        glob = to_numpy(new)


def test_dense_head_gets_the_broadcast_residual_back():
    """With a compressed downlink and a whole (float) head, a client that learned nothing
    sends back the broadcast head; the server must land on its own head, not the broadcast's."""
    from fedsoft.compression.downlink import Broadcast

    glob0, glob = _arrays(0, 0.1), _arrays(1, 0.1)
    s = SparseLoRAFedAvg(1, SparseSettings("soft", 0.5), seed=0,
                         downlink=Broadcast(0.9, "float32", history=2))
    grid = FakeGrid([1])
    s.configure_train(1, to_record(glob0), ConfigRecord({}), grid)
    msgs = list(s.configure_train(2, to_record(glob), ConfigRecord({}), grid))
    ref = s.downlink.reference
    assert not np.allclose(ref["head.w"], glob["head.w"])  # 90% of the head change held back
    payload, _ = encode_update(ref, ref, s.settings, ErrorFeedback(), server_round=2,
                               node_id=s.client_key(1))
    new, _ = s.aggregate_train(2, [_reply(msgs[0], payload, 100, 1)])
    got = to_numpy(new)
    for k in glob:
        np.testing.assert_allclose(got[k], glob[k], atol=1e-6)
