"""TSFA set-up from a run config: channel, bound constants, offline rank choice (eqs. 25-29)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsoft.bound import BoundConstants
from fedsoft.calibration import load_calibration
from fedsoft.channel import Channel, ChannelConfig
from fedsoft.client_update import sparse_settings
from fedsoft.codec import LayerSpec
from fedsoft.config import parse_int_list
from fedsoft.offline import OfflineResult, choose_rank_for_channel
from fedsoft.online import OSFAController, TSFAController
from fedsoft.sparse_update import estimate_payload_bytes


@dataclass
class TSFAPlan:
    """What the server needs before round 1: the channel, the rank and the online controller."""

    channel: Channel
    bound: BoundConstants
    rank: int
    controller: TSFAController
    offline: OfflineResult | None  # None for OSFA (user-fixed rank)


def channel_config(cfg: Mapping[str, Any], num_clients: int) -> ChannelConfig:
    """ChannelConfig (A.3) from run-config keys; q follows the wire dtype (32 or 16 bits)."""
    return ChannelConfig(
        num_clients=num_clients,
        min_distance_m=float(cfg["channel-distance-min"]),
        max_distance_m=float(cfg["channel-distance-max"]),
        path_loss_exponent=float(cfg["path-loss-exponent"]),
        tx_power_w=float(cfg["tx-power-w"]),
        bandwidth_hz=float(cfg["bandwidth-hz"]),
        noise_psd_dbm_per_hz=float(cfg["noise-psd-dbm-hz"]),
        bits_per_value=16 if cfg["wire-dtype"] == "float16" else 32,
    )


def bound_constants(cfg: Mapping[str, Any]) -> BoundConstants:
    """Surrogate Phi constants (A.8) from run-config keys (PROPOSED-L, all configurable).

    With ``bound-calibration`` set, sigma_bar_r (per rank) and sigma_max come from that
    ``calibration.json`` (see :mod:`fedsoft.calibration`) instead of ``bound-sigma-bar/max``.
    """
    sigma_bar: float | np.ndarray = float(cfg["bound-sigma-bar"])
    sigma_max = float(cfg["bound-sigma-max"])
    path = str(cfg.get("bound-calibration", ""))
    if path:
        sigma_bar, sigma_max = load_calibration(path)
        ranks = (parse_int_list(str(cfg["tsfa-ranks"]), "tsfa-ranks")
                 if cfg["strategy"] == "tsfa" else [int(cfg["lora-rank"])])
        if max(ranks) > sigma_bar.size:
            raise ValueError(
                f"bound-calibration={path!r} has sigma_bar for ranks 1..{sigma_bar.size}, but the "
                f"candidate ranks go up to {max(ranks)}: calibrate from a pilot with "
                f"lora-rank >= {max(ranks)} or drop the larger ranks from tsfa-ranks"
            )
    return BoundConstants(
        kappa_R=float(cfg["bound-kappa-r"]),
        kappa_S=float(cfg["bound-kappa-s"]),
        kappa_C=float(cfg["bound-kappa-c"]),
        kappa_E=float(cfg["bound-kappa-e"]),
        r_star_ideal=float(cfg["bound-rank-ideal"]),
        sigma_bar=sigma_bar,
        sigma_max=sigma_max,
        p=int(cfg["bound-p"]),
    )


def payload_bits_fn(cfg: Mapping[str, Any], layer_dims: Sequence[tuple[str, int, int]],
                    head_sizes: Sequence[int]) -> Callable[[int, float], float]:
    """(r, rho) -> bits of one client's encoded upload at rank r (values in ``wire-dtype``,
    positions as the codec sends them for ``sparsifier``, counts, dense head, Flower framing).
    ``layer_dims`` are (name, d, k) of the adapted layers."""
    dtype = str(cfg["wire-dtype"])
    seeded = bool(sparse_settings(cfg, 0.0).make().positions_from_seed)

    def bits(rank: int, rho: float) -> float:
        specs = [LayerSpec(name, int(rank), d, k) for name, d, k in layer_dims]
        return 8.0 * estimate_payload_bytes(specs, list(head_sizes), float(rho), dtype=dtype,
                                            seeded_positions=seeded)

    return bits


def plan(cfg: Mapping[str, Any], num_clients: int, d_plus_k_total: int,
         payload_bits: Callable[[int, float], float] | None = None) -> TSFAPlan:
    """Offline stage for ``strategy = tsfa`` (rank r* from the mean channel, Lemma 2) or the
    user-fixed rank for ``osfa``; then the online controller (eqs. 30-41).

    ``d_plus_k_total`` is sum over adapted layers of d_l + k_l (payload r (d+k) q, eq. 6);
    ``payload_bits`` (see :func:`payload_bits_fn`) makes the offline stage use the real encoded
    upload size instead of the values-only count of eq. (29).
    """
    channel = Channel(channel_config(cfg, num_clients), seed=int(cfg["seed"]))
    bound = bound_constants(cfg)
    k = min(int(cfg["clients-per-round"]), num_clients)
    common = dict(
        V=float(cfg["lyapunov-v"]),
        T_bar=float(cfg["latency-budget"]),
        d_plus_k_total=d_plus_k_total,
        channel=channel.config,
        rho_min=float(cfg["sparsity-min"]),
        rho_max=float(cfg["sparsity-max"]),
        solver=str(cfg["p3-solver"]),
    )
    if cfg["strategy"] == "osfa":
        rank = int(cfg["lora-rank"])
        return TSFAPlan(channel, bound, rank, OSFAController(rank, bound, **common), None)
    result = choose_rank_for_channel(
        channel, k, parse_int_list(str(cfg["tsfa-ranks"]), "tsfa-ranks"), bound,
        d_plus_k_total=d_plus_k_total,
        T_bar=float(cfg["latency-budget"]),
        rho_min=float(cfg["sparsity-min"]),
        rho_max=float(cfg["sparsity-max"]),
        nominal=str(cfg["offline-nominal"]),
        payload_bits=payload_bits,
    )
    controller = TSFAController.from_offline(result, bound, **common)
    return TSFAPlan(channel, bound, result.r_star, controller, result)


def offline_table(result: OfflineResult) -> list[dict[str, Any]]:
    """The offline table r -> rho*, Phi0, feasibility, nominal delay, as JSON-able rows."""
    return [
        {"rank": row.rank, "rho_star": row.rho, "phi0": row.phi0, "feasible": row.feasible,
         "nominal_delay_s": row.nominal_delay, "chosen": row.rank == result.r_star}
        for row in result.table.values()
    ]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Human-readable offline table (printed by the server before round 1)."""
    lines = ["[fedsoft] TSFA offline stage (eqs. 25-29): rank -> rho*, Phi0",
             f"{'rank':>6} {'rho*':>8} {'Phi0':>12} {'delay_s':>9} feasible"]
    for row in rows:
        mark = "  <- r*" if row["chosen"] else ""
        lines.append(f"{row['rank']:>6} {row['rho_star']:>8.4f} {row['phi0']:>12.5g} "
                     f"{row['nominal_delay_s']:>9.4f} {str(row['feasible']):>8}{mark}")
    return "\n".join(lines)
