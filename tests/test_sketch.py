"""Paper B: sketching, independent sampling, wall-clock model and the (q, k) optimiser."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsoft import lora
from fedsoft.config import DEFAULTS, ConfigError, resolve
from fedsoft.sketching.independent_sampling import sample_independent, unbiased_update
from fedsoft.sketching.optimizer import SketchObjective, optimize_sampling, uniform_plan
from fedsoft.sketching.sketch import (
    SketchError,
    expand_reply,
    layer_indices,
    sketch_indices,
    sketch_reply,
    sketched_training,
)
from fedsoft.sketching.wallclock import SystemModel, compute_speeds, round_time
from fedsoft.task.models import build_model, get_spec
from fedsoft.task.train import train_local
from fedsoft.wireless.channel import Channel, ChannelConfig


def _arrays(seed=0, layers=2, r=4, d=6, k=5):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(layers):
        out[f"l{i}.lora_A"] = rng.standard_normal((r, k)).astype(np.float32)
        out[f"l{i}.lora_B"] = rng.standard_normal((d, r)).astype(np.float32)
    out["head.w"] = rng.standard_normal((3, 2)).astype(np.float32)
    return out


# ---------------------------------------------------------------- sketch (B.2)


def test_sketch_indices_are_seeded_distinct_and_in_range():
    a, b = sketch_indices(16, 5, 7), sketch_indices(16, 5, 7)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 5
    assert a.min() >= 0 and a.max() < 16 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, sketch_indices(16, 5, 8))
    for bad in (0, 17):
        with pytest.raises(ValueError, match="sketch size"):
            sketch_indices(16, bad, 0)


def test_sketched_product_is_unbiased_monte_carlo():
    rng = np.random.default_rng(0)
    r, k = 8, 3
    b, a = rng.standard_normal((6, r)), rng.standard_normal((r, 5))
    acc = np.zeros((6, 5))
    draws = 6000
    for s in range(draws):
        diag = np.zeros(r)
        diag[sketch_indices(r, k, s)] = r / k  # S of B.2
        acc += b @ np.diag(diag) @ a
    err = np.linalg.norm(acc / draws - b @ a) / np.linalg.norm(b @ a)
    assert err < 0.05, err


def test_reply_round_trip_and_zeros_outside_the_sketch():
    g, loc = _arrays(0), _arrays(1)
    idx = layer_indices(g, 2, seed=3, server_round=1, node_id=9)
    reply = sketch_reply(g, loc, idx)
    assert reply["l0.lora_A"].shape == (2, 5) and reply["l0.lora_B"].shape == (6, 2)
    delta = expand_reply(g, reply, idx)
    for name, i in idx.items():
        mask = np.zeros(4, dtype=bool)
        mask[i] = True
        da, db = delta[name + ".lora_A"], delta[name + ".lora_B"]
        np.testing.assert_allclose(da[mask], (loc[name + ".lora_A"] - g[name + ".lora_A"])[mask])
        np.testing.assert_allclose(db[:, mask],
                                   (loc[name + ".lora_B"] - g[name + ".lora_B"])[:, mask])
        assert not da[~mask].any() and not db[:, ~mask].any()
    np.testing.assert_allclose(delta["head.w"], loc["head.w"] - g["head.w"])


@pytest.mark.parametrize("corrupt, match", [
    (lambda r: r.pop("l1.lora_B"), "keys differ"),
    (lambda r: r.update({"extra": np.zeros(1, np.float32)}), "keys differ"),
    (lambda r: r.update({"l0.lora_A": np.zeros((3, 5), np.float32)}), "l0.lora_A: shape"),
    (lambda r: r.update({"l0.lora_B": np.zeros((6, 2), np.int32)}), "l0.lora_B: expected a float"),
    (lambda r: r["head.w"].__setitem__((0, 0), np.nan), "head.w: non-finite"),
    (lambda r: r["l1.lora_A"].__setitem__((0, 0), np.inf), "l1.lora_A: non-finite"),
])
def test_bad_sketched_replies_are_named_and_leave_the_global_untouched(corrupt, match):
    g, loc = _arrays(0), _arrays(1)
    before = {k: v.copy() for k, v in g.items()}
    idx = layer_indices(g, 2, seed=3, server_round=1, node_id=9)
    reply = sketch_reply(g, loc, idx)
    corrupt(reply)
    with pytest.raises(SketchError, match=match):
        expand_reply(g, reply, idx)
    assert all(np.array_equal(before[k], g[k]) for k in g)


def test_sketched_training_touches_only_the_sketch(tiny_dir):
    model = build_model(get_spec("minilm-l6"), 4, 4, 8.0, source=tiny_dir("bert"), seed=0)
    with torch.no_grad():  # non-zero B so the scaling is visible
        for _, m in lora.lora_modules(model):
            m.lora_B[lora.ADAPTER].weight.normal_()
    g = lora.to_arrays(model)
    idx = layer_indices(g, 2, seed=0, server_round=1, node_id=1)
    batches = [{"input_ids": torch.randint(1, 100, (4, 8)),
                "attention_mask": torch.ones(4, 8, dtype=torch.long),
                "labels": torch.randint(0, 4, (4,))} for _ in range(3)]
    with sketched_training(model, idx):
        for name, m in lora.lora_modules(model):  # B <- B S inside the block (B.2)
            b = m.lora_B[lora.ADAPTER].weight.detach().numpy()
            mask = np.zeros(4, dtype=bool)
            mask[idx[name]] = True
            np.testing.assert_allclose(b[:, mask], 2.0 * g[name + ".lora_B"][:, mask], rtol=1e-6)
            assert not b[:, ~mask].any()
        train_local(model, batches, steps=3, lr=0.05, weight_decay=0.1)
    loc = lora.to_arrays(model)
    changed = 0
    for name, i in idx.items():
        mask = np.zeros(4, dtype=bool)
        mask[i] = True
        for key, sl in ((name + ".lora_A", (~mask, slice(None))),
                        (name + ".lora_B", (slice(None), ~mask))):
            np.testing.assert_array_equal(loc[key][sl], g[key][sl])
        changed += int(not np.allclose(loc[name + ".lora_A"][mask], g[name + ".lora_A"][mask]))
    assert changed > 0


# ---------------------------------------------------------------- independent sampling (B.1)


def test_independent_sampling_update_is_unbiased_monte_carlo():
    rng = np.random.default_rng(1)
    g = _arrays(0)
    deltas = [_arrays(10 + n) for n in range(5)]
    a = np.array([0.1, 0.3, 0.2, 0.15, 0.25])
    q = np.array([0.2, 0.9, 0.5, 0.35, 1.0])
    full = unbiased_update(g, deltas, a, np.ones(5))  # everyone, q = 1: plain FedAvg of deltas
    acc = {k: np.zeros_like(v, dtype=np.float64) for k, v in g.items()}
    draws, empty = 20000, 0
    for _ in range(draws):
        part = sample_independent(q, rng)
        empty += part.size == 0
        new = unbiased_update(g, [deltas[i] for i in part], a[part], q[part])
        for k in acc:
            acc[k] += new[k]
    for k in acc:
        err = np.abs(acc[k] / draws - full[k]).max() / np.abs(full[k] - g[k]).max()
        assert err < 0.05, (k, err)
    assert empty == 0  # q_5 = 1: never empty here
    assert sample_independent(np.full(3, 0.01), np.random.default_rng(0)).size == 0


def test_sampling_rejects_bad_probabilities():
    for q in ([0.0, 0.5], [1.2], [np.nan]):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            sample_independent(q, np.random.default_rng(0))


# ---------------------------------------------------------------- wall-clock model (B.3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0.01, 10)), min_size=1, max_size=12))
def test_equal_finish_all_participants_finish_together(pairs):
    t_cp, t_cm = (np.array(x) for x in zip(*pairs, strict=True))
    t, shares = round_time(t_cp, t_cm, "equal_finish")
    assert abs(shares.sum() - 1) < 1e-9 and np.all(shares > 0)
    finish = t_cp + t_cm / shares
    np.testing.assert_allclose(finish, t, rtol=1e-9)
    t_eq, sh_eq = round_time(t_cp, t_cm, "equal")
    assert t <= t_eq + 1e-9 and np.allclose(sh_eq, 1 / len(pairs))
    assert t_eq == pytest.approx(np.max(t_cp + len(pairs) * t_cm))


def _system(n=8, het=1.0, rank=8, allocation="equal_finish"):
    ch = Channel(ChannelConfig(num_clients=n), seed=0)
    return SystemModel(compute_speeds(n, 0.2, het, 0), 10, 0.3, rank, 32 * 2000, 32 * 500, ch,
                       allocation)


def test_round_overhead_and_expected_time_grows_with_q():
    s = _system()
    assert s.round(np.array([], dtype=int), np.full(8, 4), 1) == (0.0, pytest.approx([]))
    slow = SystemModel(s.compute_s, 10, 0.3, 8, 32 * 2000, 32 * 500, s.channel,
                       round_overhead_s=2.0)
    assert slow.round(np.array([], dtype=int), np.full(8, 4), 1)[0] == 2.0
    assert slow.round(np.array([0, 3]), np.full(8, 4), 1)[0] == pytest.approx(
        2.0 + s.round(np.array([0, 3]), np.full(8, 4), 1)[0])
    k = np.full(8, 4)
    times = [s.expected_round_time(np.full(8, q), k, draws=64) for q in (0.1, 0.5, 1.0)]
    assert times[0] < times[1] < times[2]
    assert s.expected_round_time(np.full(8, 0.5), np.full(8, 2), draws=64) < times[1]


# ---------------------------------------------------------------- optimiser (B.4-B.5)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(2, 8), het=st.floats(0.0, 1.5),
       q0=st.floats(0.2, 1.0))
def test_optimiser_stays_feasible_and_never_loses_to_uniform(seed, n, het, q0):
    rng = np.random.default_rng(seed)
    s = _system(n, het, rank=8)
    a = rng.random(n) + 0.1
    obj = SketchObjective(1.0, float(rng.uniform(0.5, 5)), 0.5)
    p = optimize_sampling(s, a, obj, budget=q0 * n, k_init=4, q_min=min(0.05, q0), draws=32,
                          iters=3, grid=8, seed=seed)
    assert np.all(p.q > 0) and np.all(p.q <= 1) and p.q.sum() <= q0 * n * (1 + 1e-9)
    assert np.all(p.k >= 1) and np.all(p.k <= 8)
    u = uniform_plan(s, a, obj, q0, 4, draws=32, seed=seed)
    assert p.objective <= u.objective * (1 + 1e-12)
    assert p.uniform_objective == pytest.approx(u.objective)


def test_optimiser_beats_uniform_on_a_heterogeneous_instance():
    s = _system(10, het=1.5)
    a = np.full(10, 0.1)
    obj = SketchObjective(1.0, 2.0, 0.5)
    p = optimize_sampling(s, a, obj, budget=5.0, k_init=4, draws=64)
    u = uniform_plan(s, a, obj, 0.5, 4, draws=64)
    assert p.objective < 0.95 * u.objective, (p.objective, u.objective)
    # the slowest clients are sampled less often than the fastest
    slow, fast = int(np.argmax(s.compute_s)), int(np.argmin(s.compute_s))
    assert p.q[slow] < p.q[fast]


def test_sketch_config_cross_checks():
    with pytest.raises(ConfigError, match="sparsifier"):
        resolve({**DEFAULTS, "strategy": "sketch", "sparsifier": "soft", "sparsity": 0.5})
    with pytest.raises(ConfigError, match="sampling-q-min"):
        resolve({**DEFAULTS, "strategy": "sketch", "sampling-q": 0.1, "sampling-q-min": 0.2})
    with pytest.raises(ConfigError, match="sketch-ratio"):
        resolve({**DEFAULTS, "sketch-ratio": 0.0})


@pytest.mark.parametrize("allocation", ["equal_finish", "equal"])
def test_vectorised_expected_round_time_matches_a_per_draw_loop(allocation):
    s = SystemModel(_system(7).compute_s, 10, 0.3, 8, 32 * 2000, 32 * 500, _system(7).channel,
                    allocation, round_overhead_s=0.5)
    q = np.array([0.1, 0.9, 0.5, 0.3, 1.0, 0.05, 0.6])
    k = np.array([1, 8, 3, 2, 5, 4, 7])
    rng = np.random.default_rng(np.random.SeedSequence(3, spawn_key=(11,)))
    u, fade = rng.random((64, 7)), rng.exponential(1.0, size=(64, 7))
    total = 0.0
    for j in range(64):
        part = np.flatnonzero(u[j] < q)
        gamma = s.channel.spectral_eff(fade[j, part] * s.channel.mean_gains()[part])
        t = round_time(s.compute_time(k)[part], s.upload_time(k[part], gamma), allocation)[0]
        total += 0.5 + t
    assert s.expected_round_time(q, k, draws=64, seed=3) == pytest.approx(total / 64, rel=1e-10)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), het=st.floats(0.0, 2.0), overhead=st.sampled_from([0.0, 1.0]),
       xi=st.sampled_from([0.0, 0.5, 3.0]))
def test_optimiser_is_never_worse_than_the_best_common_k(seed, het, overhead, xi):
    rng = np.random.default_rng(seed)
    base = _system(5, het, rank=6)
    s = SystemModel(base.compute_s, 10, 0.3, 6, 32 * 2000, 32 * 500, base.channel,
                    round_overhead_s=overhead)
    a = rng.random(5) + 0.1
    obj = SketchObjective(float(rng.uniform(0, 3)), float(rng.uniform(0.5, 5)), xi)
    kw = {"budget": 2.5, "draws": 24, "seed": seed, "iters": 3, "grid": 6}
    p = optimize_sampling(s, a, obj, k_init=3, **kw)
    for c in range(1, 7):  # each common k: its own q-step, and uniform q
        fixed = optimize_sampling(s, a, obj, k_init=c, optimize_k=False, **kw)
        assert p.objective <= fixed.objective * (1 + 1e-12), (c, p.objective, fixed.objective)
        assert p.objective <= uniform_plan(s, a, obj, 0.5, c, draws=24, seed=seed).objective


def test_k_step_ends_coordinatewise_optimal_not_all_or_nothing():
    s = _system(6, het=1.5, rank=8)
    a = np.array([0.3, 0.1, 0.25, 0.05, 0.2, 0.1])
    obj = SketchObjective(1.0, 2.0, 0.5)
    p = optimize_sampling(s, a, obj, budget=3.0, k_init=4, draws=32)
    aa = a / a.sum()

    def j(k):
        return obj.rounds(p.q, k, aa, 8) * s.expected_round_time(p.q, k, 32, 0)

    assert j(p.k) == pytest.approx(p.objective)
    for i in range(6):  # no single client's k_n in 1..r lowers J at the returned q
        for c in range(1, 9):
            kv = p.k.copy()
            kv[i] = c
            assert j(kv) >= p.objective * (1 - 1e-9), (i, c)
    for c in range(1, 9):  # nor does any common k
        assert j(np.full(6, c)) >= p.objective * (1 - 1e-9)
    assert len(set(p.k.tolist())) > 1  # heterogeneous clients get different k_n here
