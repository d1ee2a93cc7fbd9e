"""Simulated round wall-clock of paper B (B.3): heterogeneous compute + FDMA upload.

Client n's round: compute t_cp = H c_n (phi0 + (1 - phi0) k_n / r) (the LoRA part scales with
the sketch, the frozen backbone does not), then upload M_n(k_n) = (k_n sum_l (d_l + k_l) + head)
q bits at rate b_n B_tot Gamma_n. The round ends when the slowest participant has uploaded.
Bandwidth among the participants K: ``equal`` (b_n = 1/|K|, the ICC'24 code) or
``equal_finish`` (everyone finishes together: sum_n t_cm_n / (T - t_cp_n) = 1, bisection).
Every round, empty or not, also costs a fixed ``round_overhead_s`` (server synchronisation and
the broadcast of the global adapter; PROPOSED-L, a run-config value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedsoft.wireless.arguments import nonneg, pos_int, positive
from fedsoft.wireless.channel import Channel

__all__ = ["ALLOCATIONS", "SystemModel", "compute_speeds", "round_time"]

Allocation = Literal["equal", "equal_finish"]
ALLOCATIONS = ("equal", "equal_finish")


def compute_speeds(num_clients: int, mean_s: float, heterogeneity: float, seed: int) -> np.ndarray:
    """c_n, seconds per local step at full rank: ``mean_s`` x LogNormal(0, heterogeneity),
    normalised to mean ``mean_s`` (heterogeneity 0 = identical clients), drawn from ``seed``."""
    n = pos_int("num_clients", num_clients)
    mean_s = positive("compute_s_per_step", mean_s)
    sigma = nonneg("compute_heterogeneity", heterogeneity)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(7,)))
    raw = np.exp(sigma * rng.standard_normal(n))
    return mean_s * raw / raw.mean()


def round_time(t_cp: np.ndarray, t_cm: np.ndarray, allocation: Allocation = "equal_finish",
               tol: float = 1e-12) -> tuple[float, np.ndarray]:
    """(T, bandwidth shares) of one round for the participants' compute times ``t_cp`` and
    full-band upload times ``t_cm`` (B.3 (a)/(b)). An empty round takes 0 s."""
    t_cp = np.asarray(t_cp, dtype=np.float64)
    t_cm = np.asarray(t_cm, dtype=np.float64)
    if t_cp.shape != t_cm.shape or t_cp.ndim != 1:
        raise ValueError(f"t_cp {t_cp.shape} and t_cm {t_cm.shape} must be equal 1-D shapes")
    if t_cp.size == 0:
        return 0.0, np.zeros(0)
    if np.any(t_cp < 0) or np.any(t_cm < 0) or not np.all(np.isfinite(t_cp + t_cm)):
        raise ValueError("t_cp and t_cm must be finite and >= 0")
    m = t_cp.size
    if allocation == "equal":
        return float(np.max(t_cp + m * t_cm)), np.full(m, 1.0 / m)
    if allocation != "equal_finish":
        raise ValueError(f"bandwidth-allocation = {allocation!r}: must be one of {ALLOCATIONS}")
    if not np.any(t_cm > 0):
        return float(t_cp.max()), np.full(m, 1.0 / m)
    lo, hi = float(t_cp.max()), float(t_cp.max() + t_cm.sum())  # f(lo+) = inf, f(hi) <= 1
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        with np.errstate(divide="ignore"):
            f = np.sum(np.where(t_cm > 0, t_cm / np.maximum(mid - t_cp, 0.0), 0.0))
        if f > 1.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= tol * max(hi, 1.0):
            break
    shares = np.where(t_cm > 0, t_cm / (hi - t_cp), 0.0)
    return hi, shares / shares.sum()


@dataclass(frozen=True)
class SystemModel:
    """Per-client compute speeds and the wireless channel of B.3 (sizes of one client payload).

    Attributes:
        compute_s: c_n, seconds per local step at full rank, one per client.
        steps: H, local steps per round.
        lora_share: 1 - phi0, share of a step's compute that scales with k / r.
        rank: r, the global LoRA rank.
        bits_per_rank: q sum_l (d_l + k_l), upload bits per kept rank component.
        head_bits: upload bits of the dense head.
        channel: the channel model (distances, fading, P, sigma^2, B_tot).
        allocation: ``equal`` or ``equal_finish`` bandwidth among the participants.
        round_overhead_s: fixed seconds every round costs, empty rounds included.
    """

    compute_s: np.ndarray
    steps: int
    lora_share: float
    rank: int
    bits_per_rank: float
    head_bits: float
    channel: Channel
    allocation: Allocation = "equal_finish"
    round_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        nonneg("round_overhead_s", self.round_overhead_s)
        if self.compute_s.shape != (self.channel.config.num_clients,):
            raise ValueError(f"compute_s must have one value per client "
                             f"({self.channel.config.num_clients}), got {self.compute_s.shape}")
        if not 0.0 <= self.lora_share <= 1.0:
            raise ValueError(f"compute-lora-share = {self.lora_share}: must be in [0, 1]")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"bandwidth-allocation = {self.allocation!r}: one of {ALLOCATIONS}")

    @property
    def num_clients(self) -> int:
        return int(self.compute_s.size)

    def compute_time(self, k: np.ndarray) -> np.ndarray:
        """t_cp(k_n) = H c_n (phi0 + (1 - phi0) k_n / r) for every client."""
        frac = np.asarray(k, dtype=np.float64) / self.rank
        return self.steps * self.compute_s * (1.0 - self.lora_share + self.lora_share * frac)

    def upload_time(self, k: np.ndarray, spectral_eff: np.ndarray) -> np.ndarray:
        """Full-band upload time t_cm(k_n) = M_n(k_n) / (B_tot Gamma_n) for every client."""
        bits = np.asarray(k, dtype=np.float64) * self.bits_per_rank + self.head_bits
        return bits / (self.channel.config.bandwidth_hz * np.maximum(spectral_eff, 1e-12))

    def round(self, participants: np.ndarray, k: np.ndarray, server_round: int
              ) -> tuple[float, np.ndarray]:
        """(T_r, shares) for the participants with this round's fading (Channel.draw),
        ``round_overhead_s`` included."""
        idx = np.asarray(participants, dtype=np.int64)
        if idx.size == 0:
            return self.round_overhead_s, np.zeros(0)
        gamma = self.channel.spectral_eff(self.channel.draw(server_round))
        k = np.asarray(k, dtype=np.float64)
        t, shares = round_time(self.compute_time(k)[idx], self.upload_time(k, gamma)[idx],
                               self.allocation)
        return self.round_overhead_s + t, shares

    def expected_round_time(self, q: np.ndarray, k: np.ndarray, draws: int = 256,
                            seed: int = 0) -> float:
        """E[T_r] over Bernoulli(q) participation and Rayleigh fading (B.3), by Monte Carlo with
        common random numbers (the same ``seed`` gives a deterministic function of (q, k)).

        All draws are evaluated at once (the equal-finish bisection of :func:`round_time`
        vectorised over draws), so the k search of :mod:`fedsoft.sketching.optimizer` can afford
        many
        evaluations; it agrees with a per-draw :func:`round_time` loop to ~1e-12."""
        q = np.asarray(q, dtype=np.float64)
        k = np.asarray(k, dtype=np.float64)
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(11,)))
        u = rng.random((draws, self.num_clients))
        fade = rng.exponential(1.0, size=(draws, self.num_clients))
        part = u < q  # (draws, N)
        gamma = self.channel.spectral_eff((fade * self.channel.mean_gains()).ravel()
                                          ).reshape(fade.shape)
        t_cp = np.where(part, self.compute_time(k)[None, :], 0.0)
        t_cm = np.where(part, self.upload_time(k[None, :], gamma), 0.0)
        return self.round_overhead_s + float(np.mean(_round_times(t_cp, t_cm, part,
                                                                  self.allocation)))


def _round_times(t_cp: np.ndarray, t_cm: np.ndarray, part: np.ndarray,
                 allocation: Allocation, iters: int = 80) -> np.ndarray:
    """:func:`round_time` of every row (one draw each; ``part`` marks the participants, whose
    t_cp/t_cm are the only non-zero entries); an empty row takes 0 s."""
    m = part.sum(axis=1)
    lo = t_cp.max(axis=1)
    if allocation == "equal":
        return np.where(m > 0, np.max(np.where(part, t_cp + m[:, None] * t_cm, 0.0), axis=1),
                        0.0)
    if allocation != "equal_finish":
        raise ValueError(f"bandwidth-allocation = {allocation!r}: must be one of {ALLOCATIONS}")
    has_cm = np.any(t_cm > 0, axis=1)
    hi = lo + t_cm.sum(axis=1)
    use = t_cm > 0
    for _ in range(iters):  # width halves each time: 2^-80 of the start is below float eps
        mid = 0.5 * (lo + hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.sum(np.where(use, t_cm / np.maximum(mid[:, None] - t_cp, 0.0), 0.0), axis=1)
        above = f > 1.0
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    return np.where(has_cm, hi, t_cp.max(axis=1))
