"""Reliability: fuzzed hostile payloads, client state on disk, checkpoints, failures, config."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedsoft import checkpoint
from fedsoft.aggregate import ReplyError
from fedsoft.compression.client_state import load_ef, save_ef, simulated_failure
from fedsoft.compression.codec import CodecError
from fedsoft.compression.error_feedback import ErrorFeedback
from fedsoft.compression.update import SparseSettings, decode_update, encode_update
from fedsoft.config import DEFAULTS, ConfigError, resolve


def _arrays(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, (d, k) in enumerate([(24, 20), (6, 5)]):
        out[f"l{i}.lora_A"] = (scale * rng.standard_normal((4, k))).astype(np.float32)
        out[f"l{i}.lora_B"] = (scale * rng.standard_normal((d, 4))).astype(np.float32)
    out["head.w"] = rng.standard_normal((3, 4)).astype(np.float32)
    return out


GLOBAL = _arrays(0)
CASES = {  # sparsifier, sparsity: index mode (flasc 0.9), bitmaps (soft 0.5), seeded (rlora)
    name: (SparseSettings(name, rho), encode_update(GLOBAL, _arrays(1, 0.1), SparseSettings(
        name, rho), ErrorFeedback(), server_round=3, node_id=7)[0])
    for name, rho in (("flasc", 0.9), ("soft", 0.5), ("rlora", 0.7))
}
EXPECTED_ERRORS = (CodecError, ReplyError, ValueError)


def _mutate(payload: dict, data) -> dict:
    p = {k: v.copy() for k, v in payload.items()}
    keys = sorted(p)
    kind = data.draw(st.sampled_from(
        ["bytes", "dtype", "truncate", "extend", "nonfinite", "drop", "add", "reshape", "huge",
         "value"]))
    key = data.draw(st.sampled_from(keys))
    a = p[key]
    if kind == "bytes" and a.size:
        raw = bytearray(a.tobytes())
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
        p[key] = np.frombuffer(bytes(raw), dtype=a.dtype).reshape(a.shape).copy()
    elif kind == "dtype":
        new = data.draw(st.sampled_from([np.float64, np.float16, np.int32, np.uint8, np.int64]))
        p[key] = a.astype(new)
    elif kind == "truncate" and a.size:
        p[key] = a.reshape(-1)[: data.draw(st.integers(0, a.size - 1))]
    elif kind == "extend":
        p[key] = np.concatenate([a.reshape(-1), a.reshape(-1)[:1] if a.size else
                                 np.zeros(1, a.dtype)])
    elif kind == "nonfinite" and a.dtype.kind == "f" and a.size:
        flat = a.reshape(-1)
        flat[data.draw(st.integers(0, a.size - 1))] = data.draw(
            st.sampled_from([np.nan, np.inf, -np.inf]))
    elif kind == "drop":
        del p[key]
    elif kind == "add":
        p["extra/" + key] = a
    elif kind == "reshape" and a.size > 1:
        p[key] = a.reshape(-1, 1)
    elif kind == "huge":
        p[key] = np.zeros(50_000, dtype=a.dtype)
    elif kind == "value" and a.size:
        flat = a.reshape(-1)
        info = np.iinfo(a.dtype) if a.dtype.kind in "iu" else None
        v = data.draw(st.integers(int(info.min), int(info.max))) if info else data.draw(
            st.floats(-1e6, 1e6))
        flat[data.draw(st.integers(0, a.size - 1))] = v
    return p


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(sorted(CASES)), data=st.data())
def test_fuzzed_payloads_are_rejected_cleanly_or_decode_to_valid_arrays(case, data):
    settings_, payload = CASES[case]
    hostile = _mutate(payload, data)
    before = {k: v.copy() for k, v in GLOBAL.items()}
    try:
        out = decode_update(hostile, GLOBAL, settings_, server_round=3, node_id=7,
                            max_bytes=8 * 1024)
    except EXPECTED_ERRORS as err:
        assert str(err)  # a reason that can be logged
        event(f"rejected ({type(err).__name__})")
    else:  # a mutation that kept the payload well-formed (e.g. one changed value)
        event("decoded (still well-formed)")
        assert set(out) == set(GLOBAL)
        for k, v in out.items():
            assert v.shape == GLOBAL[k].shape and v.dtype == np.float32
            assert np.all(np.isfinite(v))
    assert all(np.array_equal(before[k], GLOBAL[k]) for k in GLOBAL)  # never touched


# ---------------------------------------------------------------- client state on disk


def test_error_memory_survives_a_restart_and_ignores_the_future(tmp_path):
    mem = {"l0": np.arange(6, dtype=np.float32)}
    for t in (1, 3, 4, 6):
        save_ef(tmp_path, 2, t, {k: v + t for k, v in mem.items()}, keep_every=4)
    # kept: the latest (6) and the latest at or before the last checkpoint round (4)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == [
        "ef-partition2-round4.npz", "ef-partition2-round6.npz"]
    got, t = load_ef(tmp_path, 2, server_round=7)
    assert t == 6 and np.array_equal(got["l0"], mem["l0"] + 6)
    got, t = load_ef(tmp_path, 2, server_round=5)  # resumed after round 4: file 6 is the future
    assert t == 4 and np.array_equal(got["l0"], mem["l0"] + 4)
    assert load_ef(tmp_path, 3, server_round=5) == (None, None)  # another partition
    (tmp_path / "ef-partition2-round6.npz").write_bytes(b"garbage")
    # a corrupt latest memory is reset (not replaced by the stale round-4 one) and moved aside
    assert load_ef(tmp_path, 2, server_round=7) == (None, None)
    assert (tmp_path / "ef-partition2-round6.npz.corrupt").is_file()
    assert load_ef(tmp_path, 2, server_round=7) == (None, None)  # still no stale fallback
    save_ef(tmp_path, 2, 7, mem, keep_every=4)
    assert load_ef(tmp_path, 2, server_round=8)[1] == 7


def test_simulated_failures_hit_about_the_configured_fraction():
    hits = [simulated_failure(0, t, p, 0.3) for t in range(1, 51) for p in range(20)]
    assert 0.25 < np.mean(hits) < 0.35
    assert hits == [simulated_failure(0, t, p, 0.3) for t in range(1, 51) for p in range(20)]
    assert not any(simulated_failure(0, t, 0, 0.0) for t in range(100))


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_latest_and_atomic_replace(tmp_path):
    cfg = resolve({"seed": 3})
    for t in (2, 4):
        checkpoint.save(tmp_path, t, {k: v * t for k, v in GLOBAL.items()},
                        {"config": cfg, "strategy": {"rng": [3, [1, 2], None]}, "metrics": []},
                        save_adapter=lambda p: p.mkdir())
    checkpoint.save(tmp_path, 4, GLOBAL, {"config": cfg, "strategy": {}, "metrics": [{"x": 1}]})
    assert not list(tmp_path.glob(".round-*"))  # no temporary directories left
    t, arrays, state = checkpoint.load(tmp_path)  # a run's checkpoints/ dir: the latest
    assert t == 4 and state["metrics"] == [{"x": 1}]
    assert all(np.array_equal(arrays[k], GLOBAL[k]) for k in GLOBAL)
    t2, arrays2, _ = checkpoint.load(tmp_path / "round-00002")
    assert t2 == 2 and np.array_equal(arrays2["head.w"], GLOBAL["head.w"] * 2)


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no round-"):
        checkpoint.load(tmp_path)
    bad = tmp_path / "round-00001"
    bad.mkdir()
    (bad / "state.json").write_text("{not json")
    (bad / "arrays.npz").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="state.json is not valid JSON"):
        checkpoint.load(bad)
    cfg = resolve({})
    checkpoint.check_compatible(cfg, {**cfg, "num-server-rounds": 50, "run-dir": "elsewhere"})
    with pytest.raises(checkpoint.CheckpointError, match="lora-rank: 8 -> 4"):
        checkpoint.check_compatible(cfg, {**cfg, "lora-rank": 4})


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize("override, key", [
    ({"lora-rank": 0}, "lora-rank"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity-min": 0.5, "sparsity-max": 0.4}, "sparsity-min"),
    ({"bandwidth-hz": 0.0}, "bandwidth-hz"),
    ({"latency-budget": -1.0}, "latency-budget"),
    ({"sampling-q": 0.0}, "sampling-q"),
    ({"fail-fraction": 1.0}, "fail-fraction"),
    ({"strategy": "fedprox"}, "strategy"),
    ({"sparsifier": "topk"}, "sparsifier"),
    ({"min-replies": 0}, "min-replies"),
    ({"checkpoint-every": -2}, "checkpoint-every"),
    ({"lr": "fast"}, "lr"),
    ({"lora-layers": "0,x"}, "lora-layers"),
    ({"no-such-key": 1}, "no-such-key"),
])
def test_every_class_of_bad_value_names_the_key_and_value(override, key):
    with pytest.raises(ConfigError) as err:
        resolve({**DEFAULTS, **override})
    msg = str(err.value)
    assert key in msg and any(repr(v) in msg or str(v) in msg for v in override.values()), msg


def test_resolved_config_is_json_serialisable_for_checkpoints():
    cfg = resolve({"strategy": "tsfa"})
    assert json.loads(json.dumps(cfg.flat())) == cfg
