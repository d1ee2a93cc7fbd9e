"""Quantised values and the sparse head with error feedback, the compressed downlink, the
fenced oracle, HetLoRA's bounded memory and the frozen-prefix cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedsoft.compression import codec, quantize
from fedsoft.compression.downlink import Broadcast, DownlinkError, apply_change, encode_change
from fedsoft.compression.error_feedback import ErrorFeedback
from fedsoft.compression.sparsifiers import SPARSIFIERS, keep_count, to_rows
from fedsoft.compression.update import (
    SparseSettings,
    decode_update,
    encode_update,
    estimate_payload_bytes,
    head_keep,
)
from fedsoft.config import ConfigError, resolve
from fedsoft.layout import head_specs, layer_specs
from tests.test_sparse_update import _arrays as _sparse_arrays

CONF = Path(__file__).resolve().parents[1] / "conf"
DTYPES = ["float32", "float16", "int8", "int4"]


def _arrays(seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    return _sparse_arrays(seed, scale)


def _rows(arrays, name):
    return to_rows(torch.from_numpy(arrays[name + ".lora_A"]),
                   torch.from_numpy(arrays[name + ".lora_B"])).numpy()


@pytest.mark.parametrize("dtype", DTYPES)
def test_telescoping_holds_for_every_wire_dtype(dtype):
    """eq. (14) summed over rounds: sum_t sent_t + e_T = sum_t x_t, whatever the value dtype
    (the rounding error is kept in the memory, not lost)."""
    glob = _arrays(0)
    settings = SparseSettings("soft", 0.7, dtype=dtype, head_sparsity=0.5, seed=3)
    ef = ErrorFeedback("sig")
    specs = layer_specs(glob)
    sent_sum = {s.name: 0.0 for s in specs}
    x_sum = {s.name: 0.0 for s in specs}
    for t in range(1, 7):
        local = {k: v + 0.01 * np.random.default_rng(t).standard_normal(v.shape).astype(
            np.float32) for k, v in glob.items()}
        payload, _ = encode_update(glob, local, settings, ef, server_round=t, node_id=1)
        rebuilt = decode_update(payload, glob, settings, server_round=t, node_id=1)
        for s in specs:
            sent_sum[s.name] = sent_sum[s.name] + _rows(rebuilt, s.name) - _rows(glob, s.name)
            x_sum[s.name] = x_sum[s.name] + _rows(local, s.name) - _rows(glob, s.name)
    for s in specs:
        total = sent_sum[s.name] + ef.memory[s.name].numpy()
        scale = np.abs(x_sum[s.name]).max()
        assert np.abs(total - x_sum[s.name]).max() <= 1e-5 * scale, dtype


def test_float16_without_the_memory_would_lose_its_rounding():
    """The rounding of a float16 upload is what the memory now carries: it is non-zero on the
    kept entries (it was exactly zero there before, i.e. lost for good)."""
    glob, local = _arrays(0), _arrays(1)
    ef = ErrorFeedback("sig")
    settings = SparseSettings("soft", 0.5, dtype="float16")
    encode_update(glob, local, settings, ef, server_round=1, node_id=0)
    u = _rows(local, "layer0") - _rows(glob, "layer0")
    e = ef.memory["layer0"].numpy()
    kept = e != u  # kept entries: memory = u - fp16(u)
    assert kept.any()
    np.testing.assert_allclose(e[kept], (u - u.astype(np.float16).astype(np.float32))[kept],
                               atol=1e-7)
    assert np.abs(e[kept]).max() > 0


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_sparse_head_keeps_its_budget_and_rebuilds_global_plus_change(dtype):
    glob, local = _arrays(0), _arrays(1)
    settings = SparseSettings("soft", 0.6, dtype=dtype, head_sparsity=0.75)
    ef = ErrorFeedback("sig")
    payload, _ = encode_update(glob, local, settings, ef, server_round=2, node_id=4)
    assert not any(k.startswith(codec.DENSE_PREFIX) for k in payload)
    rebuilt = decode_update(payload, glob, settings, server_round=2, node_id=4)
    for hs in head_specs(glob):
        key = "head." + hs.name
        change = rebuilt[key] - glob[key]
        assert np.count_nonzero(change) <= head_keep(hs, 0.75)
        mem = ef.memory["head/" + hs.name].numpy().reshape(change.shape)
        np.testing.assert_allclose(change + mem, local[key] - glob[key], atol=1e-5)
    # a client that keeps more head entries than its budget is refused
    greedy = SparseSettings("soft", 0.6, dtype=dtype, head_sparsity=0.5)
    bigger, _ = encode_update(glob, local, greedy, ErrorFeedback("sig"), server_round=2,
                              node_id=4)
    with pytest.raises(codec.CodecError, match="head"):
        decode_update(bigger, glob, settings, server_round=2, node_id=4)


@pytest.mark.parametrize(("dtype", "head_sparsity", "sparsifier"),
                         [("float32", 0.0, "soft"), ("float16", 0.0, "flasc"),
                          ("int8", 0.0, "soft"), ("int8", 0.9, "hetlora"),
                          ("int4", 0.5, "rlora"), ("float32", 0.9, "fedlodrop")])
def test_payload_estimate_matches_flower_bytes(dtype, head_sparsity, sparsifier):
    """What TSFA plans with (eq. 6's bits) against ``ArrayRecord.count_bytes`` of real
    payloads, for quantised values and sparse heads too."""
    from flwr.app import Array, ArrayRecord

    glob, local = _arrays(0), _arrays(1)
    specs, heads = layer_specs(glob), head_specs(glob)
    for rho in (0.0, 0.5, 0.9, 0.99):
        settings = SparseSettings(sparsifier, rho, dtype=dtype, head_sparsity=head_sparsity)
        payload, _ = encode_update(glob, local, settings, ErrorFeedback("sig"),
                                   server_round=1, node_id=0)
        real = ArrayRecord({k: Array(v) for k, v in payload.items()}).count_bytes()
        est = estimate_payload_bytes(
            specs, heads, rho, dtype=dtype, head_sparsity=head_sparsity,
            seeded_positions=bool(settings.make().positions_from_seed))
        assert abs(est - real) <= 0.1 * real + 40, (rho, est, real)


def test_hetlora_memory_stays_bounded():
    """HetLoRA never sends the rows above a client's rank: no memory is kept for them, so
    ||e||^2 stays bounded by one round's unsent part instead of growing every round."""
    glob = _arrays(0)
    local = {k: v + 0.05 for k, v in glob.items()}
    ef = ErrorFeedback("sig")
    settings = SparseSettings("hetlora", 0.6)
    norms = []
    for t in range(1, 12):
        _, info = encode_update(glob, local, settings, ef, server_round=t, node_id=0)
        norms.append(info["ef_sq_norm"])
    assert norms[-1] <= 1.01 * max(norms[:3])


def test_kept_energy_ratio_is_reported_for_what_was_sent():
    glob, local = _arrays(0), _arrays(1)
    _, info32 = encode_update(glob, local, SparseSettings("soft", 0.6), ErrorFeedback("s"),
                              server_round=1, node_id=0)
    _, info4 = encode_update(glob, local, SparseSettings("soft", 0.6, dtype="int4"),
                             ErrorFeedback("s"), server_round=1, node_id=0)
    assert info32["kept_energy_ratio"] > 0
    assert info4["kept_energy_ratio"] != info32["kept_energy_ratio"]  # int4 rounding shows


def test_config_fences():
    with pytest.raises(ConfigError, match="svd"):
        resolve({"preset": "ci", "sparsifier": "svd", "sparsity": 0.5}, CONF)
    with pytest.raises(ConfigError, match="wire-dtype"):
        resolve({"preset": "ci", "wire-dtype": "int8"}, CONF)
    with pytest.raises(ConfigError, match="downlink-sparsity"):
        resolve({"preset": "ci", "sparsifier": "soft", "sparsity": 0.5,
                 "sparsify-target": "factors", "downlink-sparsity": 0.5}, CONF)
    cfg = resolve({"preset": "ci", "sparsifier": "soft", "sparsity": 0.9, "wire-dtype": "int4",
                   "head-sparsity": 0.9, "downlink-sparsity": 0.9}, CONF)
    assert cfg.compression.wire_dtype == "int4" and cfg.compression.head_sparsity == 0.9
    for key, bad in (("head-sparsity", 1.0), ("downlink-sparsity", -0.1),
                     ("wire-dtype", "bfloat16"), ("downlink-history", 0)):
        with pytest.raises(ConfigError, match=key):
            resolve({"preset": "ci", "sparsifier": "soft", key: bad}, CONF)


# ----------------------------------------------------------------------------- downlink


def _moving_global(t: int) -> dict[str, np.ndarray]:
    base = _arrays(0)
    rng = np.random.default_rng(100 + t)
    return {k: v + 0.02 * t * rng.standard_normal(v.shape).astype(np.float32)
            for k, v in base.items()}


def test_broadcast_one_round_behind_is_bitwise_and_memory_telescopes():
    b = Broadcast(0.8, "int8", history=3)
    b.advance(1, _moving_global(0))
    client = {k: v.copy() for k, v in b.reference.items()}  # full model in round 1
    for t in range(2, 8):
        g = _moving_global(t)
        b.advance(t, g)
        out = b.outgoing(t - 1, full_nbytes=10**9)
        assert out.base == t - 1
        client = apply_change(client, out.arrays)
        for k in client:  # the client holds exactly the server's reference
            np.testing.assert_array_equal(client[k], b.reference[k])
        # reference + residual is the true global model (the server's error memory)
        res = b.residual(g)
        for k in g:
            np.testing.assert_allclose(b.reference[k] + res[k], g[k], atol=1e-6)
    # the residual shrinks once the global model stops moving
    g = _moving_global(7)
    before = sum(float(np.square(v).sum()) for v in b.residual(g).values())
    for t in range(8, 30):
        b.advance(t, g)
    after = sum(float(np.square(v).sum()) for v in b.residual(g).values())
    assert after < 1e-3 * before


def test_broadcast_catches_up_within_history_and_refreshes_after():
    b = Broadcast(0.9, "int4", history=3)
    for t in range(1, 5):
        b.advance(t, _moving_global(t))
    b.advance(5, _moving_global(5))
    assert sorted(b.snapshots) == [2, 3, 4, 5]  # the current round and `history` before it
    out = b.outgoing(2, full_nbytes=10**9)  # three rounds behind: exact float32 change
    assert out.base == 2 and out.arrays[codec.VALS].dtype == np.float32
    caught = apply_change(b.snapshots[2], out.arrays)
    for k in caught:
        np.testing.assert_allclose(caught[k], b.reference[k], atol=1e-6)
    assert b.outgoing(4, full_nbytes=10**9).arrays is b.increment  # one round behind: int4
    assert b.outgoing(1, full_nbytes=10**9).base is None  # older than the history: full
    assert b.outgoing(None, full_nbytes=10**9).base is None  # never synchronised: full
    assert b.outgoing(4, full_nbytes=1).base is None  # the change would be larger: full
    one = Broadcast(0.9, "int8", history=1)
    one.advance(1, _moving_global(1))
    one.advance(2, _moving_global(2))
    assert one.outgoing(1, full_nbytes=10**9).base == 1


def test_downlink_change_is_validated():
    ref = _arrays(0)
    payload = encode_change({k: v * 0.1 for k, v in ref.items()}, 0.5, "int8")
    bad = dict(payload)
    bad[codec.SCALE] = np.full_like(payload[codec.SCALE], np.nan)
    with pytest.raises(DownlinkError, match="scale"):
        apply_change(ref, bad)
    with pytest.raises(DownlinkError, match="vals"):
        apply_change(ref, {**payload, codec.VALS: payload[codec.VALS].astype(np.float64)})
    other = {k: v for k, v in ref.items() if not k.startswith("layer2")}
    with pytest.raises(DownlinkError):
        apply_change(other, payload)


def test_roundtrip_matches_what_the_codec_decodes():
    rng = np.random.default_rng(5)
    values = rng.standard_normal((4, 30)).astype(np.float32)
    mask = rng.random((4, 30)) < 0.3
    spec = layer_specs({"l.lora_A": np.zeros((4, 20), np.float32),
                        "l.lora_B": np.zeros((10, 4), np.float32)})[0]
    for dtype in DTYPES:
        payload = codec.encode([(spec, values * mask, mask)], dtype=dtype)
        (out, m), = codec.decode(payload, [spec], dtype=dtype)[0]
        np.testing.assert_array_equal(
            out[m], quantize.roundtrip(values[mask], mask.sum(axis=1), dtype))


def test_svd_oracle_still_serves_diagnostics():
    rows = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 22)).astype(np.float32))
    keep = keep_count(4, 12, 10, 0.5)
    out = SPARSIFIERS["svd"](rows, 12, keep)
    assert int(out.mask.sum()) == keep


# ----------------------------------------------------------------------------- frozen prefix


def test_frozen_prefix_gives_the_full_models_outputs():
    """frozen-prefix = cache: the upper blocks on cached lower-block outputs give the same
    evaluation as the whole model, and local training updates the same LoRA factors."""
    from fedsoft import lora
    from fedsoft.task import workload
    from fedsoft.task.collate import make_loader
    from fedsoft.task.train import evaluate, train_local

    over = {"preset": "ci", "lora-layers": "4,5", "max-train-examples": 120,
            "max-test-examples": 40}
    cfg0 = resolve(over, CONF)
    cfg1 = resolve({**over, "frozen-prefix": "cache"}, CONF)
    w0 = workload.build_workload(cfg0)
    _, test = workload.splits(cfg0)
    full = evaluate(w0.model, make_loader(test, w0.collate, 20, shuffle=False), "cpu")
    w1 = workload.build_workload(cfg1)
    assert w1.prefix_start == 4
    cached = evaluate(w1.runner, workload.test_loader(cfg1, w1), "cpu")
    assert cached[0] == pytest.approx(full[0], rel=1e-5) and cached[1] == full[1]
    before = lora.to_arrays(w1.model)
    loader, _ = workload.train_loader(cfg1, w1, 0, 2, 1)
    result = train_local(w1.runner, loader, epochs=1, steps=2, lr=0.01, weight_decay=0.0,
                         zeta=0.0, device="cpu")
    after = lora.to_arrays(w1.model)
    assert result.steps == 2 and np.isfinite(result.loss)
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert moved and all(".layer.4." in k or ".layer.5." in k or k.startswith("head.")
                         for k in moved)
    with pytest.raises(ValueError, match="block 0"):
        workload.build_workload(resolve({"preset": "ci", "frozen-prefix": "cache"}, CONF))


def test_oversized_rice_array_is_refused_before_it_is_unpacked():
    """A hostile reply cannot make the decoder unpack a huge Rice array (the reader holds
    about 70 bytes per input byte): more than an honest encoder sends is refused first."""
    rng = np.random.default_rng(0)
    spec = layer_specs({"l.lora_A": np.zeros((8, 384), np.float32),
                        "l.lora_B": np.zeros((384, 8), np.float32)})[0]
    mask = rng.random((8, 768)) < 0.05
    payload = codec.encode([(spec, rng.standard_normal((8, 768)) * mask, mask)])
    assert (payload[codec.POS_MODE] == codec.MODE_RICE).all()
    honest = codec.decode(payload, [spec])[0][0][1]
    assert np.array_equal(honest, mask)
    bloated = dict(payload, rice=np.concatenate([payload[codec.RICE],
                                                 np.zeros(10**6, np.uint8)]))
    with pytest.raises(codec.CodecError, match="'rice': length"):
        codec.decode(bloated, [spec])
