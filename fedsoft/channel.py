"""Uplink model of paper A: path loss, Rayleigh block fading, FDMA delays (A.3, eq. 6)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedsoft.checks import positive as _check_positive
from fedsoft.checks import real as _check_real

__all__ = [
    "ChannelConfig",
    "Channel",
    "spectral_efficiency",
    "fdma_delays",
    "round_delay",
    "payload_bits",
    "model_payload_bits",
    "noise_power_from_psd",
]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _as_array(
    name: str, value: object, *, positive: bool = False, nonneg: bool = False
) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and np.any(arr <= 0.0):
        raise ValueError(f"{name} must be > 0 everywhere, got {value!r}")
    if nonneg and np.any(arr < 0.0):
        raise ValueError(f"{name} must be >= 0 everywhere, got {value!r}")
    return arr


def noise_power_from_psd(psd_dbm_per_hz: float, bandwidth_hz: float) -> float:
    """Noise power in W of a PSD in dBm/Hz over ``bandwidth_hz`` (A.12: -174 dBm/Hz x B_tot)."""
    psd = _check_real("noise_psd_dbm_per_hz", psd_dbm_per_hz)
    bw = _check_positive("bandwidth_hz", bandwidth_hz)
    return 10.0 ** ((psd - 30.0) / 10.0) * bw


@dataclass(frozen=True)
class ChannelConfig:
    """Uplink parameters of paper A (A.3); defaults follow A.12's suggestions, not the paper.

    Attributes:
        num_clients: N, number of clients (paper: 100).
        min_distance_m, max_distance_m: range of client-server distances D_i in metres.
        distance_law: how D_i is drawn: ``"uniform"`` (uniform in [min, max]) or ``"area"``
            (uniform over the annulus area, i.e. D = sqrt(U(min^2, max^2))). PROPOSED-L.
        path_loss_exponent: kappa in h = |g|^2 D^-kappa (dimensionless).
        tx_power_w: P_i, transmit power in W (same for every client).
        bandwidth_hz: B_tot, total uplink bandwidth in Hz shared by FDMA.
        noise_psd_dbm_per_hz: noise PSD in dBm/Hz used when ``noise_power_w`` is None;
            the noise power is then PSD x B_tot (fixed, independent of the client's share b_i,
            as eq. 41 requires).
        noise_power_w: explicit AWGN power sigma^2 in W (overrides the PSD when given).
        bits_per_value: q, bits per transmitted model value.
    """

    num_clients: int = 100
    min_distance_m: float = 50.0
    max_distance_m: float = 300.0
    distance_law: Literal["uniform", "area"] = "uniform"
    path_loss_exponent: float = 3.5
    tx_power_w: float = 0.1
    bandwidth_hz: float = 1.0e6
    noise_psd_dbm_per_hz: float = -174.0
    noise_power_w: float | None = None
    bits_per_value: int = 32

    def __post_init__(self) -> None:
        _check_int("num_clients", self.num_clients, 1)
        dmin = _check_positive("min_distance_m", self.min_distance_m)
        dmax = _check_positive("max_distance_m", self.max_distance_m)
        if dmax < dmin:
            raise ValueError(
                f"max_distance_m must be >= min_distance_m={self.min_distance_m!r}, "
                f"got {self.max_distance_m!r}"
            )
        if self.distance_law not in ("uniform", "area"):
            raise ValueError(
                f"distance_law must be 'uniform' or 'area', got {self.distance_law!r}"
            )
        _check_positive("path_loss_exponent", self.path_loss_exponent)
        _check_positive("tx_power_w", self.tx_power_w)
        _check_positive("bandwidth_hz", self.bandwidth_hz)
        _check_real("noise_psd_dbm_per_hz", self.noise_psd_dbm_per_hz)
        if self.noise_power_w is not None:
            _check_positive("noise_power_w", self.noise_power_w)
        _check_int("bits_per_value", self.bits_per_value, 1)

    @property
    def noise_w(self) -> float:
        """AWGN power sigma^2 in W: ``noise_power_w`` if given, else PSD x ``bandwidth_hz``."""
        if self.noise_power_w is not None:
            return float(self.noise_power_w)
        return noise_power_from_psd(self.noise_psd_dbm_per_hz, self.bandwidth_hz)


def spectral_efficiency(gains: object, tx_power_w: float, noise_power_w: float) -> np.ndarray:
    """Gamma_i = log2(1 + P h_i / sigma^2) in bit/s/Hz (rate formula of A.3, eq. 41 denominator)."""
    h = _as_array("gains", gains, nonneg=True)
    p = _check_positive("tx_power_w", tx_power_w)
    s2 = _check_positive("noise_power_w", noise_power_w)
    return np.log2(1.0 + p * h / s2)


def fdma_delays(
    payload_bits: object, shares: object, spectral_eff: object, bandwidth_hz: float
) -> np.ndarray:
    """Per-client uplink delay of eq. (6): T_i = bits_i / (b_i B_tot log2(1 + P h_i / sigma^2)).

    ``payload_bits`` is a scalar (same for every client) or one value per client, in bits;
    ``shares`` are the bandwidth fractions b_i; ``spectral_eff`` the Gamma_i values. A client
    with zero payload has zero delay (a_i = 0 in eq. 6); a client with payload but zero share
    (or zero spectral efficiency) has infinite delay.
    """
    b = _as_array("shares", shares, nonneg=True)
    g = _as_array("spectral_eff", spectral_eff, nonneg=True)
    bits = _as_array("payload_bits", payload_bits, nonneg=True)
    bw = _check_positive("bandwidth_hz", bandwidth_hz)
    if b.shape != g.shape:
        raise ValueError(f"shares shape {b.shape} must match spectral_eff shape {g.shape}")
    if bits.ndim == 1 and bits.shape != b.shape:
        raise ValueError(f"payload_bits shape {bits.shape} must be scalar or match {b.shape}")
    if float(b.sum()) > 1.0 + 1e-9:
        raise ValueError(f"shares must sum to <= 1 (eq. 24e), got sum {float(b.sum())!r}")
    bits = np.broadcast_to(bits, b.shape)
    rate = b * bw * g
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(bits > 0.0, bits / rate, 0.0)
    return np.where((bits > 0.0) & (rate <= 0.0), np.inf, out)


def round_delay(
    payload_bits: object, shares: object, spectral_eff: object, bandwidth_hz: float
) -> float:
    """Round delay T^t = max_i T_i^t over the scheduled clients (A.3, after eq. 6)."""
    d = fdma_delays(payload_bits, shares, spectral_eff, bandwidth_hz)
    return float(d.max()) if d.size else 0.0


def payload_bits(num_values: float, q: int) -> float:
    """Payload in bits of ``num_values`` transmitted values at ``q`` bits each (eq. 6 numerator)."""
    n = _check_real("num_values", num_values)
    if n < 0.0:
        raise ValueError(f"num_values must be >= 0, got {num_values!r}")
    return n * _check_int("q", q, 1)


def model_payload_bits(rho: float, rank: int, d_plus_k_total: int, q: int) -> float:
    """Model payload (1 - rho) r (d+k) q of eqs. (6)/(39); d_plus_k_total = sum_l (d_l + k_l)."""
    rh = _check_real("rho", rho)
    if not 0.0 <= rh <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho!r}")
    r = _check_int("rank", rank, 1)
    dk = _check_int("d_plus_k_total", d_plus_k_total, 1)
    return payload_bits((1.0 - rh) * r * dk, q)


class Channel:
    """Clients at fixed distances with Rayleigh block fading redrawn every round (A.3).

    Distances are drawn once from ``seed``; the fading of round ``t`` is drawn from a generator
    seeded by ``(seed, t)``, so ``draw(t)`` is reproducible and independent of call order.
    """

    def __init__(self, config: ChannelConfig, seed: int = 0) -> None:
        if not isinstance(config, ChannelConfig):
            raise TypeError(f"config must be a ChannelConfig, got {type(config).__name__}")
        self.config = config
        self.seed = _check_int("seed", seed, 0)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(0,)))
        n, lo, hi = config.num_clients, config.min_distance_m, config.max_distance_m
        if config.distance_law == "uniform":
            dist = rng.uniform(lo, hi, size=n)
        else:
            dist = np.sqrt(rng.uniform(lo * lo, hi * hi, size=n))
        self.distances_m: np.ndarray = dist
        self.distances_m.setflags(write=False)

    @property
    def noise_w(self) -> float:
        """AWGN power sigma^2 in W."""
        return self.config.noise_w

    def mean_gains(self) -> np.ndarray:
        """E[h_i] = D_i^-kappa for unit-variance Rayleigh fading (used offline, eq. 25c)."""
        return self.distances_m ** (-self.config.path_loss_exponent)

    def draw(self, round_idx: int) -> np.ndarray:
        """Gains h_i^t = |g_i^t|^2 D_i^-kappa of all N clients at round ``round_idx``, g~CN(0,1)."""
        t = _check_int("round_idx", round_idx, 0)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, t)))
        n = self.config.num_clients
        g = (rng.standard_normal(n) + 1j * rng.standard_normal(n)) / math.sqrt(2.0)
        return np.abs(g) ** 2 * self.mean_gains()

    def spectral_eff(self, gains: object) -> np.ndarray:
        """Gamma = log2(1 + P h / sigma^2) of the given gains (bit/s/Hz)."""
        return spectral_efficiency(gains, self.config.tx_power_w, self.noise_w)

    def fdma_delays(self, payload_bits: object, shares: object, gains: object) -> np.ndarray:
        """Per-client delays of eq. (6) in s for the given gains and bandwidth shares."""
        return fdma_delays(payload_bits, shares, self.spectral_eff(gains), self.config.bandwidth_hz)

    def round_delay(self, payload_bits: object, shares: object, gains: object) -> float:
        """Round delay max_i T_i^t in s (slowest scheduled client)."""
        return round_delay(payload_bits, shares, self.spectral_eff(gains), self.config.bandwidth_hz)
