"""Uplink model of paper A: path loss, shadowing, Rayleigh block fading, FDMA delays (A.3, eq. 6).

Three path-loss models (``path_loss_model``):

* ``"log-distance"`` (default): PL(d) = PL(d0) + 10 n log10(d / d0) dB with a reference loss
  PL(d0) at d0 (defaults: 43.3 dB at 1 m, the free-space loss 20 log10(4 pi d0 f_c / c) at
  f_c = 3.5 GHz, and n = ``path_loss_exponent`` = 3.5). ASSUMPTION, not from the paper: with
  P = 0.1 W (20 dBm), N0 = -174 dBm/Hz, a 7 dB receiver noise figure and 1 MHz shared by K = 10
  clients (100 kHz each) the mean SNR is 34 dB at 50 m and 7 dB at 300 m.
* ``"3gpp-uma"``: PL = 128.1 + 37.6 log10(d / km) dB, the urban-macro NLOS formula of 3GPP
  TR 36.814 (2 GHz; the same slope as TR 38.901 UMa NLOS). At 50-300 m it gives high SNRs
  (macro cells are km-sized): widen the distances to see a cell edge.
* ``"paper"``: h = |g|^2 D^-kappa with no reference gain, paper A's A.3 read literally (kept
  for faithfulness; with 50-300 m it gives 47-73 dB mean SNR).

On top: optional log-normal shadowing (``shadowing_db`` = sigma in dB, drawn once per client
from the seed, fixed over rounds) and Rayleigh block fading |g|^2, g ~ CN(0, 1), redrawn per
round. Noise: ``bandwidth_noise = "allocated"`` (default) charges N0 F b_i B_tot over the band a
client is allocated (F the noise figure), so Gamma_i depends on the share b_i and eq. (41)'s
closed form no longer equalises delays (:func:`equal_finish` solves it numerically);
``"total"`` is the paper's fixed sigma^2 = N0 F B_tot for every share (A.3's reading of eq. 41).
Imperfect CSI (``csi_error`` = eps): the server plans with the LS estimate g_hat = g + eps w,
w ~ CN(0, 1) (estimation NMSE eps^2, an open question of paper A); the realised delay uses g.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import brentq
from scipy.special import lambertw

from fedsoft.wireless.arguments import positive as _check_positive
from fedsoft.wireless.arguments import real as _check_real

PATH_LOSS_MODELS = ("log-distance", "3gpp-uma", "paper")
BANDWIDTH_NOISE = ("allocated", "total")
PathLossModel = Literal["log-distance", "3gpp-uma", "paper"]
BandwidthNoise = Literal["allocated", "total"]

__all__ = [
    "BANDWIDTH_NOISE",
    "PATH_LOSS_MODELS",
    "ChannelConfig",
    "equal_finish",
    "deadline_admission",
    "share_for_rate",
    "path_loss_db",
    "Channel",
    "spectral_efficiency",
    "fdma_delays",
    "round_delay",
    "snr_line",
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


def path_loss_db(distance_m: object, model: PathLossModel = "log-distance", *,
                 exponent: float = 3.5, ref_loss_db: float = 43.3,
                 ref_distance_m: float = 1.0) -> np.ndarray:
    """Mean path loss in dB at ``distance_m`` (m) for the model (module docstring, A.3).

    ``log-distance``: PL(d0) + 10 n log10(d / d0); ``3gpp-uma``: 128.1 + 37.6 log10(d / km)
    (TR 36.814); ``paper``: 10 kappa log10(d), i.e. D^-kappa of A.3 (no reference gain).
    """
    d = _as_array("distance_m", distance_m, positive=True)
    n = _check_positive("path_loss_exponent", exponent)
    if model == "log-distance":
        d0 = _check_positive("ref_distance_m", ref_distance_m)
        return _check_real("ref_loss_db", ref_loss_db) + 10.0 * n * np.log10(d / d0)
    if model == "3gpp-uma":
        return 128.1 + 37.6 * np.log10(d / 1000.0)
    if model == "paper":
        return 10.0 * n * np.log10(d)
    raise ValueError(f"path_loss_model must be one of {PATH_LOSS_MODELS}, got {model!r}")


@dataclass(frozen=True)
class ChannelConfig:
    """Uplink parameters of paper A (A.3); defaults are stated assumptions, not the paper's.

    Attributes:
        num_clients: N, number of clients (paper: 100).
        min_distance_m, max_distance_m: range of client-server distances D_i in metres.
        distance_law: how D_i is drawn: ``"uniform"`` (uniform in [min, max]) or ``"area"``
            (uniform over the annulus area, i.e. D = sqrt(U(min^2, max^2))). PROPOSED-L.
        path_loss_exponent: n of the log-distance model, kappa of ``paper`` (dimensionless).
        tx_power_w: P_i, transmit power in W (same for every client).
        bandwidth_hz: B_tot, total uplink bandwidth in Hz shared by FDMA.
        noise_psd_dbm_per_hz: thermal noise PSD N0 in dBm/Hz (used when ``noise_power_w`` is
            None).
        noise_power_w: explicit AWGN power over B_tot in W (overrides PSD and noise figure).
        bits_per_value: q, bits per transmitted model value.
        path_loss_model: ``log-distance`` (default), ``3gpp-uma`` or ``paper`` (module doc).
        ref_loss_db, ref_distance_m: PL(d0) in dB at d0 in m (``log-distance`` only).
        shadowing_db: sigma in dB of per-client log-normal shadowing (0 = none).
        noise_figure_db: receiver noise figure F in dB (ASSUMPTION: 7 dB, between 3GPP's 5 dB
            base station and 9 dB UE figures).
        bandwidth_noise: ``allocated`` (noise N0 F b_i B_tot over the client's share) or
            ``total`` (the paper's sigma^2 = N0 F B_tot whatever the share, eq. 41).
        csi_error: eps, std of the server's LS estimation error of g (0 = perfect CSI).
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
    path_loss_model: PathLossModel = "log-distance"
    ref_loss_db: float = 43.3
    ref_distance_m: float = 1.0
    shadowing_db: float = 0.0
    noise_figure_db: float = 7.0
    bandwidth_noise: BandwidthNoise = "allocated"
    csi_error: float = 0.0

    @classmethod
    def paper(cls, **overrides: object) -> ChannelConfig:
        """Paper A's channel read literally: h = |g|^2 D^-kappa, sigma^2 = N0 B_tot for every
        share (eq. 41 exact), no noise figure; ``overrides`` set any other field."""
        kw: dict[str, object] = {"path_loss_model": "paper", "bandwidth_noise": "total",
                                 "noise_figure_db": 0.0}
        kw.update(overrides)
        return cls(**kw)  # type: ignore[arg-type]

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
        if self.path_loss_model not in PATH_LOSS_MODELS:
            raise ValueError(f"path_loss_model must be one of {PATH_LOSS_MODELS}, "
                             f"got {self.path_loss_model!r}")
        _check_real("ref_loss_db", self.ref_loss_db)
        _check_positive("ref_distance_m", self.ref_distance_m)
        if _check_real("shadowing_db", self.shadowing_db) < 0.0:
            raise ValueError(f"shadowing_db must be >= 0, got {self.shadowing_db!r}")
        if _check_real("noise_figure_db", self.noise_figure_db) < 0.0:
            raise ValueError(f"noise_figure_db must be >= 0, got {self.noise_figure_db!r}")
        if self.bandwidth_noise not in BANDWIDTH_NOISE:
            raise ValueError(f"bandwidth_noise must be one of {BANDWIDTH_NOISE}, "
                             f"got {self.bandwidth_noise!r}")
        if _check_real("csi_error", self.csi_error) < 0.0:
            raise ValueError(f"csi_error must be >= 0, got {self.csi_error!r}")

    @property
    def noise_w(self) -> float:
        """Noise power in W over the whole band B_tot: ``noise_power_w`` if given, else
        N0 x B_tot x F (F = 10^(noise_figure_db / 10))."""
        if self.noise_power_w is not None:
            return float(self.noise_power_w)
        psd = noise_power_from_psd(self.noise_psd_dbm_per_hz, self.bandwidth_hz)
        return psd * 10.0 ** (self.noise_figure_db / 10.0)

    def full_band_snr(self, gains: object) -> np.ndarray:
        """P h / sigma^2_tot: the SNR with the whole band (with ``allocated`` noise the SNR at
        share b is this divided by b; with ``total`` it is this for every share)."""
        h = _as_array("gains", gains, nonneg=True)
        return self.tx_power_w * h / self.noise_w

    def spectral_eff_at(self, gains: object, shares: object) -> np.ndarray:
        """Gamma_i(b_i) = log2(1 + SNR_i(b_i)) in bit/s/Hz at the given bandwidth shares."""
        a = self.full_band_snr(gains)
        if self.bandwidth_noise == "total":
            return np.log2(1.0 + a)
        b = _as_array("shares", shares, nonneg=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(b > 0.0, np.log2(1.0 + a / np.where(b > 0, b, 1.0)), np.inf)


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


def share_for_rate(full_snr: object, rate_per_hz: object) -> np.ndarray:
    """Bandwidth share b with b log2(1 + a / b) = y under allocated noise (eq. 6 with N0 b B).

    ``full_snr`` a = P h / (N0 F B_tot), ``rate_per_hz`` y = R / B_tot in bit/s/Hz. b log2(1 +
    a/b) is increasing and concave in b with limit a / ln 2 (the wideband capacity), so b is
    infinite when y >= a / ln 2. Closed form with x = a / b: ln(1 + x) / x = c = y ln 2 / a,
    1 + x = -W_{-1}(-c e^-c) / c (Lambert W, lower branch), then two Newton steps.
    """
    a = _as_array("full_snr", full_snr, nonneg=True)
    y = np.broadcast_to(_as_array("rate_per_hz", rate_per_hz, nonneg=True), a.shape)
    out = np.full(a.shape, np.inf)
    out[y == 0.0] = 0.0
    ok = (y > 0.0) & (a > 0.0) & (y * math.log(2.0) < a)
    if np.any(ok):
        aa, yy = a[ok], y[ok]
        c = yy * math.log(2.0) / aa
        z = np.maximum(-c * np.exp(-c), -1.0 / math.e)  # rounding may step past the branch point
        with np.errstate(invalid="ignore"):
            x = -np.real(lambertw(z, k=-1)) / c - 1.0
        near = (c > 1.0 - 1e-6) | ~np.isfinite(x)  # ln(1+x)/x ~ 1 - x/2 near the branch point
        x = np.where(near, 2.0 * (1.0 - c), x)
        b = aa / np.maximum(x, 1e-300)
        for _ in range(2):  # Newton on f(b) = b log2(1 + a/b) - y, f' = log2(1+a/b) - a/((a+b) ln2)
            f = b * np.log2(1.0 + aa / b) - yy
            fp = np.log2(1.0 + aa / b) - aa / ((aa + b) * math.log(2.0))
            b = np.where(fp > 0, np.maximum(b - f / fp, 0.5 * b), b)
        out[ok] = b
    return out


def equal_finish(full_snr: object, mode: BandwidthNoise = "allocated",
                 weights: object | None = None, rtol: float = 1e-12
                 ) -> tuple[float, np.ndarray]:
    """Bandwidth shares that make every scheduled client finish together (eqs. 27-28, 41).

    Returns (S, b): the round delay for a common payload of ``bits`` is T = bits S / B_tot and
    b sums to 1 (eq. 39c). ``mode = "total"`` is eq. (41): Gamma_i = log2(1 + a_i) does not
    depend on b, b_i = (1/Gamma_i) / sum_j (1/Gamma_j) and S = sum_j 1/Gamma_j. With
    ``"allocated"`` noise the share that carries y = bits / (T B_tot) is
    :func:`share_for_rate`, increasing in y, so T solves sum_i w_i b_i(y) = 1 (Brent's method
    on y in (0, min a_i / ln 2)) and S = 1 / y. ``weights`` w_i (default 1) let the offline stage
    weigh all N clients by K/N (A.10's ``scaled`` nominal set); then b are per-client shares
    w_i b_i (they sum to 1).
    """
    a = _as_array("full_snr", full_snr, positive=True)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"full_snr must be a non-empty 1-D array, got shape {a.shape}")
    w = np.ones_like(a) if weights is None else _as_array("weights", weights, nonneg=True)
    if w.shape != a.shape or not np.any(w > 0):
        raise ValueError(f"weights must match full_snr {a.shape} and not all be 0")
    gam = np.log2(1.0 + a)
    s_total = float(np.sum(w / gam))
    if mode == "total":
        return s_total, (w / gam) / s_total
    if mode != "allocated":
        raise ValueError(f"bandwidth_noise must be one of {BANDWIDTH_NOISE}, got {mode!r}")
    act = w > 0
    y_max = float(np.min(a[act])) / math.log(2.0)

    def excess(y: float) -> float:
        return float(np.sum(w[act] * share_for_rate(a[act], y))) - 1.0

    lo = min(1.0 / s_total, 0.5 * y_max)  # sum of shares <= 1 here: b log2(1+a/b) >= b Gamma
    while excess(lo) > 0.0:  # (only when a weighted share would exceed the whole band)
        lo *= 0.5
    hi = y_max * (1.0 - 1e-9)
    if excess(hi) <= 0.0:  # pragma: no cover - b -> inf as y -> a/ln 2
        y = hi
    else:
        y = float(brentq(excess, lo, hi, rtol=rtol, xtol=1e-300, maxiter=200))
    b = w * share_for_rate(a, y)
    b[~act] = 0.0
    return 1.0 / y, b / b.sum()


def deadline_admission(full_snr: object, payload_bits: float, deadline_s: float,
                       bandwidth_hz: float, mode: BandwidthNoise = "allocated") -> np.ndarray:
    """PROPOSED (not in paper A): the scheduled clients that can upload by a deadline.

    Returns a boolean mask over ``full_snr`` (a_i = P h_i / (N0 F B_tot), the server's CSI).
    Client i needs the share b_i(y) that carries y = ``payload_bits`` / (D B_tot) bit/s/Hz
    (eq. 6 with T_i = D; :func:`share_for_rate` with ``allocated`` noise, y / log2(1 + a_i)
    with ``total``; infinite when even the whole band is too slow). The clients with the
    smallest b_i (the strongest channels) are kept while their shares sum to <= 1 (eq. 39c):
    the largest set whose equal-finish delay (eqs. 27-28, 41, :func:`equal_finish`) is at
    most D, since the common rate y_A of that set solves sum_A b_i(y_A) = 1 >= sum_A b_i(y), so
    y_A >= y. The others are in outage. When no client fits, the strongest one is kept (a
    round always has one upload; it may then exceed D).
    """
    a = _as_array("full_snr", full_snr, nonneg=True)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"full_snr must be a non-empty 1-D array, got shape {a.shape}")
    bits = _check_real("payload_bits", payload_bits)
    if bits < 0.0:
        raise ValueError(f"payload_bits must be >= 0, got {payload_bits!r}")
    d = _check_positive("deadline_s", deadline_s)
    y = bits / (d * _check_positive("bandwidth_hz", bandwidth_hz))
    if mode == "allocated":
        need = share_for_rate(a, np.full(a.shape, y))
    elif mode == "total":
        gam = np.log2(1.0 + a)
        with np.errstate(divide="ignore"):
            need = np.where(gam > 0.0, y / np.where(gam > 0.0, gam, 1.0), np.inf)
    else:
        raise ValueError(f"bandwidth_noise must be one of {BANDWIDTH_NOISE}, got {mode!r}")
    order = np.argsort(need, kind="stable")
    fits = np.cumsum(need[order]) <= 1.0
    keep = np.zeros(a.shape, dtype=bool)
    keep[order[fits]] = True
    if not keep.any():
        keep[int(np.argmax(a))] = True
    return keep


class Channel:
    """Clients at fixed distances (and shadowing) with Rayleigh block fading per round (A.3).

    Distances are drawn once from ``seed``, shadowing too (a separate stream, so distances do
    not depend on ``shadowing_db``); the fading of round ``t`` is drawn from a generator seeded
    by ``(seed, t)``, so ``draw(t)`` is reproducible and independent of call order, and so is
    the CSI estimate ``estimate(t)``.
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
        shadow = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(3,)))
        self.shadowing_db: np.ndarray = config.shadowing_db * shadow.standard_normal(n)
        self.shadowing_db.setflags(write=False)
        pl = path_loss_db(dist, config.path_loss_model, exponent=config.path_loss_exponent,
                          ref_loss_db=config.ref_loss_db, ref_distance_m=config.ref_distance_m)
        self.path_loss_db: np.ndarray = pl + self.shadowing_db
        self.path_loss_db.setflags(write=False)
        if config.path_loss_model == "paper" and config.shadowing_db == 0.0:
            self._mean = dist ** (-config.path_loss_exponent)  # bit-exact with the old model
        else:
            self._mean = 10.0 ** (-self.path_loss_db / 10.0)
        self._mean.setflags(write=False)

    @property
    def noise_w(self) -> float:
        """Noise power over the whole band B_tot in W (noise figure included)."""
        return self.config.noise_w

    def mean_gains(self) -> np.ndarray:
        """E[h_i] = 10^(-PL_i/10) (shadowing included; ``paper``: D_i^-kappa) for unit-variance
        Rayleigh fading (the average channel of the offline stage, eq. 25c)."""
        return self._mean.copy()

    def _fading(self, t: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, t)))
        n = self.config.num_clients
        return (rng.standard_normal(n) + 1j * rng.standard_normal(n)) / math.sqrt(2.0)

    def draw(self, round_idx: int) -> np.ndarray:
        """True gains h_i^t = |g_i^t|^2 E[h_i] of all N clients at ``round_idx``, g~CN(0,1)."""
        t = _check_int("round_idx", round_idx, 0)
        return np.abs(self._fading(t)) ** 2 * self._mean

    def estimate(self, round_idx: int) -> np.ndarray:
        """The server's CSI at ``round_idx``: |g + eps w|^2 E[h_i], w ~ CN(0, 1) independent of
        g (LS estimate, NMSE eps^2 = ``csi_error``^2); equals ``draw`` when eps = 0."""
        t = _check_int("round_idx", round_idx, 0)
        g = self._fading(t)
        eps = self.config.csi_error
        if eps > 0.0:
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(2, t)))
            n = self.config.num_clients
            g = g + eps * (rng.standard_normal(n) + 1j * rng.standard_normal(n)) / math.sqrt(2.0)
        return np.abs(g) ** 2 * self._mean

    def mean_snr_db(self, share: float = 1.0) -> np.ndarray:
        """Per-client mean SNR in dB over the average channel (E|g|^2 = 1) at bandwidth share
        ``share`` (noise over share x B_tot with ``allocated`` noise, over B_tot with
        ``total``)."""
        b = _check_positive("share", share)
        snr = self.config.full_band_snr(self._mean)
        if self.config.bandwidth_noise == "allocated":
            snr = snr / b
        return 10.0 * np.log10(snr)

    def spectral_eff(self, gains: object, shares: object | None = None) -> np.ndarray:
        """Gamma = log2(1 + SNR) in bit/s/Hz; SNR over the whole band (``shares`` None) or at
        the given shares (differs from the former only with ``allocated`` noise)."""
        if shares is None:
            return np.log2(1.0 + self.config.full_band_snr(gains))
        return self.config.spectral_eff_at(gains, shares)

    def plan_shares(self, gains: object, weights: object | None = None
                    ) -> tuple[float, np.ndarray]:
        """(S, b) of :func:`equal_finish` for these gains under this channel's noise model."""
        return equal_finish(self.config.full_band_snr(gains), self.config.bandwidth_noise,
                            weights)

    def fdma_delays(self, payload_bits: object, shares: object, gains: object) -> np.ndarray:
        """Per-client delays of eq. (6) in s for the given gains and bandwidth shares."""
        return fdma_delays(payload_bits, shares, self.spectral_eff(gains, shares),
                           self.config.bandwidth_hz)

    def round_delay(self, payload_bits: object, shares: object, gains: object) -> float:
        """Round delay max_i T_i^t in s (slowest scheduled client)."""
        d = self.fdma_delays(payload_bits, shares, gains)
        return float(d.max()) if d.size else 0.0

    def snr_summary(self, num_scheduled: int) -> dict[str, object]:
        """Mean SNR per client (dB) at the equal share 1/K, distances, full-band spectral
        efficiency and the min/median/max line of the run log (JSON-able)."""
        k = _check_int("num_scheduled", num_scheduled, 1)
        snr = self.mean_snr_db(1.0 / k)
        gam = self.spectral_eff(self._mean, np.full(self._mean.shape, 1.0 / k))
        cfg = self.config
        return {
            "path_loss_model": cfg.path_loss_model, "bandwidth_noise": cfg.bandwidth_noise,
            "share": 1.0 / k, "snr_db_min": float(snr.min()),
            "snr_db_median": float(np.median(snr)), "snr_db_max": float(snr.max()),
            "rate_spread": float(gam.max() / gam.min()),
            "clients": [{"client": i, "distance_m": float(self.distances_m[i]),
                         "shadowing_db": float(self.shadowing_db[i]),
                         "path_loss_db": float(self.path_loss_db[i]),
                         "mean_snr_db": float(snr[i]),
                         "spectral_eff_equal_share": float(gam[i])}
                        for i in range(cfg.num_clients)],
        }


def snr_line(summary: dict[str, object]) -> str:
    """The run log line ``SNR (dB): min <x> median <y> max <z>`` of :meth:`Channel.snr_summary`."""
    return (f"SNR (dB): min {summary['snr_db_min']:.1f} median {summary['snr_db_median']:.1f} "
            f"max {summary['snr_db_max']:.1f}")
