"""Client encode -> server decode of sparse LoRA updates, for every sparsifier and both targets."""

import numpy as np
import pytest
import torch

from fedsoft.aggregate import weighted_average
from fedsoft.compression import codec
from fedsoft.compression.error_feedback import ErrorFeedback
from fedsoft.compression.sparsifiers import SPARSIFIERS, keep_count
from fedsoft.compression.update import SparseSettings, decode_update, encode_update
from fedsoft.layout import layer_specs

SPARSE = sorted(n for n in SPARSIFIERS if n != "dense")


def _arrays(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, (r, d, k) in enumerate([(4, 12, 10), (4, 12, 10), (4, 9, 12)]):
        out[f"layer{i}.lora_A"] = (scale * rng.standard_normal((r, k))).astype(np.float32)
        out[f"layer{i}.lora_B"] = (scale * rng.standard_normal((d, r))).astype(np.float32)
    out["head.classifier.weight"] = rng.standard_normal((3, 12)).astype(np.float32)
    out["head.classifier.bias"] = rng.standard_normal(3).astype(np.float32)
    return out


@pytest.mark.parametrize("target", ["update", "factors"])
@pytest.mark.parametrize("name", SPARSE)
def test_round_trip_rebuilds_what_was_kept(name, target):
    glob, local = _arrays(0), _arrays(1)
    settings = SparseSettings(name, 0.6, target=target, seed=7)
    ef = ErrorFeedback("sig")
    payload, info = encode_update(glob, local, settings, ef, server_round=3, node_id=2**40 + 5)
    rebuilt = decode_update(payload, glob, settings, server_round=3, node_id=2**40 + 5)
    assert list(rebuilt) == list(glob)
    for spec in layer_specs(glob):
        a_key, b_key = spec.name + ".lora_A", spec.name + ".lora_B"
        base_a = glob[a_key] if target == "update" else 0.0
        base_b = glob[b_key] if target == "update" else 0.0
        sent = np.concatenate([(rebuilt[b_key] - base_b).T, rebuilt[a_key] - base_a], axis=1)
        x = np.concatenate([(local[b_key] - base_b).T, local[a_key] - base_a], axis=1)
        e = ef.memory[spec.name].numpy()
        if name == "hetlora":  # rows above the client's rank are never sent: no memory kept
            unsent = ~(np.abs(sent) > 0).any(axis=1)
            assert unsent.any() and not e[unsent].any()
            sent, e, x = sent[~unsent], e[~unsent], x[~unsent]
        # eq. (14): what was sent plus the new memory is exactly what was compressed
        np.testing.assert_allclose(sent + e, x, atol=1e-5)
        if name != "svd":
            assert int((np.abs(sent) > 0).sum()) <= keep_count(spec.r, spec.d, spec.k, 0.6)
    np.testing.assert_array_equal(rebuilt["head.classifier.bias"], local["head.classifier.bias"])
    assert info["ef_sq_norm"] > 0


def test_seeded_positions_cost_nothing_and_need_the_right_node():
    glob, local = _arrays(0), _arrays(1)
    settings = SparseSettings("rlora", 0.5, seed=1)
    payload, _ = encode_update(glob, local, settings, ErrorFeedback(), server_round=1, node_id=9)
    assert codec.IDX not in payload and codec.BMP not in payload
    with pytest.raises(codec.CodecError):
        # another node's seed gives other positions: counts no longer match the masks
        decode_update(payload, glob, settings, server_round=1, node_id=10)


def test_over_budget_payload_is_rejected():
    glob, local = _arrays(0), _arrays(1)
    lax = SparseSettings("flasc", 0.2)
    payload, _ = encode_update(glob, local, lax, ErrorFeedback(), server_round=1, node_id=1)
    with pytest.raises(codec.CodecError, match="budget"):
        decode_update(payload, glob, SparseSettings("flasc", 0.6), server_round=1, node_id=1)


def test_update_mode_aggregation_adds_weighted_sparse_deltas():
    glob = _arrays(0)
    settings = SparseSettings("soft", 0.5)
    locals_ = [_arrays(s, 0.5) for s in (1, 2)]
    rebuilt = []
    for i, loc in enumerate(locals_):
        p, _ = encode_update(glob, loc, settings, ErrorFeedback(), server_round=1, node_id=i)
        rebuilt.append(decode_update(p, glob, settings, server_round=1, node_id=i))
    new = weighted_average(rebuilt, [1.0, 3.0])
    key = "layer0.lora_A"
    deltas = [r[key] - glob[key] for r in rebuilt]
    np.testing.assert_allclose(new[key], glob[key] + 0.25 * deltas[0] + 0.75 * deltas[1],
                               atol=1e-6)


def test_error_memory_carries_over_rounds():
    glob, local = _arrays(0), _arrays(1)
    settings = SparseSettings("soft", 0.8)
    ef = ErrorFeedback("s")
    encode_update(glob, local, settings, ef, server_round=1, node_id=1)
    state = ef.to_arrays()
    ef2 = ErrorFeedback.from_arrays(state, "s")
    p_with, _ = encode_update(glob, glob, settings, ef2, server_round=2, node_id=1)
    # no new local change: what is sent now comes from the memory alone, and is not zero
    assert np.abs(p_with[codec.VALS]).sum() > 0
    assert torch.equal(ef.memory["layer0"], ErrorFeedback.from_arrays(state, "s").memory["layer0"])


@pytest.mark.parametrize("shape", ["minilm", "vit"])
def test_payload_estimate_matches_the_encoded_record(shape):
    """estimate_payload_bytes (what TSFA plans with) against ArrayRecord.count_bytes() of real
    codec.encode payloads, over rho: MiniLM-like (12 x 384+384, head 384x10) and ViT-like
    (8 x 768+768, head 768x100)."""
    from flwr.app import Array, ArrayRecord

    from fedsoft.compression.codec import LayerSpec, encode
    from fedsoft.compression.sparsifiers import keep_count
    from fedsoft.compression.update import estimate_payload_bytes

    n, dim, heads = (12, 384, [3840, 10]) if shape == "minilm" else (8, 768, [76800, 100])
    specs = [LayerSpec(f"encoder.layer.{i}.attention.self.query", 8, dim, dim) for i in range(n)]
    rng = np.random.default_rng(0)
    for rho in (0.0, 0.5, 0.9, 0.99):
        layers = []
        for s in specs:
            mask = np.zeros(s.size, bool)
            mask[rng.choice(s.size, keep_count(s.r, s.d, s.k, rho), replace=False)] = True
            layers.append((s, rng.standard_normal((s.r, s.row_len)).astype(np.float32),
                           mask.reshape(s.r, s.row_len)))
        payload = encode(layers, {f"classifier.p{i}": np.zeros(h, np.float32)
                                  for i, h in enumerate(heads)})
        real = ArrayRecord({k: Array(v) for k, v in payload.items()}).count_bytes()
        est = estimate_payload_bytes(specs, heads, rho)
        assert abs(est / real - 1.0) < 0.02, (rho, est, real)
