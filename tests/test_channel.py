"""Tests of the wireless channel model (fedsoft.wireless.channel, paper A section A.3 / eq. 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsoft.wireless.channel import (
    Channel,
    ChannelConfig,
    deadline_admission,
    equal_finish,
    fdma_delays,
    model_payload_bits,
    noise_power_from_psd,
    path_loss_db,
    payload_bits,
    round_delay,
    share_for_rate,
    snr_line,
    spectral_efficiency,
)


def test_same_seed_same_draws_and_order_independent() -> None:
    cfg = ChannelConfig(num_clients=20)
    a, b = Channel(cfg, seed=11), Channel(cfg, seed=11)
    np.testing.assert_array_equal(a.distances_m, b.distances_m)
    late_first = [a.draw(7), a.draw(2)]
    early_first = [b.draw(2), b.draw(7)]
    np.testing.assert_array_equal(late_first[0], early_first[1])
    np.testing.assert_array_equal(late_first[1], early_first[0])
    assert not np.array_equal(a.draw(2), a.draw(3))
    c = Channel(cfg, seed=12)
    assert not np.array_equal(a.distances_m, c.distances_m)
    assert not np.array_equal(a.draw(2), c.draw(2))


@pytest.mark.parametrize("law", ["uniform", "area"])
def test_distances_within_range(law: str) -> None:
    cfg = ChannelConfig(num_clients=500, min_distance_m=20.0, max_distance_m=80.0, distance_law=law)
    d = Channel(cfg, seed=0).distances_m
    assert d.shape == (500,)
    assert d.min() >= 20.0 and d.max() <= 80.0


def test_rayleigh_mean_matches_path_loss() -> None:
    cfg = ChannelConfig.paper(num_clients=50, path_loss_exponent=3.2)
    ch = Channel(cfg, seed=5)
    n = 4000
    draws = np.stack([ch.draw(t) for t in range(n)])
    mean_gain = ch.distances_m ** (-cfg.path_loss_exponent)
    np.testing.assert_allclose(ch.mean_gains(), mean_gain)
    normalised = draws / mean_gain  # |g|^2 ~ Exp(1): mean 1, std 1
    tol = 5.0 / math.sqrt(n)  # 5 standard errors of the sample mean
    assert np.all(np.abs(normalised.mean(axis=0) - 1.0) < tol)
    pooled = normalised.ravel()
    assert abs(pooled.var() - 1.0) < 10.0 / math.sqrt(pooled.size)
    assert np.all(draws > 0.0)


def test_spectral_efficiency_and_noise() -> None:
    cfg = ChannelConfig.paper(num_clients=8, bandwidth_hz=2.0e6, tx_power_w=0.2)
    ch = Channel(cfg, seed=1)
    sigma2 = 1e-3 * 10 ** (-174.0 / 10) * 2.0e6
    assert ch.noise_w == pytest.approx(sigma2, rel=1e-12)
    assert noise_power_from_psd(-174.0, 2.0e6) == pytest.approx(sigma2, rel=1e-12)
    h = ch.draw(0)
    np.testing.assert_allclose(ch.spectral_eff(h), np.log2(1 + 0.2 * h / sigma2), rtol=1e-12)
    explicit = ChannelConfig(noise_power_w=1e-12)
    assert explicit.noise_w == 1e-12


def test_fdma_delays_eq6() -> None:
    cfg = ChannelConfig.paper(num_clients=4, bandwidth_hz=1.0e6)
    ch = Channel(cfg, seed=2)
    h = ch.draw(0)
    shares = np.array([0.1, 0.2, 0.3, 0.4])
    bits = np.array([1e5, 2e5, 3e5, 4e5])
    gam = np.log2(1 + cfg.tx_power_w * h / cfg.noise_w)
    expected = bits / (shares * cfg.bandwidth_hz * gam)
    np.testing.assert_allclose(ch.fdma_delays(bits, shares, h), expected, rtol=1e-12)
    assert ch.round_delay(bits, shares, h) == pytest.approx(expected.max(), rel=1e-12)
    # a_i = 0 (no payload, no share) -> zero delay; payload with zero share -> infinite delay
    d = fdma_delays(np.array([0.0, 1e3]), np.array([0.0, 1.0]), np.array([5.0, 5.0]), 1e6)
    assert d[0] == 0.0 and d[1] == pytest.approx(1e3 / 5e6)
    assert math.isinf(round_delay(1e3, np.array([0.0, 1.0]), np.array([5.0, 5.0]), 1e6))


def test_payload_helpers() -> None:
    assert payload_bits(1000, 16) == 16000
    assert model_payload_bits(0.75, 4, 100, 32) == pytest.approx(0.25 * 4 * 100 * 32)
    with pytest.raises(ValueError, match="num_values"):
        payload_bits(-1, 8)
    with pytest.raises(ValueError, match="rho"):
        model_payload_bits(1.5, 4, 100, 32)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_clients", 0),
        ("min_distance_m", -1.0),
        ("max_distance_m", 10.0),
        ("path_loss_exponent", 0.0),
        ("tx_power_w", float("nan")),
        ("bandwidth_hz", -5.0),
        ("noise_power_w", 0.0),
        ("bits_per_value", 0),
        ("distance_law", "gauss"),
        ("noise_psd_dbm_per_hz", float("inf")),
        ("path_loss_model", "okumura"),
        ("shadowing_db", -1.0),
        ("noise_figure_db", -3.0),
        ("bandwidth_noise", "half"),
        ("csi_error", float("nan")),
        ("ref_distance_m", 0.0),
    ],
)
def test_bad_config_names_field(field: str, value: object) -> None:
    with pytest.raises((ValueError, TypeError), match=field):
        ChannelConfig(**{field: value})


def test_bad_inputs_raise() -> None:
    ch = Channel(ChannelConfig(num_clients=3), seed=0)
    with pytest.raises(ValueError, match="round_idx"):
        ch.draw(-1)
    with pytest.raises(ValueError, match="shares"):
        ch.fdma_delays(1e3, np.array([0.6, 0.6, 0.1]), ch.draw(0))
    with pytest.raises(ValueError, match="gains"):
        spectral_efficiency(np.array([1.0, -1.0]), 0.1, 1e-12)
    with pytest.raises(ValueError, match="payload_bits"):
        fdma_delays(np.array([1.0, 2.0]), np.array([0.5, 0.2, 0.3]), np.ones(3), 1e6)
    with pytest.raises(TypeError, match="config"):
        Channel({"num_clients": 3})  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(
    st.floats(1e2, 1e7), st.floats(1e4, 1e8), st.integers(1, 6), st.integers(0, 10_000)
)
def test_delay_scales_with_payload_and_bandwidth(
    bits: float, bw: float, k: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    gam = rng.uniform(0.5, 20.0, size=k)
    shares = rng.dirichlet(np.ones(k))
    base = round_delay(bits, shares, gam, bw)
    assert round_delay(2 * bits, shares, gam, bw) == pytest.approx(2 * base, rel=1e-12)
    assert round_delay(bits, shares, gam, 2 * bw) == pytest.approx(base / 2, rel=1e-12)


# ----------------------------------------------------- path loss, shadowing, noise, CSI (A.3)


def test_path_loss_models_follow_their_formulas() -> None:
    d = np.array([10.0, 50.0, 300.0, 1000.0])
    ld = path_loss_db(d, "log-distance", exponent=3.0, ref_loss_db=40.0, ref_distance_m=2.0)
    np.testing.assert_allclose(ld, 40.0 + 30.0 * np.log10(d / 2.0), rtol=1e-12)
    np.testing.assert_allclose(path_loss_db(d, "3gpp-uma"), 128.1 + 37.6 * np.log10(d / 1e3))
    # the paper's model: gain D^-kappa, i.e. 10 kappa log10(D) dB, bit-exact as before
    cfg = ChannelConfig.paper(num_clients=30)
    ch = Channel(cfg, seed=4)
    np.testing.assert_array_equal(ch.mean_gains(), ch.distances_m ** -cfg.path_loss_exponent)
    np.testing.assert_allclose(-10 * np.log10(ch.mean_gains()),
                               path_loss_db(ch.distances_m, "paper"), rtol=1e-12)


def test_default_snrs_are_those_of_a_cell() -> None:
    """Stated assumption of the defaults: mean SNR from about 0 dB at the edge to 40 dB near the
    centre with an equal share of K = 10; the formula of the docstring, recomputed here."""
    cfg = ChannelConfig(num_clients=200)
    ch = Channel(cfg, seed=0)
    snr = ch.mean_snr_db(0.1)
    noise_dbm = cfg.noise_psd_dbm_per_hz + 10 * np.log10(0.1 * cfg.bandwidth_hz) + 7.0
    expect = 10 * np.log10(cfg.tx_power_w * 1e3) - path_loss_db(ch.distances_m) - noise_dbm
    np.testing.assert_allclose(snr, expect, rtol=1e-9)
    edge = 10 * np.log10(1e3 * cfg.tx_power_w) - path_loss_db(300.0) - noise_dbm
    centre = 10 * np.log10(1e3 * cfg.tx_power_w) - path_loss_db(50.0) - noise_dbm
    assert 0.0 <= float(edge) <= 10.0 and 30.0 <= float(centre) <= 40.0
    assert snr.min() >= float(edge) - 1e-9 and snr.max() <= float(centre) + 1e-9
    # the paper's model over the same distances is 40+ dB hotter: the spread of the rates is
    # what heterogeneity means (max/min spectral efficiency at the equal share)
    paper = Channel(ChannelConfig.paper(num_clients=200), seed=0)
    s_new, s_paper = ch.snr_summary(10), paper.snr_summary(10)
    assert s_paper["snr_db_min"] > s_new["snr_db_max"]
    assert s_new["rate_spread"] > 2.0 * s_paper["rate_spread"]
    assert snr_line(s_new).startswith("SNR (dB): min ")
    assert f"median {s_new['snr_db_median']:.1f}" in snr_line(s_new)


def test_shadowing_is_per_client_fixed_and_log_normal() -> None:
    base = Channel(ChannelConfig(num_clients=4000), seed=2)
    sh = Channel(ChannelConfig(num_clients=4000, shadowing_db=8.0), seed=2)
    np.testing.assert_array_equal(base.distances_m, sh.distances_m)  # separate stream
    x = sh.path_loss_db - base.path_loss_db
    np.testing.assert_allclose(x, sh.shadowing_db, atol=1e-9)
    assert abs(x.std() - 8.0) < 5 * 8.0 / np.sqrt(2 * x.size) and abs(x.mean()) < 5 * 8.0 / 63
    # fixed across rounds: the fading-normalised gains of two rounds share the mean gain
    np.testing.assert_allclose(sh.draw(1) / sh.mean_gains(), base.draw(1) / base.mean_gains())
    np.testing.assert_array_equal(sh.shadowing_db, Channel(sh.config, seed=2).shadowing_db)


def test_allocated_noise_scales_with_the_share() -> None:
    cfg = ChannelConfig(num_clients=6)
    ch = Channel(cfg, seed=1)
    h = ch.draw(0)
    n0 = noise_power_from_psd(cfg.noise_psd_dbm_per_hz, cfg.bandwidth_hz) * 10 ** 0.7
    assert cfg.noise_w == pytest.approx(n0, rel=1e-12)
    b = np.array([0.05, 0.1, 0.15, 0.2, 0.2, 0.3])
    np.testing.assert_allclose(ch.spectral_eff(h, b),
                               np.log2(1 + cfg.tx_power_w * h / (n0 * b)), rtol=1e-12)
    total = Channel(ChannelConfig(num_clients=6, bandwidth_noise="total"), seed=1)
    np.testing.assert_allclose(total.spectral_eff(h, b), total.spectral_eff(h), rtol=1e-12)
    # a smaller share has less noise: its rate per Hz of share is higher
    assert np.all(ch.spectral_eff(h, b) > total.spectral_eff(h, b))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-3, 1e5), min_size=1, max_size=12), st.floats(1e3, 1e7))
def test_equal_finish_equalises_delays_under_allocated_noise(snr: list[float], bits: float
                                                             ) -> None:
    a = np.array(snr)
    cfg = ChannelConfig.paper(num_clients=a.size, bandwidth_noise="allocated",
                              noise_power_w=1.0, tx_power_w=1.0)
    s, b = equal_finish(a, "allocated")
    assert abs(b.sum() - 1.0) < 1e-12 and np.all(b > 0)
    d = fdma_delays(bits, b, cfg.spectral_eff_at(a, b), cfg.bandwidth_hz)
    assert (d.max() - d.min()) / d.max() < 1e-8
    assert d.max() == pytest.approx(bits * s / cfg.bandwidth_hz, rel=1e-8)
    # eq. (41)'s closed form does not equalise them any more, and the total-noise S is larger
    s_tot, b41 = equal_finish(a, "total")
    assert s <= s_tot * (1 + 1e-12)
    if a.size > 1 and np.ptp(a) > 0.1 * a.min():
        d41 = fdma_delays(bits, b41, cfg.spectral_eff_at(a, b41), cfg.bandwidth_hz)
        assert d41.max() > d.max() * (1 + 1e-9)


def test_equal_finish_total_is_eq41_and_weights_scale() -> None:
    a = np.array([3.0, 30.0, 300.0])
    s, b = equal_finish(a, "total")
    gam = np.log2(1 + a)
    assert s == pytest.approx(np.sum(1 / gam)) and np.allclose(b, (1 / gam) / np.sum(1 / gam))
    s_w, _ = equal_finish(a, "total", weights=np.full(3, 0.5))
    assert s_w == pytest.approx(0.5 * s)
    y = np.array([0.01, 1.0, 5.0])
    got = share_for_rate(np.full(3, 100.0), y)
    np.testing.assert_allclose(got * np.log2(1 + 100.0 / got), y, rtol=1e-12)
    assert np.isinf(share_for_rate(np.array([1.0]), 2.0 / np.log(2.0)))[0]  # beyond a / ln 2


def test_imperfect_csi_estimate() -> None:
    perfect = Channel(ChannelConfig(num_clients=2000), seed=5)
    np.testing.assert_array_equal(perfect.estimate(3), perfect.draw(3))
    eps = 0.3
    noisy = Channel(ChannelConfig(num_clients=2000, csi_error=eps), seed=5)
    np.testing.assert_array_equal(noisy.draw(3), perfect.draw(3))  # true gains unchanged
    est, true = noisy.estimate(3), noisy.draw(3)
    np.testing.assert_array_equal(est, noisy.estimate(3))
    # LS estimate g + eps w: E|g_hat|^2 = (1 + eps^2) E[h]
    ratio = est / noisy.mean_gains()
    assert abs(ratio.mean() - (1 + eps**2)) < 5 * (1 + eps**2) / np.sqrt(ratio.size)
    assert np.median(np.abs(est / true - 1.0)) > 0.05  # the server plans on other gains


@pytest.mark.parametrize("mode", ["allocated", "total"])
def test_deadline_admission_drops_deep_fades_and_the_rest_meet_the_deadline(mode) -> None:
    """PROPOSED outage rule: a -30 dB fade cannot make the deadline; the kept clients' equal-
    finish delay (eqs. 27-28, 41) is within it, and adding back the weakest dropped one breaks
    it (the kept set is the largest one)."""
    cfg = ChannelConfig(bandwidth_noise=mode)
    ch = Channel(cfg, seed=0)
    gains = ch.mean_gains()[:10].copy()
    gains[3] *= 1e-3  # a deep fade
    a = cfg.full_band_snr(gains)
    bits = 1.0e6
    s_all, _ = equal_finish(a, mode)
    deadline = 0.5 * bits * s_all / cfg.bandwidth_hz  # half of everyone's equal-finish delay
    keep = deadline_admission(a, bits, deadline, cfg.bandwidth_hz, mode)
    assert not keep[3] and 0 < keep.sum() < 10
    s_kept, b = equal_finish(a[keep], mode)
    assert b.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.max(ch.fdma_delays(bits, b, gains[keep])) <= deadline * (1 + 1e-9)
    weakest_out = np.flatnonzero(~keep)[np.argmax(a[~keep])]
    more = keep.copy()
    more[weakest_out] = True
    assert bits * equal_finish(a[more], mode)[0] / cfg.bandwidth_hz > deadline
    # a generous deadline keeps everyone; an impossible one keeps only the strongest client
    assert deadline_admission(a, bits, 1e3 * deadline, cfg.bandwidth_hz, mode).all()
    only = deadline_admission(a, bits, 1e-9, cfg.bandwidth_hz, mode)
    assert only.sum() == 1 and only[np.argmax(a)]
