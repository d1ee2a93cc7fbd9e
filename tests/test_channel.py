"""Tests of the wireless channel model (fedsoft.channel, paper A section A.3 / eq. 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsoft.channel import (
    Channel,
    ChannelConfig,
    fdma_delays,
    model_payload_bits,
    noise_power_from_psd,
    payload_bits,
    round_delay,
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
    cfg = ChannelConfig(num_clients=50, path_loss_exponent=3.2)
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
    cfg = ChannelConfig(num_clients=8, bandwidth_hz=2.0e6, tx_power_w=0.2)
    ch = Channel(cfg, seed=1)
    sigma2 = 1e-3 * 10 ** (-174.0 / 10) * 2.0e6
    assert ch.noise_w == pytest.approx(sigma2, rel=1e-12)
    assert noise_power_from_psd(-174.0, 2.0e6) == pytest.approx(sigma2, rel=1e-12)
    h = ch.draw(0)
    np.testing.assert_allclose(ch.spectral_eff(h), np.log2(1 + 0.2 * h / sigma2), rtol=1e-12)
    explicit = ChannelConfig(noise_power_w=1e-12)
    assert explicit.noise_w == 1e-12


def test_fdma_delays_eq6() -> None:
    cfg = ChannelConfig(num_clients=4, bandwidth_hz=1.0e6)
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
