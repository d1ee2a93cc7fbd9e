"""Tests of the TSFA controller: bound surrogate, offline and online Lyapunov stages (paper A)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsoft.wireless.bound import BoundConstants, sparsification_term
from fedsoft.wireless.channel import Channel, ChannelConfig, fdma_delays, spectral_efficiency
from fedsoft.wireless.controller import (
    OSFAController,
    TSFAController,
    VirtualQueue,
    bandwidth_shares,
    p3_objective,
    round_latency,
    solve_p3_bisection,
    solve_p3_closed_form,
    solve_p3_cvxpy,
)
from fedsoft.wireless.offline_rank import (
    InfeasibleLatencyError,
    calibrate,
    choose_rank,
    choose_rank_for_channel,
    nominal_inv_gamma_sum,
    rho_star,
)

DK = 12_288  # sum of d + k over 8 adapted 768x768 matrices
CFG = ChannelConfig.paper()  # the paper's channel: eq. (41) exact, light fading tail
N_ROUNDS = 2000
K = 10


# ----------------------------------------------------------------------------- bound (A.8)


@pytest.mark.parametrize("p", [1, 2])
def test_bound_derivatives_match_finite_differences(p: int) -> None:
    b = BoundConstants(kappa_E=2.5, p=p)
    rho = np.linspace(0.01, 0.95, 40)
    h = 1e-6
    fd1 = (b.value(3, rho + h) - b.value(3, rho - h)) / (2 * h)
    np.testing.assert_allclose(b.d_rho(rho), fd1, rtol=1e-5)
    fd2 = (b.d_rho(rho + h) - b.d_rho(rho - h)) / (2 * h)
    np.testing.assert_allclose(b.d2_rho(rho), fd2, rtol=1e-5)
    assert np.all(b.d2_rho(rho) > 0)


def test_bound_terms_and_sigma_per_rank() -> None:
    sig = np.array([3.0, 2.0, 1.0, 0.5])
    b = BoundConstants(kappa_R=1.5, kappa_S=0.2, kappa_C=0.1, kappa_E=2.0, r_star_ideal=6,
                       sigma_bar=sig, sigma_max=4.0)
    for r in range(1, 5):
        expect = 1.5 * (6 - r) * sig[r - 1] ** 2 + 0.2 + 0.1 * r * 16.0 + 2.0 * 0.3 / 0.7**2
        assert b.value(r, 0.3) == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ValueError, match="rank=5"):
        b.value(5, 0.3)
    scalar = BoundConstants(sigma_bar=2.0, r_star_ideal=4)
    assert scalar.rank_terms(9) == pytest.approx(scalar.kappa_C * 9 * scalar.sigma_max**2)


@pytest.mark.parametrize(
    ("field", "value"),
    [("kappa_E", -1.0), ("kappa_R", float("nan")), ("p", 3), ("sigma_bar", [1.0, -2.0]),
     ("r_star_ideal", 0.5), ("sigma_max", float("inf"))],
)
def test_bound_bad_values_name_field(field: str, value: object) -> None:
    with pytest.raises((ValueError, TypeError), match=field):
        BoundConstants(**{field: value})


def test_sparsification_term_rejects_rho_out_of_range() -> None:
    with pytest.raises(ValueError, match="rho"):
        sparsification_term(1.0)


# ------------------------------------------------------------------------- shares (eq. 41)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1e-14, 1e-5), min_size=1, max_size=20), st.floats(1e3, 1e8))
def test_bandwidth_shares_sum_to_one_and_equalise(gains: list[float], bits: float) -> None:
    gam = spectral_efficiency(np.array(gains), CFG.tx_power_w, CFG.noise_w)
    b = bandwidth_shares(gam)
    assert abs(b.sum() - 1.0) < 1e-12
    d = fdma_delays(bits, b, gam, CFG.bandwidth_hz)
    assert (d.max() - d.min()) / d.max() < 1e-9
    # the equalised delay is the model latency of eq. (39): bits * S / B_tot
    assert d.max() == pytest.approx(bits * np.sum(1 / gam) / CFG.bandwidth_hz, rel=1e-9)


def test_bandwidth_shares_bad_input() -> None:
    with pytest.raises(ValueError, match="spectral_eff"):
        bandwidth_shares(np.array([1.0, 0.0]))


# ----------------------------------------------------------------------------- P3 (39)-(40)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize(("V", "Q", "c"), [(1.0, 3.0, 2.0), (50.0, 0.1, 7.0), (0.2, 40.0, 0.3)])
def test_p3_objective_convex(p: int, V: float, Q: float, c: float) -> None:
    b = BoundConstants(kappa_E=1.3, p=p)
    grid = np.linspace(0.0, 0.99, 500)
    f = p3_objective(grid, b, 4, V, Q, c)
    second = f[2:] - 2 * f[1:-1] + f[:-2]
    assert np.all(second > 0)


def _random_p3_cases(seed: int, n: int) -> list[tuple[float, float, float, float, float]]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        lo = float(rng.choice([0.0, rng.uniform(0.0, 0.5)]))
        hi = float(rng.choice([0.99, rng.uniform(lo + 0.01, 0.999)]))
        cases.append((float(np.exp(rng.uniform(-3, 6))), float(np.exp(rng.uniform(-4, 6))),
                      float(np.exp(rng.uniform(-3, 2))), lo, hi))
    return cases


@pytest.mark.parametrize("p", [1, 2])
def test_cvxpy_and_bisection_agree(p: int) -> None:
    b = BoundConstants(kappa_E=0.7, p=p)
    for V, Q, c, lo, hi in _random_p3_cases(p, 25):
        x_bis = solve_p3_bisection(b, V, Q, c, lo, hi)
        x_cvx = solve_p3_cvxpy(b, V, Q, c, lo, hi)
        assert abs(x_bis - x_cvx) <= 1e-6
        assert lo <= x_bis <= hi
        if p == 1:
            assert abs(solve_p3_closed_form(b, V, Q, c, lo, hi) - x_bis) <= 1e-9
        # optimality: no grid point of the feasible interval does better
        grid = np.linspace(lo, hi, 2001)
        assert p3_objective(x_bis, b, 2, V, Q, c) <= p3_objective(grid, b, 2, V, Q, c).min() + 1e-12


@pytest.mark.parametrize("solver", [solve_p3_bisection, solve_p3_cvxpy, solve_p3_closed_form])
def test_zero_queue_gives_rho_min(solver: object) -> None:
    b = BoundConstants()
    assert solver(b, 10.0, 0.0, 5.0, 0.2, 0.95) == 0.2  # type: ignore[operator]


def test_p3_bad_input() -> None:
    b = BoundConstants()
    with pytest.raises(ValueError, match="rho_max"):
        solve_p3_bisection(b, 1.0, 1.0, 1.0, 0.5, 0.2)
    with pytest.raises(ValueError, match="V"):
        solve_p3_cvxpy(b, -1.0, 1.0, 1.0, 0.0, 0.9)
    with pytest.raises(ValueError, match="Q"):
        solve_p3_bisection(b, 1.0, float("nan"), 1.0, 0.0, 0.9)


def test_virtual_queue_eq30() -> None:
    q = VirtualQueue(T_bar=2.0)
    assert q.update(3.5) == pytest.approx(1.5)
    assert q.update(1.0) == pytest.approx(0.5)
    assert q.update(0.0) == 0.0
    with pytest.raises(ValueError, match="latency"):
        q.update(-1.0)
    with pytest.raises(ValueError, match="T_bar"):
        VirtualQueue(0.0)


def test_round_latency_model() -> None:
    expected = 0.75 * 4 * 100 * 32 * 0.5 / 1e6
    assert round_latency(0.25, 4, 100, 32, 0.5, 1e6) == pytest.approx(expected)


# --------------------------------------------------------------------- offline (25)-(29)


def _offline_kwargs(T_bar: float, s: float = 0.5) -> dict[str, float | int]:
    return dict(d_plus_k_total=DK, q=32, T_bar=T_bar, bandwidth_hz=1e6, inv_gamma_sum=s)


def _brute_force(ranks: list[int], b: BoundConstants, T_bar: float, lo: float, hi: float,
                 s: float = 0.5) -> tuple[int, float]:
    """Grid search of P2 independent of Lemma 2: min Phi over feasible (r, rho)."""
    best = (np.inf, 0, 0.0)
    grid = np.linspace(lo, hi, 20001)
    for r in ranks:
        delay = (1 - grid) * r * DK * 32 * s / 1e6
        ok = grid[delay <= T_bar * (1 + 1e-12)]
        if ok.size == 0:
            continue
        vals = b.value(r, ok)
        i = int(np.argmin(vals))
        if vals[i] < best[0]:
            best = (float(vals[i]), r, float(ok[i]))
    return best[1], best[2]


def test_offline_picks_known_optimum() -> None:
    ranks = [1, 2, 4, 8, 16, 32]
    sig = np.array([2.0 / np.sqrt(r) for r in range(1, 33)])
    b = BoundConstants(kappa_R=0.5, kappa_C=0.02, kappa_E=0.4, r_star_ideal=48, sigma_bar=sig,
                       sigma_max=3.0)
    dense8 = 8 * DK * 32 * 0.5 / 1e6
    for T_bar in (0.3 * dense8, 0.6 * dense8, 2.0 * dense8):
        res = choose_rank(ranks, b, rho_min=0.1, rho_max=0.98, **_offline_kwargs(T_bar))
        r_bf, rho_bf = _brute_force(ranks, b, T_bar, 0.1, 0.98)
        assert res.r_star == r_bf
        assert res.rho0 == pytest.approx(rho_bf, abs=1e-4)
        row = res.table[res.r_star]
        assert row.feasible and row.nominal_delay <= T_bar * (1 + 1e-12)
        assert res.phi0 == min(r.phi0 for r in res.table.values() if r.feasible)


def test_offline_huge_budget_gives_rho_min() -> None:
    b = BoundConstants(sigma_bar=1.0)
    res = choose_rank([1, 2, 4, 8], b, rho_min=0.15, rho_max=0.99, **_offline_kwargs(1e9))
    assert all(row.rho == 0.15 and row.feasible for row in res.table.values())
    assert rho_star(8, rho_min=0.15, **_offline_kwargs(1e9)) == 0.15


def test_offline_rank_infeasible_above_rho_max() -> None:
    b = BoundConstants(sigma_bar=1.0)
    t_bar = 0.05 * 4 * DK * 32 * 0.5 / 1e6  # rank 4 needs rho = 0.95, rank 8 needs 0.975
    res = choose_rank([2, 4, 8], b, rho_min=0.0, rho_max=0.96, **_offline_kwargs(t_bar))
    assert res.table[4].feasible and not res.table[8].feasible
    assert res.table[4].rho == pytest.approx(0.95, abs=1e-12)


def test_offline_with_the_real_payload() -> None:
    b = BoundConstants(sigma_bar=1.0)
    kw = _offline_kwargs(0.5 * 8 * DK * 32 * 0.5 / 1e6)
    values_only = choose_rank([2, 4, 8], b, rho_min=0.0, rho_max=0.99, **kw)
    same = choose_rank([2, 4, 8], b, rho_min=0.0, rho_max=0.99, **kw,
                       payload_bits=lambda r, rho: (1 - rho) * r * DK * 32)
    for r in (2, 4, 8):  # the values-only payload reproduces eq. (29)
        assert same.table[r].rho == pytest.approx(values_only.table[r].rho, abs=1e-9)
    overhead = 20_000.0  # positions + head + framing, bits
    real = choose_rank([2, 4, 8], b, rho_min=0.0, rho_max=0.99, **kw,
                       payload_bits=lambda r, rho: (1 - rho) * r * DK * 32 + overhead)
    for r in (4, 8):  # rows that need sparsification: larger rho, nominal delay exactly T_bar
        assert real.table[r].rho > values_only.table[r].rho
        assert real.table[r].nominal_delay == pytest.approx(kw["T_bar"], rel=1e-6)


def test_offline_impossible_budget_raises() -> None:
    b = BoundConstants(sigma_bar=1.0)
    t_bar = 1e-6
    with pytest.raises(InfeasibleLatencyError, match="infeasible") as err:
        choose_rank([2, 4, 8], b, rho_min=0.0, rho_max=0.9, **_offline_kwargs(t_bar))
    msg = str(err.value)
    assert "T_bar=1e-06" in msg
    smallest = (1 - 0.9) * 2 * DK * 32 * 0.5 / 1e6
    got = float(re.search(r"delay is ([0-9.eE+-]+) s", msg).group(1))  # type: ignore[union-attr]
    assert got == pytest.approx(smallest, rel=1e-12)


def test_nominal_set_options() -> None:
    gbar = np.linspace(5.0, 25.0, 100)
    scaled = nominal_inv_gamma_sum(gbar, 10)
    assert scaled == pytest.approx(10 / 100 * np.sum(1 / gbar))
    rep = nominal_inv_gamma_sum(gbar, 10, "representative")
    idx = np.round(np.linspace(0, 99, 10)).astype(int)
    assert rep == pytest.approx(np.sum(1 / gbar[idx]))
    chosen = nominal_inv_gamma_sum(gbar, 2, "representative", [0, 99])
    assert chosen == pytest.approx(1 / 5 + 1 / 25)
    with pytest.raises(ValueError, match="num_scheduled"):
        nominal_inv_gamma_sum(gbar, 101)
    with pytest.raises(ValueError, match="mode"):
        nominal_inv_gamma_sum(gbar, 10, "median")  # type: ignore[arg-type]


def test_calibrate_recovers_known_sigmas() -> None:
    rng = np.random.default_rng(3)
    true = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25])
    exact = [rng.permutation(true) for _ in range(10)]
    cal = calibrate(exact)
    np.testing.assert_allclose(cal.sigma_bar, true)
    assert cal.sigma_max == 5.0 and cal.pilot_rank == 6 and cal.num_rounds == 10
    # noisy, 2-D rows (clients): unbiased multiplicative noise averages out
    noisy = [np.stack([rng.permutation(true) * rng.uniform(0.95, 1.05, 6) for _ in range(8)])
             for _ in range(300)]
    cal2 = calibrate(noisy)
    np.testing.assert_allclose(cal2.sigma_bar, true, rtol=0.01)
    assert cal2.sigma_max == pytest.approx(max(a.max() for a in noisy))
    assert calibrate(exact, aggregate="max").sigma_bar[0] == 5.0
    b = BoundConstants(sigma_bar=cal.sigma_bar, sigma_max=cal.sigma_max)
    assert b.sigma_bar_at(3) == 2.0


def test_calibrate_bad_input() -> None:
    with pytest.raises(ValueError, match="scores_per_round"):
        calibrate([])
    with pytest.raises(ValueError, match=r"scores_per_round\[1\]"):
        calibrate([np.ones(4), np.ones(3)])
    with pytest.raises(ValueError, match=r"scores_per_round\[0\]"):
        calibrate([np.array([1.0, np.nan])])


# ------------------------------------------------------------------ online controller (30)-(41)


@pytest.fixture(scope="module")
def scheduled_gains() -> list[np.ndarray]:
    ch = Channel(CFG, seed=3)
    rng = np.random.default_rng(7)
    return [ch.draw(t)[rng.choice(CFG.num_clients, K, replace=False)] for t in range(N_ROUNDS)]


def _t_bar(gains: list[np.ndarray], rank: int) -> float:
    ctl = TSFAController(rank, BoundConstants(), V=1.0, T_bar=1.0, d_plus_k_total=DK,
                         channel=CFG, solver="bisection")
    gam = [spectral_efficiency(g, CFG.tx_power_w, CFG.noise_w) for g in gains]
    dense = np.mean([ctl.latency_scale(float(np.sum(1 / x))) for x in gam])
    return 0.4 * float(dense)  # budget = 40 % of the mean dense-upload delay (A.12: 30-70 %)


def _run(gains: list[np.ndarray], V: float, t_bar: float, check_cvxpy_every: int = 0,
         rank: int = 8) -> TSFAController:
    b = BoundConstants()
    ctl = TSFAController(rank, b, V=V, T_bar=t_bar, d_plus_k_total=DK, channel=CFG,
                         solver="bisection", rho_min=0.0, rho_max=0.99)
    for t, g in enumerate(gains):
        q_before = ctl.backlog
        d = ctl.step(g)
        if check_cvxpy_every and t % check_cvxpy_every == 0:
            c = ctl.latency_scale(d.inv_gamma_sum)
            x = solve_p3_cvxpy(b, V, q_before, c, ctl.rho_min, ctl.rho_max)
            assert abs(x - d.rho) <= 1e-6
        ctl.observe(d.predicted_latency)
    return ctl


def test_long_run_latency_and_queue_stability(scheduled_gains: list[np.ndarray]) -> None:
    t_bar = _t_bar(scheduled_gains, 8)
    ctl = _run(scheduled_gains, V=0.3, t_bar=t_bar, check_cvxpy_every=100)
    assert ctl.rounds == N_ROUNDS
    assert ctl.average_latency <= t_bar * 1.01
    lat = np.array(ctl.history.latency)
    assert ctl.average_latency == pytest.approx(lat.mean())
    q = np.array(ctl.history.queue)
    # queue is mean-rate stable and not growing: Q_T / T small, last-quarter max ~ third-quarter max
    assert q[-1] / N_ROUNDS <= 0.01 * t_bar
    assert q[3 * N_ROUNDS // 4:].max() <= 1.1 * q[N_ROUNDS // 2: 3 * N_ROUNDS // 4].max()
    # the constraint actually binds (otherwise the test is vacuous): rho moves off rho_min
    assert np.mean(ctl.history.rho) > 0.3
    assert ctl.history.rho[0] == 0.0  # Q(0) = 0 -> rho_min


def test_long_run_tradeoff_of_v(scheduled_gains: list[np.ndarray]) -> None:
    """Lyapunov drift-plus-penalty over 2000 controller rounds (no training): the queue grows
    like O(V), the penalty gap shrinks like O(1/V) (eqs. 33-39). Measured: while the budget
    binds, the long-run mean rho is that of the fixed-rho oracle (the ratio meeting T_bar on
    average) whatever V, and larger V only buys latency over the budget."""
    t_bar = _t_bar(scheduled_gains, 8)
    probe = TSFAController(8, BoundConstants(), V=1.0, T_bar=1.0, d_plus_k_total=DK, channel=CFG,
                           solver="bisection")
    gam = [spectral_efficiency(g, CFG.tx_power_w, CFG.noise_w) for g in scheduled_gains]
    c = np.array([probe.latency_scale(float(np.sum(1 / x))) for x in gam])
    rho_oracle = 1.0 - t_bar / c.mean()  # fixed rho whose average latency is exactly T_bar
    b = BoundConstants()
    vs = (0.01, 0.1, 1.0, 10.0)
    over, backlog, mean_rho, mean_phi = [], [], [], []
    for V in vs:
        ctl = _run(scheduled_gains, V=V, t_bar=t_bar)
        rho = np.array(ctl.history.rho)
        # sample-path queue inequality: avg latency <= T_bar + Q_T / T (from eq. 30)
        assert ctl.average_latency <= t_bar + ctl.backlog / N_ROUNDS + 1e-12
        over.append(ctl.average_latency / t_bar - 1.0)
        backlog.append(ctl.backlog)
        mean_rho.append(rho.mean())
        mean_phi.append(float(np.mean(b.value(8, rho))))
    # small V: the budget holds up to O(1/T) and the queue stays small
    assert over[0] <= 0.001 and over[1] <= 0.001
    # the backlog grows with V, about linearly (x10 per decade within a factor 3)
    for lo_q, hi_q in zip(backlog, backlog[1:], strict=False):
        assert 10 / 3 < hi_q / lo_q < 30
    # overshoot grows with V; the time-average penalty falls (O(1/V) gap)
    assert over[0] < over[1] < over[2] < over[3]
    assert mean_phi[0] >= mean_phi[1] >= mean_phi[2] >= mean_phi[3]
    # the long-run mean rho does not move with V while the budget is met: it is the oracle's
    for r in mean_rho[:3]:
        assert abs(r - rho_oracle) < 0.01
    # per-round adaptation hardly beats the fixed oracle on this channel (K = 10 averages S^t)
    phi_oracle = float(b.value(8, rho_oracle))
    assert abs(mean_phi[1] / phi_oracle - 1.0) < 0.01


def test_budget_start_rule_replaces_dense_empty_queue_rounds(
        scheduled_gains: list[np.ndarray]) -> None:
    """tsfa-start = budget: every empty-queue round sends rho_budget (no dense round), so the
    latency of the first round is that of the budget; dense: rho_min (P3 with Q = 0)."""
    t_bar = _t_bar(scheduled_gains, 8)
    rho_b = 1.0 - t_bar / TSFAController(8, BoundConstants(), V=1.0, T_bar=1.0,
                                         d_plus_k_total=DK, channel=CFG).latency_scale(0.5)
    for cls in (TSFAController, OSFAController):
        kw = dict(V=0.01, T_bar=t_bar, d_plus_k_total=DK, channel=CFG, solver="bisection")
        budget = cls(8, BoundConstants(), empty_queue_rho=rho_b, **kw)
        dense = cls(8, BoundConstants(), **kw)
        seen_b, seen_d = [], []
        for g in scheduled_gains[:300]:
            for ctl, seen in ((budget, seen_b), (dense, seen_d)):
                q = ctl.backlog
                d = ctl.step(g)
                ctl.observe()
                if q == 0.0:
                    seen.append(d.rho)
        assert seen_b and all(r == pytest.approx(rho_b) for r in seen_b)
        assert seen_d and all(r == 0.0 for r in seen_d)
        lat_b, lat_d = budget.history.latency[0], dense.history.latency[0]
        assert lat_d / lat_b == pytest.approx(1.0 / (1.0 - rho_b), rel=1e-9)
        # the budget rule's worst round is far below a dense round's
        assert max(budget.history.latency) < max(dense.history.latency)


def test_p3_for_the_wire_payload_matches_a_fine_grid() -> None:
    """P3 with a nonlinear payload (bitmap -> index positions, constant head) is solved to the
    accuracy of a 20001-point grid; with the values-only payload it is the bisection's rho."""
    from fedsoft.compression.update import estimate_payload_bytes
    from fedsoft.layout import LayerSpec
    from fedsoft.wireless.controller import solve_p3_payload

    specs = [LayerSpec(f"l{i}", 8, 384, 384) for i in range(12)]

    def wire(rho: float) -> float:
        return 8.0 * estimate_payload_bytes(specs, [3840, 10], float(rho))

    b = BoundConstants(kappa_E=0.5)
    grid = np.linspace(0.0, 0.99, 20001)
    grid_bits = np.array([wire(x) for x in grid])
    for V, Q, per_bit in ((1.0, 0.5, 1e-6), (0.01, 2.0, 3e-6), (5.0, 0.1, 1e-7), (1.0, 0.0, 1e-6),
                          (0.0, 1.0, 1e-6), (0.2, 40.0, 1e-6)):
        x = solve_p3_payload(b, 8, V, Q, per_bit, wire, 0.0, 0.99)
        f = V * b.value(8, x) + Q * per_bit * wire(x)
        fg = V * np.asarray(b.value(8, grid)) + Q * per_bit * grid_bits
        assert f <= fg.min() * (1 + 1e-9) + 1e-12
        assert 0.0 <= x <= 0.99
    dk, q = 12 * 768, 32
    for V, Q, c in ((1.0, 3.0, 2.0), (50.0, 0.1, 7.0), (0.2, 40.0, 0.3)):
        per_bit = c / (8 * dk * q)
        x = solve_p3_payload(b, 8, V, Q, per_bit, lambda r: (1 - r) * 8 * dk * q, 0.0, 0.99)
        assert x == pytest.approx(solve_p3_bisection(b, V, Q, c, 0.0, 0.99), abs=1e-6)


def test_controller_plans_on_the_estimate_and_pays_the_true_latency() -> None:
    """Imperfect CSI (an open question of paper A): shares planned on the estimate equalise the
    planned delays, not the true ones; the realised round is the slowest true delay."""
    cfg = ChannelConfig(csi_error=0.3)
    ch = Channel(cfg, seed=1)
    ctl = TSFAController(8, BoundConstants(), V=0.01, T_bar=1.0, d_plus_k_total=DK, channel=cfg,
                         solver="bisection")
    worse = 0
    for t in range(50):
        idx = np.arange(t % 90, t % 90 + K)
        est, true = ch.estimate(t)[idx], ch.draw(t)[idx]
        d = ctl.step(est)
        planned = ch.fdma_delays(ctl.bits(d.rho), d.shares, est)
        assert np.ptp(planned) / planned.max() < 1e-8  # equal finish on the estimate
        realised = ch.round_delay(ctl.bits(d.rho), d.shares, true)
        worse += realised > d.predicted_latency * (1 + 1e-9)
        ctl.observe(realised)
    assert worse > 25  # the max of mis-planned delays is mostly above the plan
    assert ctl.history.latency[-1] == pytest.approx(realised)


def test_controller_state_round_trips() -> None:
    ctl = TSFAController(4, BoundConstants(), V=1.0, T_bar=0.01, d_plus_k_total=DK, channel=CFG,
                         solver="bisection")
    ch = Channel(CFG, seed=0)
    for t in range(8):
        ctl.step(ch.draw(t)[:K])
        ctl.observe()
    state = ctl.state_dict()
    fresh = TSFAController(4, BoundConstants(), V=1.0, T_bar=0.01, d_plus_k_total=DK,
                           channel=CFG, solver="bisection")
    fresh.load_state_dict(state)
    assert fresh.over_budget_rounds == ctl.over_budget_rounds > 0
    assert fresh.average_floor_latency == pytest.approx(ctl.average_floor_latency)
    assert fresh.budget_out_of_reach() == ctl.budget_out_of_reach() is not None
    assert "out of reach" in str(ctl.budget_out_of_reach())


def test_controller_decision_fields_and_payload_fn(scheduled_gains: list[np.ndarray]) -> None:
    ctl = TSFAController(4, BoundConstants(), V=1.0, T_bar=0.05, d_plus_k_total=DK, channel=CFG)
    assert ctl.solver_used.startswith("cvxpy")
    d0 = ctl.step(scheduled_gains[0])
    assert d0.rho == 0.0 and d0.queue == 0.0
    ctl.observe()  # predicted latency used
    assert ctl.backlog == pytest.approx(max(d0.predicted_latency - 0.05, 0.0))
    overhead = 1.1  # e.g. 10 % index overhead of the wire format

    def wire_bits(rho: float) -> float:
        return overhead * (1 - rho) * 4 * DK * CFG.bits_per_value

    d1 = ctl.step(scheduled_gains[1], payload_bits_fn=wire_bits)
    assert d1.shares.sum() == pytest.approx(1.0)
    assert d1.model_latency == pytest.approx(
        round_latency(d1.rho, 4, DK, CFG.bits_per_value, d1.inv_gamma_sum, CFG.bandwidth_hz))
    assert d1.predicted_latency == pytest.approx(overhead * d1.model_latency, rel=1e-9)
    assert d1.payload_bits == pytest.approx(wire_bits(d1.rho))
    with pytest.raises(RuntimeError, match="observe"):
        ctl.step(scheduled_gains[2])
    ctl.observe(0.5)
    assert ctl.average_latency == pytest.approx((d0.predicted_latency + 0.5) / 2)


def test_controller_from_offline_and_osfa() -> None:
    ch = Channel(CFG, seed=0)
    b = BoundConstants(sigma_bar=np.linspace(2.0, 0.5, 32), r_star_ideal=40, kappa_C=0.01)
    res = choose_rank_for_channel(ch, K, [1, 2, 4, 8, 16, 32], b, d_plus_k_total=DK, T_bar=0.5,
                                  rho_min=0.05)
    ctl = TSFAController.from_offline(res, b, V=1.0, d_plus_k_total=DK, channel=CFG)
    assert ctl.rank == res.r_star and ctl.T_bar == 0.5 and ctl.mode == "tsfa"
    osfa = OSFAController(32, b, V=1.0, T_bar=0.5, d_plus_k_total=DK, channel=CFG,
                          solver="closed_form")
    assert osfa.mode == "osfa" and osfa.rank == 32
    g = ch.draw(0)[:K]
    assert osfa.step(g).rho == osfa.rho_min  # Q(0) = 0


def test_controller_bad_args() -> None:
    b = BoundConstants()
    kw = dict(V=1.0, T_bar=1.0, d_plus_k_total=DK, channel=CFG)
    with pytest.raises(ValueError, match="solver"):
        TSFAController(4, b, solver="newton", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rho_max"):
        TSFAController(4, b, rho_min=0.5, rho_max=0.4, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank"):
        TSFAController(0, b, **kw)  # type: ignore[arg-type]
    ctl = TSFAController(4, b, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gains"):
        ctl.step(np.zeros((2, 2)))
    with pytest.raises(RuntimeError, match="step"):
        ctl.observe(1.0)


# ------------------------------------------------------------- plan from the run config


MINILM = ([(f"encoder.layer.{i // 2}.attention.self.{'qv'[i % 2]}", 384, 384)
           for i in range(12)], [384 * 10, 10])
VIT = ([(f"blocks.{i // 2}.attn.{'qv'[i % 2]}", 768, 768) for i in range(8)], [768 * 100, 100])


def _plan(shape, n: int, **over: object):
    import warnings as _w
    from pathlib import Path

    from fedsoft.config import resolve
    from fedsoft.wireless import plan as tsfa_plan

    cfg = resolve(over, Path(__file__).resolve().parents[1] / "conf")
    dims, heads = shape
    with _w.catch_warnings():
        _w.simplefilter("error")  # the wire payload is given: no values-only warning
        return tsfa_plan.plan(cfg, n, sum(d + k for _, d, k in dims),
                              tsfa_plan.payload_bits_fn(cfg, dims, heads)), cfg


@pytest.mark.parametrize("preset, shape, n", [("quickstart", MINILM, 4), ("ci", MINILM, 3),
                                              ("offline-text", MINILM, 10),
                                              ("paper-vit-cifar100", VIT, 100)])
@pytest.mark.parametrize("strategy", ["tsfa", "osfa"])
def test_every_preset_is_feasible_by_default(preset, shape, n, strategy) -> None:
    p, cfg = _plan(shape, n, preset=preset, strategy=strategy)
    assert float(cfg["latency-budget"]) == 0  # the default: a fraction of the dense round
    assert p.T_bar == pytest.approx(float(cfg["latency-budget-fraction"]) * p.dense_nominal_s)
    assert p.payload_model == "wire" and p.controller.payload_bits is not None
    # the empty-queue ratio meets the budget on the nominal channel, and only just
    from fedsoft.wireless.offline_rank import nominal_seconds_per_bit
    _, per_bit = nominal_seconds_per_bit(p.channel, min(int(cfg["clients-per-round"]), n))
    assert p.controller.bits(p.start_rho) * per_bit <= p.T_bar * (1 + 1e-9)
    if p.start_rho > p.controller.rho_min:
        assert p.controller.bits(p.start_rho - 1e-3) * per_bit > p.T_bar
    if strategy == "tsfa":
        assert p.start_rho == pytest.approx(p.offline.rho0)


@pytest.mark.parametrize("key", ["latency-budget-fraction", "latency-budget"])
def test_infeasible_budget_states_the_smallest_feasible_one(key: str) -> None:
    from fedsoft.config import ConfigError

    for strategy in ("tsfa", "osfa"):
        with pytest.raises(ConfigError) as err:
            _plan(VIT, 100, preset="paper-vit-cifar100", strategy=strategy, **{key: 1e-3})
        msg = str(err.value)
        assert f"'{key}' = 0.001" in msg and "infeasible" in msg
        smallest = float(re.search(rf"smallest feasible budget is {key} = "
                                   r"([0-9.eE+-]+)", msg).group(1))  # type: ignore[union-attr]
        ok, _ = _plan(VIT, 100, preset="paper-vit-cifar100", strategy=strategy,
                      **{key: smallest * 1.001})
        assert ok.controller.rho_max == 0.99
        with pytest.raises(ConfigError):
            _plan(VIT, 100, preset="paper-vit-cifar100", strategy=strategy,
                  **{key: smallest * 0.99})


def test_latency_budget_in_seconds_keeps_its_meaning() -> None:
    """``latency-budget`` > 0 is T_bar in seconds, as before the fraction existed."""
    p, _ = _plan(MINILM, 10, preset="offline-text", strategy="tsfa",
                 **{"latency-budget": 7.5, "latency-budget-fraction": 0.01})
    assert p.T_bar == 7.5


def test_start_rule_is_the_same_for_tsfa_and_osfa() -> None:
    for start in ("budget", "dense"):
        t, _ = _plan(MINILM, 10, preset="offline-text", strategy="tsfa", **{"tsfa-start": start})
        o, _ = _plan(MINILM, 10, preset="offline-text", strategy="osfa",
                     **{"tsfa-start": start, "lora-rank": t.rank})
        g = t.channel.draw(1)[:5]
        rt, ro = t.controller.step(g).rho, o.controller.step(g).rho
        assert rt == ro
        assert (rt == t.controller.rho_min) == (start == "dense")


def test_values_payload_model_reproduces_eq29() -> None:
    p, cfg = _plan(MINILM, 10, preset="offline-text", strategy="tsfa",
                   **{"payload-model": "values", "path-loss-model": "paper",
                      "bandwidth-noise": "total", "noise-figure-db": 0.0,
                      "latency-budget": 0.15})
    assert p.controller.payload_bits is None and p.controller.solver_used.startswith("cvxpy")
    s = nominal_inv_gamma_sum(p.channel.spectral_eff(p.channel.mean_gains()), 5)
    for r, row in p.offline.table.items():
        expect = rho_star(r, d_plus_k_total=12 * 768, q=32, T_bar=0.15, bandwidth_hz=1e6,
                          inv_gamma_sum=s)
        assert row.rho == pytest.approx(expect, abs=1e-12)


# ------------------------------------------------- outage rule (PROPOSED, not in paper A)


def _outage_setup(factor: float | None, **kw: object) -> tuple[TSFAController, Channel]:
    """Controller on the default log-distance channel, T_bar = half the nominal dense round of
    the first K clients (values-only payload), deadline factor ``factor``."""
    from fedsoft.wireless.channel import equal_finish

    cfg = ChannelConfig()
    ch = Channel(cfg, seed=0)
    s, _ = equal_finish(cfg.full_band_snr(ch.mean_gains()[:K]), cfg.bandwidth_noise)
    t_bar = 0.5 * 8 * DK * cfg.bits_per_value * s / cfg.bandwidth_hz
    ctl = TSFAController(8, BoundConstants(), V=0.01, T_bar=t_bar, d_plus_k_total=DK,
                         channel=cfg, solver="bisection", deadline_factor=factor,
                         empty_queue_rho=0.5, **kw)  # type: ignore[arg-type]
    return ctl, ch


def test_outage_drops_a_deep_fade_and_the_round_meets_the_deadline() -> None:
    from fedsoft.wireless.controller import deadline_latency

    gains = Channel(ChannelConfig(), seed=0).mean_gains()[:K].copy()
    gains[2] *= 1e-4  # a -40 dB fade
    off, ch = _outage_setup(None)
    d_off = off.step(gains)
    lat_off = off.bits(d_off.rho) * float(np.max(ch.fdma_delays(1.0, d_off.shares, gains)))
    ctl, _ = _outage_setup(2.0)
    d = ctl.step(gains)
    dl = 2.0 * ctl.T_bar
    assert d.deadline_s == ctl.deadline_s == pytest.approx(dl)
    assert lat_off > dl  # paper A waits for the fade: far over the deadline
    assert d.active is not None and not d.active[2] and d.outage == K - int(d.active.sum()) >= 1
    assert np.all(d.shares[~d.active] == 0.0) and d.shares.sum() == pytest.approx(1.0, abs=1e-12)
    delays = ch.fdma_delays(ctl.bits(d.rho), d.shares[d.active], gains[d.active])
    latency, late = deadline_latency(delays, d.deadline_s)
    assert not late.any() and latency <= dl * (1 + 1e-9)
    assert d.predicted_latency == pytest.approx(latency, rel=1e-9)
    ctl.observe(latency)
    assert ctl.outage_total == d.outage and ctl.outage_rate == pytest.approx(d.outage / K)


def test_outage_with_factor_one_keeps_every_round_within_the_budget() -> None:
    """F = 1 with perfect CSI: no round exceeds T_bar, so Q stays 0 and rho is the start rule's
    ratio every round; the deep fades are the price (outage > 0)."""
    ctl, ch = _outage_setup(1.0)
    rng = np.random.default_rng(1)
    for t in range(300):
        idx = rng.choice(ch.config.num_clients, K, replace=False)
        g = ch.draw(t)[idx]
        d = ctl.step(g)
        ctl.observe(ctl.bits(d.rho) * float(np.max(
            ch.fdma_delays(1.0, d.shares[d.active], g[d.active]))))
    assert max(ctl.history.latency) <= ctl.T_bar * (1 + 1e-9)
    assert ctl.backlog == 0.0 and set(ctl.history.rho) == {0.5}
    assert 0.0 < ctl.outage_rate < 1.0 and ctl.scheduled_total == 300 * K


def test_outage_off_is_paper_a_bit_for_bit() -> None:
    """deadline_factor None leaves the decision as before (no mask, no outage, D = inf) and a
    deadline that nobody misses gives the same rho, shares and latencies bit for bit."""
    off, ch = _outage_setup(None)
    wide, _ = _outage_setup(1e9)
    rng = np.random.default_rng(2)
    for t in range(200):
        g = ch.draw(t)[rng.choice(ch.config.num_clients, K, replace=False)]
        a, b = off.step(g), wide.step(g)
        assert a.active is None and a.outage == 0 and a.deadline_s == math.inf
        assert b.active is not None and b.active.all() and b.outage == 0
        assert a.rho == b.rho and np.array_equal(a.shares, b.shares)
        assert a.predicted_latency == b.predicted_latency
        off.observe()
        wide.observe()
    assert off.history.latency == wide.history.latency and off.history.rho == wide.history.rho
    assert off.outage_total == 0


def test_deadline_latency_caps_late_uploads_at_the_deadline() -> None:
    from fedsoft.wireless.controller import deadline_latency

    lat, late = deadline_latency([1.0, 2.0, 5.0], 3.0)  # imperfect CSI: one client misses D
    assert lat == 3.0 and late.tolist() == [False, False, True]
    lat, late = deadline_latency([1.0, 2.0], 3.0)
    assert lat == 2.0 and not late.any()
    assert deadline_latency([1.0, 7.0], math.inf)[0] == 7.0  # no rule: the slowest client


def test_outage_counters_survive_a_checkpoint() -> None:
    import json

    ctl, ch = _outage_setup(1.5)
    for t in range(30):
        ctl.step(ch.draw(t)[:K])
        ctl.observe()
    state = json.loads(json.dumps(ctl.state_dict()))
    fresh, _ = _outage_setup(1.5)
    fresh.load_state_dict(state)
    assert (fresh.outage_total, fresh.scheduled_total) == (ctl.outage_total, 30 * K)
    a, b = ctl.step(ch.draw(30)[:K]), fresh.step(ch.draw(30)[:K])
    assert a.rho == b.rho and np.array_equal(a.active, b.active)
