"""TSFA set-up from a run config: channel, bound constants, offline rank choice (eqs. 25-29)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsoft.compression import quantize
from fedsoft.compression.update import SparseSettings, estimate_payload_bytes
from fedsoft.config import DEFAULTS, ConfigError, ConfigLike, RunConfig, parse_int_list
from fedsoft.layout import LayerSpec, RowsSpec, rows_spec
from fedsoft.wireless.bound import BoundConstants
from fedsoft.wireless.calibration import load_calibration
from fedsoft.wireless.channel import Channel, ChannelConfig
from fedsoft.wireless.controller import OSFAController, TSFAController
from fedsoft.wireless.offline_rank import (
    InfeasibleLatencyError,
    OfflineResult,
    budget_rho,
    choose_rank_for_channel,
    nominal_seconds_per_bit,
)
from fedsoft.wireless.pilot import AUTO, calibration_file

CHANNEL_KEYS = ("channel-distance-min", "channel-distance-max", "path-loss-exponent",
                "tx-power-w", "bandwidth-hz", "noise-psd-dbm-hz", "path-loss-model",
                "path-loss-ref-db", "path-loss-ref-distance-m", "shadowing-db",
                "noise-figure-db", "bandwidth-noise", "csi-error")
BOUND_KEYS = ("bound-kappa-r", "bound-kappa-s", "bound-kappa-c", "bound-kappa-e",
              "bound-rank-ideal", "bound-sigma-bar", "bound-sigma-max", "bound-p",
              "bound-calibration")
TSFA_KEYS = ("latency-budget", "latency-budget-fraction", "lyapunov-v", "sparsity-min",
             "sparsity-max", "tsfa-ranks", "p3-solver", "offline-nominal", "lora-rank",
             "tsfa-start", "payload-model", "tsfa-deadline", "tsfa-deadline-factor")

# argument names of the channel, bound, offline, online and wall-clock modules -> run-config keys
INTERNAL_NAMES: dict[str, tuple[str, ...]] = {
    "T_bar": ("latency-budget",),
    "V": ("lyapunov-v",),
    "rho_min": ("sparsity-min",),
    "rho_max": ("sparsity-max",),
    "deadline_factor": ("tsfa-deadline-factor",),
    "min_distance_m": ("channel-distance-min",),
    "max_distance_m": ("channel-distance-max",),
    "path_loss_exponent": ("path-loss-exponent",),
    "tx_power_w": ("tx-power-w",),
    "bandwidth_hz": ("bandwidth-hz",),
    "noise_psd_dbm_per_hz": ("noise-psd-dbm-hz",),
    "noise_power_w": ("noise-psd-dbm-hz", "bandwidth-hz"),
    "ref_loss_db": ("path-loss-ref-db",),
    "ref_distance_m": ("path-loss-ref-distance-m",),
    "shadowing_db": ("shadowing-db",),
    "noise_figure_db": ("noise-figure-db",),
    "csi_error": ("csi-error",),
    "full_snr": CHANNEL_KEYS,
    "spectral_eff": CHANNEL_KEYS,
    "mean_spectral_eff": CHANNEL_KEYS,
    "inv_gamma_sum": CHANNEL_KEYS,
    "kappa_R": ("bound-kappa-r",),
    "kappa_S": ("bound-kappa-s",),
    "kappa_C": ("bound-kappa-c",),
    "kappa_E": ("bound-kappa-e",),
    "r_star_ideal": ("bound-rank-ideal",),
    "sigma_bar": ("bound-sigma-bar",),
    "sigma_max": ("bound-sigma-max",),
    "p": ("bound-p",),
    "solver": ("p3-solver",),
    "ranks": ("tsfa-ranks",),
    "mode": ("offline-nominal",),
    "compute_s_per_step": ("compute-s-per-step",),
    "compute_heterogeneity": ("compute-heterogeneity",),
    "round_overhead_s": ("round-overhead-s",),
    "k_init": ("sketch-ratio",),
    "expected participants budget": ("sampling-q",),
}
# short or common words count only as ``name must``, ``name=``, ``name[`` (or ``bound.p``)
_STRICT = {"V", "p", "solver", "ranks", "mode"}


def _name_pattern(name: str) -> re.Pattern[str]:
    core = rf"(?<![\w.]){re.escape(name)}"
    if name in _STRICT:
        extra = r"|bound\.p\b" if name == "p" else ""
        return re.compile(rf"{core}(?=\s+must\b|\s*=|\[){extra}")
    return re.compile(rf"{core}(?!\w)")


_PATTERNS = {name: _name_pattern(name) for name in INTERNAL_NAMES}
_KEY_PATTERNS = {key: re.compile(rf"(?<![\w-]){re.escape(key)}\s*=") for key in DEFAULTS}


def as_config_error(exc: BaseException, cfg: Mapping[str, Any],
                    stage_keys: Sequence[str] = ()) -> ConfigError | None:
    """``exc`` from a library constructor as a :class:`ConfigError` that names the run-config
    keys (and their values) behind the internal names in its message, e.g. ``T_bar`` ->
    ``latency-budget``; the library's message follows. With no name recognised, an overflow
    (ArithmeticError) names ``stage_keys`` (the keys that set-up step reads); other errors give
    None (nothing to attribute: e.g. data shares, not the run config)."""
    msg = str(exc) or type(exc).__name__
    calibrated = bool(cfg.get("bound-calibration"))
    keys: list[str] = []
    legend: list[str] = []
    for name, pattern in _PATTERNS.items():
        if not pattern.search(msg):
            continue
        mapped = INTERNAL_NAMES[name]
        if calibrated and name in ("sigma_bar", "sigma_max"):
            mapped = ("bound-calibration",)
        keys += [k for k in mapped if k not in keys]
        legend.append(f"{name} is '{mapped[0]}'" if len(mapped) == 1 else
                      f"{name} follows from these keys")
    if not keys:
        if any(pattern.search(msg) for pattern in _KEY_PATTERNS.values()):
            return ConfigError(msg)  # the message already names its key
        if not isinstance(exc, ArithmeticError):
            return None
        keys = [k for k in stage_keys if k in cfg]
    label = "key" if len(keys) == 1 else "keys"
    shown = ", ".join(f"'{k}' = {cfg.get(k)!r}" for k in keys)
    names = f" ({'; '.join(legend)})" if legend else ""
    what = f"{type(exc).__name__}: {msg}" if isinstance(exc, ArithmeticError) else msg
    return ConfigError(f"run-config {label} {shown}{names}: {what}")


@contextmanager
def run_config_errors(cfg: ConfigLike, stage_keys: Sequence[str] = ()) -> Iterator[None]:
    """Re-raise ValueError, TypeError and ArithmeticError of the block as :func:`as_config_error`
    (a :class:`ConfigError`, itself a ValueError) where it names a key; other errors pass."""
    cfg = RunConfig.coerce(cfg)
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError, ArithmeticError) as exc:
        err = as_config_error(exc, cfg, stage_keys)
        if err is None:
            raise
        raise err from exc


@dataclass
class TSFAPlan:
    """What the server needs before round 1: the channel, the rank and the online controller.

    ``T_bar`` is the budget in seconds (``latency-budget`` when > 0, else
    ``latency-budget-fraction`` x ``dense_nominal_s``); ``dense_nominal_s`` the dense upload's
    round delay at ``lora-rank`` on the nominal channel (A.10) with the payload model in use;
    ``start_rho`` the ratio of empty-queue rounds (None: rho_min, ``tsfa-start = "dense"``).
    """

    channel: Channel
    bound: BoundConstants
    rank: int
    controller: TSFAController
    offline: OfflineResult | None  # None for OSFA (user-fixed rank)
    T_bar: float = 0.0
    dense_nominal_s: float = 0.0
    start_rho: float | None = None
    payload_model: str = "values"


def channel_config(cfg: ConfigLike, num_clients: int) -> ChannelConfig:
    """ChannelConfig (A.3) from run-config keys; q follows the wire dtype (32 or 16 bits)."""
    cfg = RunConfig.coerce(cfg)
    return ChannelConfig(
        num_clients=num_clients,
        min_distance_m=cfg.channel.channel_distance_min,
        max_distance_m=cfg.channel.channel_distance_max,
        path_loss_exponent=cfg.channel.path_loss_exponent,
        tx_power_w=cfg.channel.tx_power_w,
        bandwidth_hz=cfg.channel.bandwidth_hz,
        noise_psd_dbm_per_hz=cfg.channel.noise_psd_dbm_hz,
        bits_per_value=quantize.value_bits(cfg.compression.wire_dtype),
        path_loss_model=cfg.channel.path_loss_model,  # type: ignore[arg-type]
        ref_loss_db=cfg.channel.path_loss_ref_db,
        ref_distance_m=cfg.channel.path_loss_ref_distance_m,
        shadowing_db=cfg.channel.shadowing_db,
        noise_figure_db=cfg.channel.noise_figure_db,
        bandwidth_noise=cfg.channel.bandwidth_noise,  # type: ignore[arg-type]
        csi_error=cfg.channel.csi_error,
    )


def bound_constants(cfg: ConfigLike) -> BoundConstants:
    """Surrogate Phi constants (A.8) from run-config keys (PROPOSED-L, all configurable).

    With ``bound-calibration`` set, sigma_bar_r (per rank, eq. 19) and sigma_max (Assumption
    6) come from that ``calibration.json`` (see :mod:`fedsoft.wireless.calibration`) instead of
    ``bound-sigma-bar/max``; with ``"auto"`` from ``<run-dir>/calibration.json``, which the
    pilot of :func:`strategies.pilot.ensure_calibration` writes (TSFA only: OSFA fixes the rank
    and P3, eq. 39, does not depend on sigma, so ``"auto"`` leaves it on the two keys).
    """
    cfg = RunConfig.coerce(cfg)
    sigma_bar: float | np.ndarray = cfg.bound.bound_sigma_bar
    sigma_max = cfg.bound.bound_sigma_max
    path = cfg.bound.bound_calibration
    if path == AUTO:
        path = str(calibration_file(cfg)) if cfg.run.strategy == "tsfa" else ""
        if path and not Path(path).is_file():
            raise ConfigError(
                f"run-config key 'bound-calibration' = 'auto': {path} not found; the ServerApp "
                "writes it with a pilot run before the offline stage (strategies.pilot)")
    if path:
        sigma_bar, sigma_max = load_calibration(path)
        ranks = (parse_int_list(cfg.tsfa.tsfa_ranks, "tsfa-ranks")
                 if cfg.run.strategy == "tsfa" else [cfg.training.lora_rank])
        if max(ranks) > sigma_bar.size:
            raise ValueError(
                f"bound-calibration={path!r} has sigma_bar for ranks 1..{sigma_bar.size}, but the "
                f"candidate ranks go up to {max(ranks)}: calibrate from a pilot with "
                f"lora-rank >= {max(ranks)} or drop the larger ranks from tsfa-ranks"
            )
    return BoundConstants(
        kappa_R=cfg.bound.bound_kappa_r,
        kappa_S=cfg.bound.bound_kappa_s,
        kappa_C=cfg.bound.bound_kappa_c,
        kappa_E=cfg.bound.bound_kappa_e,
        r_star_ideal=cfg.bound.bound_rank_ideal,
        sigma_bar=sigma_bar,
        sigma_max=sigma_max,
        p=cfg.bound.bound_p,
    )


def payload_bits_fn(cfg: ConfigLike, layer_dims: Sequence[tuple[str, int, int]],
                    head_sizes: Sequence[int | RowsSpec]) -> Callable[[int, float], float]:
    """(r, rho) -> bits of one client's encoded upload at rank r (values in ``wire-dtype``,
    positions as the codec sends them for ``sparsifier``, counts, dense head, Flower framing).
    ``layer_dims`` are (name, d, k) of the adapted layers."""
    cfg = RunConfig.coerce(cfg)
    dtype = cfg.compression.wire_dtype
    seeded = bool(SparseSettings.from_config(cfg, 0.0).make().positions_from_seed)

    def bits(rank: int, rho: float) -> float:
        specs = [LayerSpec(name, int(rank), d, k) for name, d, k in layer_dims]
        return 8.0 * estimate_payload_bytes(specs, list(head_sizes), float(rho), dtype=dtype,
                                            seeded_positions=seeded,
                                            head_sparsity=cfg.compression.head_sparsity)

    return bits


def payload_bits_for_model(cfg: ConfigLike, model: Any) -> Callable[[int, float], float]:
    """:func:`payload_bits_fn` for a peft LoRA model (its adapted layers and dense head)."""
    cfg = RunConfig.coerce(cfg)
    from fedsoft import lora  # lazy: torch

    shapes = lora.factor_shapes(model)
    heads = [rows_spec(n, tuple(v.shape)) for n, v in lora.get_head(model).items()]
    return payload_bits_fn(cfg, [(s.name, s.d, s.k) for s in shapes], heads)


def values_payload_fn(d_plus_k_total: int, q: int) -> Callable[[int, float], float]:
    """The paper's values-only payload (1 - rho) r (d+k) q of eqs. (6), (29), (39)."""
    return lambda rank, rho: (1.0 - float(rho)) * int(rank) * d_plus_k_total * q


def plan(cfg: ConfigLike, num_clients: int, d_plus_k_total: int,
         payload_bits: Callable[[int, float], float] | None = None) -> TSFAPlan:
    """Offline stage for ``strategy = tsfa`` (rank r* from the mean channel, Lemma 2) or the
    user-fixed rank for ``osfa``; then the online controller (eqs. 30-41).

    ``d_plus_k_total`` is sum over adapted layers of d_l + k_l (payload r (d+k) q, eq. 6).
    ``payload_bits`` (see :func:`payload_bits_fn`, :func:`payload_bits_for_model`) is the real
    encoded upload size; with ``payload-model = "wire"`` (default) the offline stage, P3 and the
    predicted latency all use it. Without it (or with ``payload-model = "values"``) they use the
    values-only count of eq. (29); a warning says so when ``wire`` was asked for.
    """
    cfg = RunConfig.coerce(cfg)
    with run_config_errors(cfg, CHANNEL_KEYS):
        channel = Channel(channel_config(cfg, num_clients), seed=cfg.run.seed)
        _ = channel.noise_w  # an overflowing noise PSD fails here, named as a channel key
        if not np.all(channel.mean_gains() > 0.0):
            raise ValueError("full_snr must be > 0: the mean gains underflow to 0")
    with run_config_errors(cfg, BOUND_KEYS):
        bound = bound_constants(cfg)
    with run_config_errors(cfg, (*TSFA_KEYS, *CHANNEL_KEYS)):
        return _plan(cfg, num_clients, d_plus_k_total, payload_bits, channel, bound)


def budget_seconds(cfg: ConfigLike, dense_s: float) -> float:
    """T_bar in seconds (eq. 24c): ``latency-budget`` when > 0, else
    ``latency-budget-fraction`` x ``dense_s``, the nominal dense round latency."""
    cfg = RunConfig.coerce(cfg)
    given = cfg.tsfa.latency_budget
    return given if given > 0 else cfg.tsfa.latency_budget_fraction * dense_s


def _budget_error(cfg: RunConfig, min_s: float, dense_s: float, what: str
                  ) -> ConfigError:
    if cfg.tsfa.latency_budget > 0:
        key, given = "latency-budget", cfg.tsfa.latency_budget
        smallest = f"latency-budget = {min_s:.6g} s"
    else:
        key, given = "latency-budget-fraction", cfg.tsfa.latency_budget_fraction
        smallest = f"latency-budget-fraction = {min_s / dense_s:.6g} (x the nominal dense " \
                   f"latency {dense_s:.6g} s, i.e. {min_s:.6g} s)"
    return ConfigError(
        f"run-config key '{key}' = {given!r} is infeasible: {what}; the smallest feasible "
        f"budget is {smallest}")


def _plan(cfg: RunConfig, num_clients: int, d_plus_k_total: int,
          payload_bits: Callable[[int, float], float] | None, channel: Channel,
          bound: BoundConstants) -> TSFAPlan:
    k = min(cfg.run.clients_per_round, num_clients)
    q = channel.config.bits_per_value
    model = cfg.tsfa.payload_model
    if model == "wire" and payload_bits is None:
        warnings.warn(
            "payload-model = 'wire' but no payload_bits was given to tsfa_plan.plan: planning "
            "with the values-only payload (1 - rho) r (d+k) q, which leaves out positions, "
            "counts and the dense head; pass payload_bits=tsfa_plan.payload_bits_for_model(cfg, "
            "model)", UserWarning, stacklevel=3)
        model = "values"
    bits = payload_bits if model == "wire" and payload_bits is not None else \
        values_payload_fn(d_plus_k_total, q)
    rho_min, rho_max = cfg.tsfa.sparsity_min, cfg.tsfa.sparsity_max
    nominal = cfg.tsfa.offline_nominal
    _, per_bit = nominal_seconds_per_bit(channel, k, nominal)
    dense_s = float(bits(cfg.training.lora_rank, 0.0)) * per_bit
    t_bar = budget_seconds(cfg, dense_s)
    if cfg.run.strategy == "osfa":
        rank = cfg.training.lora_rank
        floor = float(bits(rank, rho_max)) * per_bit
        if floor > t_bar:
            raise _budget_error(cfg, floor, dense_s, f"rank {rank} needs {floor:.6g} s at "
                                f"sparsity-max = {rho_max!r} on the nominal channel")
        result = None
    else:
        try:
            result = choose_rank_for_channel(
                channel, k, parse_int_list(cfg.tsfa.tsfa_ranks, "tsfa-ranks"), bound,
                d_plus_k_total=d_plus_k_total, T_bar=t_bar, rho_min=rho_min, rho_max=rho_max,
                nominal=nominal,  # type: ignore[arg-type]
                payload_bits=bits if model == "wire" else None,
            )
        except InfeasibleLatencyError as exc:
            raise _budget_error(cfg, exc.min_budget_s, dense_s, str(exc)) from exc
        rank = result.r_star
    start = cfg.tsfa.tsfa_start
    start_rho = (budget_rho(lambda x: bits(rank, x), t_bar, per_bit, rho_min, rho_max)
                 if start == "budget" else None)
    controller_cls = OSFAController if result is None else TSFAController
    controller = controller_cls(
        rank, bound,
        V=cfg.tsfa.lyapunov_v,
        T_bar=t_bar,
        d_plus_k_total=d_plus_k_total,
        channel=channel.config,
        rho_min=rho_min,
        rho_max=rho_max,
        solver=cfg.tsfa.p3_solver,  # type: ignore[arg-type]
        payload_bits=(lambda x: float(bits(rank, x))) if model == "wire" else None,
        empty_queue_rho=start_rho,
        deadline_factor=(cfg.tsfa.tsfa_deadline_factor
                         if cfg.tsfa.tsfa_deadline == "budget-multiple" else None),
    )
    return TSFAPlan(channel, bound, rank, controller, result, t_bar, dense_s, start_rho, model)


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
