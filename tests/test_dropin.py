"""The drop-in: peft key mapping, soft_mod + SoftDecode around Flower's own strategies."""

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
)

from fedsoft.compression.error_feedback import ErrorFeedback
from fedsoft.compression.sparsifiers import to_rows
from fedsoft.compression.update import SparseSettings, decode_update, encode_update
from fedsoft.dropin import KeyMap, KeyMapError, SoftDecode, soft_mod
from fedsoft.dropin.mod import EF_STATE_KEY, FORMAT, MARKER
from fedsoft.layout import layer_specs
from tests.test_strategies import FakeGrid, _task_identity  # noqa: F401 - autouse fixture

NODES = [7, 8, 9]
SIZES = {7: 30, 8: 50, 9: 20}
PREFIX = "base_model.model.model.layers"


def peft_arrays(seed: int = 0, scale: float = 1.0, layers: int = 2) -> dict[str, np.ndarray]:
    """A peft-style LoRA state dict (q/v LoRA, r = 4) plus two non-LoRA keys (head)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(layers):
        for proj in ("q_proj", "v_proj"):
            base = f"{PREFIX}.{i}.self_attn.{proj}"
            out[f"{base}.lora_A.weight"] = (scale * rng.standard_normal((4, 16))).astype(
                np.float32)
            out[f"{base}.lora_B.weight"] = (scale * rng.standard_normal((24, 4))).astype(
                np.float32)
    out["base_model.model.score.modules_to_save.weight"] = rng.standard_normal(
        (3, 16)).astype(np.float32)
    out["base_model.model.score.modules_to_save.bias"] = rng.standard_normal(3).astype(
        np.float32)
    return out


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in rec.items()}


def local_arrays(glob: dict[str, np.ndarray], nid: int, rnd: int = 1) -> dict[str, np.ndarray]:
    """A client's trained arrays: the global ones plus a node- and round-specific change."""
    change = peft_arrays(1000 * rnd + nid, 0.1)
    return {k: (v + change[k]).astype(v.dtype) for k, v in glob.items()}


def train_app(locals_: dict[int, dict[str, np.ndarray]]):
    """The user's @app.train() function: replies with this node's local arrays."""

    def train(msg: Message, context: Context) -> Message:
        nid = msg.metadata.dst_node_id
        content = RecordDict({"arrays": record(locals_[nid]),
                              "metrics": MetricRecord({"num-examples": SIZES[nid],
                                                       "train-loss": 0.01 * nid})})
        return Message(content=content, reply_to=msg)

    return train


def contexts() -> dict[int, Context]:
    return {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in NODES}


def run_clients(messages, app, ctxs, mods):
    """What a ClientApp with ``mods`` (outermost first) replies to each instruction."""
    replies = []
    for msg in messages:
        call = app
        for mod in reversed(mods):
            call = (lambda m, inner: lambda msg, ctx: m(msg, ctx, inner))(mod, call)
        replies.append(call(msg, ctxs[msg.metadata.dst_node_id]))
    return replies


def ordered(messages, like):
    """``messages`` (instructions) in the node order of the replies ``like``."""
    by_node = {m.metadata.dst_node_id: m for m in messages}
    return [by_node[r.metadata.src_node_id] for r in like]


def dense_replies(messages, arrays_by_node, order=None):
    """Plain replies carrying full weights, as a client without the mod would send (in the
    node order of ``order``'s replies: float sums depend on the order, sampling is random)."""
    if order is not None:
        messages = ordered(messages, order)
    out = []
    for msg in messages:
        nid = msg.metadata.dst_node_id
        content = RecordDict({"arrays": record(arrays_by_node[nid]),
                              "metrics": MetricRecord({"num-examples": SIZES[nid],
                                                       "train-loss": 0.01 * nid})})
        out.append(Message(content=content, reply_to=msg))
    return out


INNER = {
    "fedavg": lambda: FedAvg(fraction_evaluate=0.0),
    "fedprox": lambda: FedProx(fraction_evaluate=0.0, proximal_mu=0.1),
    "fedadam": lambda: FedAdam(fraction_evaluate=0.0, eta=0.05),
    "dp-server": lambda: DifferentialPrivacyServerSideFixedClipping(
        FedAvg(fraction_evaluate=0.0), noise_multiplier=0.0, clipping_norm=0.5,
        num_sampled_clients=3),
}


# ---- key mapping ------------------------------------------------------------------------------

def test_keymap_round_trip_keeps_keys_order_shapes_and_dtypes():
    glob = peft_arrays()
    glob["base_model.model.model.embed_tokens.lora_embedding_A"] = np.ones((4, 50), np.float32)
    glob["base_model.model.model.embed_tokens.lora_embedding_B"] = np.ones((16, 4), np.float32)
    glob["base_model.model.conv.lora_A.weight"] = np.ones((4, 3, 2, 2), np.float16)
    glob["base_model.model.conv.lora_B.weight"] = np.ones((8, 4, 1, 1), np.float16)
    glob["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = np.ones(
        24, np.float32)  # DoRA: a head tensor
    km = KeyMap.from_arrays(glob)
    fs = km.to_fedsoft(glob)
    assert km.peft_keys == list(glob)
    assert f"{PREFIX}.0.self_attn.q_proj.lora_A" in fs
    assert fs["head.base_model.model.score.modules_to_save.bias"].shape == (3,)
    specs = {s.name: (s.r, s.d, s.k) for s in layer_specs(fs)}
    assert specs[f"{PREFIX}.1.self_attn.v_proj"] == (4, 24, 16)
    assert specs["base_model.model.model.embed_tokens.embedding"] == (4, 16, 50)
    assert specs["base_model.model.conv"] == (4, 8, 12)
    back = km.to_peft(fs)
    assert list(back) == list(glob)
    for k, v in glob.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert np.array_equal(back[k], v)


@pytest.mark.parametrize("case", ["no-B", "no-A", "rank", "B-shape", "int", "vector-A", "head",
                                  "collision"])
def test_keymap_refuses_unmappable_arrays_naming_the_key(case):
    glob = peft_arrays(layers=1)
    a = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    b = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"
    bad = a
    if case == "no-B":
        del glob[b]
    elif case == "no-A":
        del glob[a]
        bad = b
    elif case == "rank":
        glob[b] = np.ones((24, 3), np.float32)
    elif case == "B-shape":
        glob[b] = np.ones((24, 4, 2), np.float32)
    elif case == "int":
        bad = "base_model.model.steps"
        glob[bad] = np.ones(3, np.int64)
    elif case == "vector-A":
        glob[a] = np.ones(4, np.float32)
    elif case == "head":
        bad = "head.lora_A.weight"
        glob[bad] = np.ones((4, 16), np.float32)
        glob["head.lora_B.weight"] = np.ones((16, 4), np.float32)
    elif case == "collision":
        bad = "x.embedding.lora_A.weight"
        glob[bad] = np.ones((4, 16), np.float32)
        glob["x.embedding.lora_B.weight"] = np.ones((16, 4), np.float32)
        glob["x.lora_embedding_A"] = np.ones((4, 16), np.float32)
        glob["x.lora_embedding_B"] = np.ones((16, 4), np.float32)
    with pytest.raises(KeyMapError) as err:
        KeyMap.from_arrays(glob)
    assert repr(bad) in str(err.value) or bad in str(err.value)


def test_keymap_rejects_arrays_that_do_not_match_it():
    glob = peft_arrays(layers=1)
    km = KeyMap.from_arrays(glob)
    other = dict(glob)
    key = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    other[key] = np.ones((4, 17), np.float32)
    with pytest.raises(KeyMapError, match="shape"):
        km.to_fedsoft(other)
    with pytest.raises(KeyMapError, match="missing"):
        km.to_fedsoft({k: v for k, v in glob.items() if k != key})


# ---- mod + wrapper around Flower's strategies ------------------------------------------------

def one_round(inner, sparsity, glob, rnd=1, mods_extra=(), ctxs=None, locals_=None):
    soft = SoftDecode(inner, sparsity=sparsity)
    grid = FakeGrid(NODES)
    msgs = list(soft.configure_train(rnd, record(glob), ConfigRecord({}), grid))
    locals_ = locals_ or {n: local_arrays(glob, n, rnd) for n in NODES}
    ctxs = ctxs or contexts()
    replies = run_clients(msgs, train_app(locals_), ctxs, [soft_mod(), *mods_extra])
    return soft, msgs, replies, locals_, ctxs


@pytest.mark.parametrize("name", list(INNER))
def test_aggregate_equals_inner_strategy_on_decoded_full_weights(name):
    glob = peft_arrays()
    soft, msgs, replies, _, _ = one_round(INNER[name](), 0.9, glob)
    assert all(len(m.content.config_records) == 1 for m in msgs)
    cfg = msgs[0].content["config"]
    assert cfg["fedsoft.sparsity"] == 0.9 and cfg["fedsoft.round"] == 1
    if name == "fedprox":
        assert cfg["proximal-mu"] == 0.1
    # the replies are encoded, the metrics untouched
    for r in replies:
        assert MARKER in r.content.config_records
        assert dict(r.content["metrics"]) == {"num-examples": SIZES[r.metadata.src_node_id],
                                              "train-loss": 0.01 * r.metadata.src_node_id}
    # reference: the inner strategy alone, on each payload decoded by decode_update
    settings = soft.settings
    km = KeyMap.from_arrays(glob)
    full = {}
    for r in replies:
        nid = r.metadata.src_node_id
        dec = decode_update(numpy(r.content["arrays"]), km.to_fedsoft(glob), settings,
                            server_round=1, node_id=nid)
        full[nid] = km.to_peft(dec)
    ref = INNER[name]()
    ref_msgs = list(ref.configure_train(1, record(glob), ConfigRecord({}), FakeGrid(NODES)))
    ref_arrays, ref_metrics = ref.aggregate_train(1, dense_replies(ref_msgs, full, replies))

    wire = sum(r.content["arrays"].count_bytes() for r in replies)
    arrays, metrics = soft.aggregate_train(1, replies)
    got, want = numpy(arrays), numpy(ref_arrays)
    assert list(got) == list(glob)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert metrics["train-loss"] == ref_metrics["train-loss"]
    assert metrics["uplink_bytes"] == wire
    assert metrics["dense_uplink_bytes"] == 3 * record(glob).count_bytes()
    assert metrics["uplink_bytes"] < 0.5 * metrics["dense_uplink_bytes"]
    assert soft.history[-1]["soft_decoded"] == 3 and soft.history[-1]["soft_dropped"] == 0


@pytest.mark.parametrize("name", list(INNER))
def test_at_sparsity_zero_the_aggregate_is_the_inner_strategys_on_dense_replies(name):
    glob = peft_arrays()
    soft, _, replies, locals_, _ = one_round(INNER[name](), 0.0, glob)
    arrays, _ = soft.aggregate_train(1, replies)
    ref = INNER[name]()
    ref_msgs = list(ref.configure_train(1, record(glob), ConfigRecord({}), FakeGrid(NODES)))
    ref_arrays, _ = ref.aggregate_train(1, dense_replies(ref_msgs, locals_, replies))
    got, want = numpy(arrays), numpy(ref_arrays)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2e-6)


def test_error_feedback_persists_in_context_state_and_telescopes():
    """sum_t sent_t + e_T = sum_t x_t per layer (eqs. 10-14), across two rounds of a run."""
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    soft = SoftDecode(inner, sparsity=0.8)
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    glob = peft_arrays()
    km = KeyMap.from_arrays(glob)
    true_sum, sent_sum = {}, {}
    for rnd in (1, 2):
        msgs = list(soft.configure_train(rnd, record(glob), ConfigRecord({}), FakeGrid([7])))
        loc = {7: local_arrays(glob, 7, rnd)}
        [reply] = run_clients(msgs, train_app(loc), {7: ctx}, [soft_mod()])
        assert EF_STATE_KEY in ctx.state.array_records
        gf, lf = km.to_fedsoft(glob), km.to_fedsoft(loc[7])
        new, _ = soft.aggregate_train(rnd, [reply])
        nf = km.to_fedsoft(numpy(new))  # one client: the aggregate is its full weights
        for s in layer_specs(gf):
            def rows(d, s=s):
                return to_rows(torch.from_numpy(d[s.name + ".lora_A"]).double(),
                               torch.from_numpy(d[s.name + ".lora_B"]).double())
            true_sum[s.name] = true_sum.get(s.name, 0) + rows(lf) - rows(gf)
            sent_sum[s.name] = sent_sum.get(s.name, 0) + rows(nf) - rows(gf)
        glob = numpy(new)
    memory = {k: a.numpy() for k, a in ctx.state[EF_STATE_KEY].items()}
    assert set(true_sum) <= set(memory)
    for name, total in true_sum.items():
        e = torch.from_numpy(memory[name]).double()
        assert float(e.abs().sum()) > 0  # memory is in use
        torch.testing.assert_close(sent_sum[name] + e, total, rtol=0, atol=1e-5)


def _mutate(reply, how, glob):
    arrays = numpy(reply.content["arrays"])
    if how == "truncated":
        arrays["vals"] = arrays["vals"][:-3]
    elif how == "oversized":
        arrays["vals"] = np.zeros(10 * sum(v.size for v in glob.values()), np.float32)
    elif how == "wrong-dtype":
        arrays["vals"] = arrays["vals"].astype(np.float64)
    elif how == "nan":
        arrays["vals"] = np.full_like(arrays["vals"], np.nan)
    elif how == "budget":  # a payload at sparsity 0.5 under a marker that claims 0.9
        km = KeyMap.from_arrays(glob)
        arrays, _ = encode_update(km.to_fedsoft(glob),
                                  km.to_fedsoft(local_arrays(glob, 8)),
                                  SparseSettings("soft", 0.5), ErrorFeedback(),
                                  server_round=1, node_id=8)
    elif how == "npy-bytes":
        reply.content["arrays"] = ArrayRecord({k: Array(dtype="float32", shape=tuple(v.shape),
                                                        stype="numpy.ndarray",
                                                        data=b"\x93NUMPY garbage")
                                               for k, v in arrays.items()})
        return
    elif how == "stale-round":
        reply.content[MARKER]["round"] = 0
        return
    elif how == "settings":
        reply.content[MARKER]["sparsity"] = 0.5
        return
    reply.content["arrays"] = record(arrays)


REASONS = {"truncated": "vals", "oversized": "more than", "wrong-dtype": "float64",
           "nan": "vals", "budget": "budget", "npy-bytes": "npy format",
           "stale-round": "round 0", "settings": "sparsity = 0.5"}


@pytest.mark.parametrize("how", ["truncated", "oversized", "wrong-dtype", "nan", "budget",
                                 "npy-bytes", "stale-round", "settings"])
def test_hostile_payload_is_dropped_and_the_others_aggregate(how, caplog):
    """Reasons as the codec / record checks word them; the round goes on with the others."""
    glob = peft_arrays()
    inner = FedAvg(fraction_evaluate=0.0)
    soft, _, replies, locals_, _ = one_round(inner, 0.9, glob)
    honest = [r for r in replies if r.metadata.src_node_id != 8]
    assert len(honest) == 2
    ref_soft, ref_msgs, _, _, _ = one_round(FedAvg(fraction_evaluate=0.0), 0.9, glob)
    ref_arrays, _ = ref_soft.aggregate_train(
        1, run_clients(ordered(ref_msgs, honest), train_app(locals_), contexts(), [soft_mod()]))
    _mutate(next(r for r in replies if r.metadata.src_node_id == 8), how, glob)
    arrays, metrics = soft.aggregate_train(1, replies)
    got, want = numpy(arrays), numpy(ref_arrays)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert metrics["soft_dropped"] == 1 and metrics["soft_decoded"] == 2
    [reason] = soft.history[-1]["dropped"]
    assert reason.startswith("node 8:") and REASONS[how] in reason
    assert "dropped the reply of node 8" in caplog.text


def test_plain_replies_are_rejected_by_default_and_accepted_on_request():
    glob = peft_arrays()
    for policy, decoded in (("reject", 0), ("accept", 3)):
        soft = SoftDecode(FedAvg(fraction_evaluate=0.0), sparsity=0.9, plain_replies=policy)
        msgs = list(soft.configure_train(1, record(glob), ConfigRecord({}), FakeGrid(NODES)))
        locals_ = {n: local_arrays(glob, n) for n in NODES}
        replies = run_clients(msgs, train_app(locals_), contexts(), [])  # no mod
        arrays, metrics = soft.aggregate_train(1, replies)
        assert (arrays is None) == (policy == "reject")
        assert metrics["soft_dropped"] == 3 - decoded
        assert metrics["uplink_bytes"] == metrics["dense_uplink_bytes"]


def test_non_train_messages_and_servers_without_the_wrapper_pass_through():
    glob = peft_arrays()
    mod = soft_mod()
    ctx = contexts()[7]
    content = RecordDict({"arrays": record(glob), "config": ConfigRecord({"server-round": 1})})
    for kind in (MessageType.EVALUATE, MessageType.QUERY, MessageType.TRAIN):
        msg = Message(content=content, dst_node_id=7, message_type=kind)
        answer = Message(content=RecordDict({"arrays": record(local_arrays(glob, 7)),
                                             "metrics": MetricRecord({"num-examples": 1})}),
                         reply_to=msg)
        out = mod(msg, ctx, lambda m, c, a=answer: a)
        assert out is answer and MARKER not in out.content.config_records
        assert list(out.content["arrays"].keys()) == list(glob)  # TRAIN: no fedsoft.* keys
    assert EF_STATE_KEY not in ctx.state.array_records
    assert list(content.keys()) == ["arrays", "config"]


def test_the_mod_refuses_an_unmappable_model_naming_the_key():
    glob = peft_arrays(layers=1)
    del glob[f"{PREFIX}.0.self_attn.v_proj.lora_B.weight"]
    msg = Message(content=RecordDict({"arrays": record(glob),
                                      "config": ConfigRecord({"fedsoft.format": FORMAT})}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    with pytest.raises(KeyMapError, match="v_proj.lora_A.weight"):
        soft_mod()(msg, contexts()[7], lambda m, c: None)


def test_fixedclipping_mod_inside_the_soft_mod():
    """mods=[soft_mod(), fixedclipping_mod]: the clipped update is what gets encoded."""
    glob = peft_arrays()

    def inner():
        return DifferentialPrivacyClientSideFixedClipping(
            FedAvg(fraction_evaluate=0.0), noise_multiplier=0.0, clipping_norm=0.5,
            num_sampled_clients=3)

    soft, msgs, replies, locals_, _ = one_round(inner(), 0.0, glob,
                                                mods_extra=[fixedclipping_mod])
    assert all(len(m.content.config_records) == 1 for m in msgs)
    assert msgs[0].content["config"]["clipping_norm"] == 0.5
    arrays, _ = soft.aggregate_train(1, replies)
    # reference: the same DP wrapper and clipping mod, no fedsoft
    ref = inner()
    ref_msgs = list(ref.configure_train(1, record(glob), ConfigRecord({}), FakeGrid(NODES)))
    ref_replies = run_clients(ordered(ref_msgs, replies), train_app(locals_), contexts(),
                              [fixedclipping_mod])
    ref_arrays, _ = ref.aggregate_train(1, ref_replies)
    got, want = numpy(arrays), numpy(ref_arrays)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2e-6)
    upd = np.sqrt(sum(float(((got[k] - glob[k]) ** 2).sum()) for k in glob))
    assert upd <= 0.5 + 1e-5


def test_without_error_feedback_nothing_is_stored_and_the_update_only_shrinks():
    """soft_mod(error_feedback=False) sends S(x): a subset of the (clipped) update's entries."""
    glob = peft_arrays()
    soft = SoftDecode(FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1),
                      sparsity=0.9)
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    msgs = list(soft.configure_train(1, record(glob), ConfigRecord({}), FakeGrid([7])))
    loc = local_arrays(glob, 7)
    [reply] = run_clients(msgs, train_app({7: loc}), {7: ctx}, [soft_mod(error_feedback=False)])
    assert EF_STATE_KEY not in ctx.state.array_records
    new, _ = soft.aggregate_train(1, [reply])
    got = numpy(new)
    lora = [k for k in glob if ".lora_" in k]
    sent = np.sqrt(sum(float(((got[k] - glob[k]) ** 2).sum()) for k in lora))
    true = np.sqrt(sum(float(((loc[k] - glob[k]) ** 2).sum()) for k in lora))
    assert 0 < sent < true
