"""Typed run config: sections of the flat run-config keys (default, check, help), resolve."""

from __future__ import annotations

import math
import numbers
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

Scalar = bool | int | float | str

# what a preset may be called: the stem of a file in conf/, no path separators or dots
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ConfigError(ValueError):
    """A run-config key has a bad value, or is unknown."""


@dataclass(frozen=True)
class Key:
    """One run-config key: default, check, the allowed range in words and a help line."""

    default: Scalar
    check: Callable[[Any], bool] | None = None
    allowed: str = ""
    help: str = ""


def opt(
    default: Scalar, check: Callable[[Any], bool] | None = None, allowed: str = "", *, help: str
) -> Any:  # noqa: A002 - the field's help text, as in peft's configs
    """A section field for the run-config key named like the field (``_`` -> ``-``)."""
    return field(default=default, metadata={"key": Key(default, check, allowed, help)})


def check_sparsity(value: object, name: str = "sparsity") -> float:
    """The one check of a sparsification ratio rho (eqs. 6, 9): a finite real in [0, 1).

    Used by the run config (``sparsity``), the round plan (``sparsity-ratio``), the client's
    settings and :func:`keep_count`; TypeError for a non-number, ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out) or not 0.0 <= out < 1.0:
        raise ValueError(f"{name} = {value!r}: must be in [0, 1)")
    return out



def _sparsity_ok(v: Any) -> bool:
    try:
        check_sparsity(v)
    except (TypeError, ValueError):
        return False
    return True


def _choice(*names: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in names), "one of " + ", ".join(repr(n) for n in names)


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


STRATEGIES = ("fedavg", "tsfa", "osfa", "sketch")
SPARSIFIERS = ("dense", "soft", "flasc", "rlora", "hetlora", "fedlodrop", "svd")


@dataclass(frozen=True)
class RunSection:
    """Rounds, sampling, seeds, output and the server's defences (the run as a whole)."""

    preset: str = opt(
        "",
        None,
        "a name of a file in conf/ (without .toml) or empty",
        help="name of a conf/<preset>.toml to start from ('' = none)",
    )
    num_server_rounds: int = opt(5, _non_negative, ">= 0", help="federated rounds")
    clients_per_round: int = opt(
        2, _positive, ">= 1", help="K sampled per round (capped at N = number of SuperNodes)"
    )
    min_available_nodes: int = opt(
        1, _positive, ">= 1", help="wait until this many SuperNodes are connected before round 1"
    )
    seed: int = opt(
        0, _non_negative, ">= 0", help="one seed for sampling, partitioning, init, channel draws"
    )
    strategy: str = opt(
        "fedavg",
        *_choice(*STRATEGIES),
        help="fedavg (fixed ratio) | tsfa | osfa (TSFA-controlled ratio)",
    )
    device: str = opt("auto", *_choice("auto", "cpu", "cuda"), help="auto | cpu | cuda")
    run_dir: str = opt(
        "", None, "a path or empty", help="output directory ('' = runs/<time>-<strategy>)"
    )
    round_timeout: float = opt(
        3600.0, _positive, "> 0 seconds", help="seconds to wait for replies per round"
    )
    checkpoint_every: int = opt(
        0,
        _non_negative,
        ">= 0 rounds (0 = no checkpoints)",
        help="server checkpoint every N rounds (+ the last), 0 = off",
    )
    resume_from: str = opt(
        "",
        None,
        "a checkpoint directory (or a run's checkpoints/) or empty",
        help="checkpoint dir (or <run-dir>/checkpoints) to resume from",
    )
    client_state_dir: str = opt(
        "",
        None,
        "a directory or empty (= <run-dir>/client-state)",
        help="clients' error-memory files; empty = <run-dir>/client-state",
    )
    min_replies: int = opt(
        1, _positive, ">= 1", help="fewer valid replies than this: the round leaves the model as is"
    )
    max_num_examples: int = opt(
        1_000_000,
        _positive,
        ">= 1 (cap on a reply's reported num-examples when the server does "
        "not know the client's data share)",
        help="cap on a reply's num-examples when the server does not know its share",
    )
    update_norm_bound: float = opt(
        10.0,
        _non_negative,
        ">= 0 (reject an update whose norm exceeds this multiple of the "
        "round's reference norm; 0 = off)",
        help="drop an update > this x the round's reference norm (0 = off)",
    )
    fail_fraction: float = opt(
        0.0,
        lambda v: 0 <= v < 1,
        "0 <= fail-fraction < 1",
        help="testing: share of sampled clients that fail each round",
    )
    fail_mode: str = opt("crash", *_choice("crash", "timeout"), help="testing: crash | timeout")
    attack_partition: int = opt(
        -1,
        lambda v: v >= -1,
        ">= -1 (fault injection; -1 = off)",
        help="fault injection: this partition sends hostile replies (-1 = off)",
    )
    attack_mode: str = opt(
        "cycle",
        *_choice(
            "cycle",
            "crash",
            "empty-data",
            "huge-header",
            "float64",
            "huge-values",
            "garbage",
            "num-examples",
            "stale-round",
            "bad-metric",
            "nan",
        ),
        help="cycle | crash | one class of fedsoft.attacks.CLASSES",
    )


@dataclass(frozen=True)
class TrainingSection:
    """Model, data, LoRA structure and local optimisation (the learning task)."""

    model: str = opt(
        "minilm-l6", None, "a model spec name", help="model spec name (fedsoft/task/models.py)"
    )
    dataset: str = opt(
        "yahoo", None, "a dataset spec name", help="dataset spec name (fedsoft/task/data.py)"
    )
    max_train_examples: int = opt(
        4000,
        _non_negative,
        ">= 0 (0 = all)",
        help="cap on the train split before partitioning (0 = all)",
    )
    max_test_examples: int = opt(
        500,
        _non_negative,
        ">= 0 (0 = all)",
        help="cap on the held-out test split used by the server (0 = all)",
    )
    max_length: int = opt(64, _positive, ">= 1", help="text: tokens per example")
    image_size: int = opt(224, _positive, ">= 1", help="images: side in pixels")
    lora_rank: int = opt(8, _positive, ">= 1", help="LoRA rank r")
    lora_alpha: float = opt(
        16.0, _positive, "> 0", help="LoRA scaling alpha (update scaled by alpha / r)"
    )
    lora_target_modules: str = opt(
        "",
        None,
        "comma-separated module names",
        help="comma-separated module names ('' = the model spec's default)",
    )
    lora_layers: str = opt(
        "",
        None,
        "comma-separated non-negative block indices",
        help="comma-separated block indices to adapt ('' = the model spec's default)",
    )
    frozen_prefix: str = opt(
        "off",
        *_choice("off", "cache"),
        help="cache: compute the outputs of the blocks below the lowest LoRA block once per "
        "example and train / evaluate only the blocks above (BERT-family text models; set "
        "lora-layers to upper blocks) | off",
    )
    quantization: str = opt(
        "none",
        *_choice("none", "8bit", "4bit"),
        help="causal LMs: the frozen base in 8-bit or 4-bit (bitsandbytes, QLoRA; needs CUDA and "
        "pip install 'fedsoft[gpu]') | none (bf16 on CUDA, float32 on CPU)",
    )
    gradient_checkpointing: bool = opt(
        False, lambda v: isinstance(v, bool), "true | false",
        help="causal LMs: recompute block activations in backward (less memory, ~30% slower)",
    )
    packing: bool = opt(
        False, lambda v: isinstance(v, bool), "true | false",
        help="causal LMs: concatenate each training batch into one padding-free row "
        "(position_ids, block-causal attention); evaluation stays unpacked",
    )
    modules_to_save: str = opt(
        "", None, "comma-separated module names",
        help="extra modules trained and federated densely beside LoRA, as peft's "
        "modules_to_save (e.g. 'lm_head'); '' = the model spec's head only (none for causal LMs)",
    )
    prompt_template: str = opt(
        "short",
        *_choice("short", "alpaca"),
        help="causal LMs: instruction prompt, 'alpaca' (FlowerTune's preamble) or 'short' (no "
        "preamble, for small context windows)",
    )
    local_epochs: int = opt(1, _positive, ">= 1", help="local epochs (used when local-steps = 0)")
    local_steps: int = opt(
        20,
        _non_negative,
        ">= 0 (0 = use local-epochs)",
        help="local optimiser steps per round (0 = use local-epochs)",
    )
    batch_size: int = opt(16, _positive, ">= 1", help="local batch size")
    lr: float = opt(0.002, _positive, "> 0", help="AdamW learning rate")
    weight_decay: float = opt(0.01, _non_negative, ">= 0", help="AdamW weight decay")
    eval_batch_size: int = opt(64, _positive, ">= 1", help="server-side evaluation batch size")


@dataclass(frozen=True)
class PartitioningSection:
    """How the training set is split over the clients (non-IID)."""

    partitioner: str = opt(
        "iid", *_choice("iid", "dirichlet", "shard"), help="iid | dirichlet | shard"
    )
    dirichlet_alpha: float = opt(
        0.5, _positive, "> 0", help="Dirichlet concentration (partitioner = dirichlet)"
    )
    shards_per_client: int = opt(
        2, _positive, ">= 1", help="shards per client (partitioner = shard)"
    )


@dataclass(frozen=True)
class CompressionSection:
    """Sparsification of the uplink (arXiv 2505.00333 Sec. III) and its wire format."""

    sparsifier: str = opt(
        "dense",
        *_choice(*SPARSIFIERS),
        help="dense | soft | flasc | rlora | hetlora | fedlodrop | svd",
    )
    sparsity: float = opt(
        0.0,
        _sparsity_ok,
        "0 <= sparsity < 1",
        help="fraction of LoRA entries zeroed (rho); 0 with dense",
    )
    sparsify_target: str = opt(
        "update",
        *_choice("update", "factors"),
        help="update (local - global factors) | factors (paper text)",
    )
    wire_dtype: str = opt(
        "float32",
        *_choice("float32", "float16", "int8", "int4"),
        help="dtype of the values on the wire: float32 | float16 | int8 | int4 (integer codes "
        "with a float32 scale per row; the rounding error stays in the error memory)",
    )
    head_sparsity: float = opt(
        0.0,
        _sparsity_ok,
        "0 <= head-sparsity < 1",
        help="fraction of head entries zeroed per round (top-k of the head's change with its "
        "own error memory); 0 = dense head",
    )
    downlink_sparsity: float = opt(
        0.0,
        _sparsity_ok,
        "0 <= downlink-sparsity < 1",
        help="fraction of the global change zeroed in the server's broadcast (server-side "
        "error memory); 0 = the full model every round",
    )
    downlink_history: int = opt(
        4,
        _positive,
        ">= 1",
        help="with downlink-sparsity > 0: broadcast models the server keeps, so a client that "
        "last synchronised up to this many rounds ago gets the change since then (older: the "
        "full model)",
    )
    soft_split: str = opt(
        "joint",
        *_choice("joint", "ab"),
        help="SOFT top-k_j over [b_j; a_j] jointly | ab (split A/B)",
    )
    zeta: float = opt(
        0.0, _non_negative, ">= 0", help="weight of SOFT's orthogonality loss (0 = off)"
    )


@dataclass(frozen=True)
class TSFASection:
    """TSFA's two stages: latency budget, Lyapunov controller, P3, offline ranks (Sec. IV)."""

    latency_budget: float = opt(
        0.0,
        _non_negative,
        ">= 0 seconds (T_bar, eq. 24c); 0 = "
        "latency-budget-fraction x the nominal dense round latency",
        help="TSFA/OSFA: average uplink latency budget T_bar in seconds (eq. 24c); 0 = use the "
        "fraction below",
    )
    latency_budget_fraction: float = opt(
        0.5,
        _positive,
        "> 0 (T_bar as a fraction of the nominal dense round "
        "latency; used when latency-budget = 0)",
        help="T_bar = this x the nominal dense round latency at lora-rank (when latency-budget = "
        "0)",
    )
    tsfa_start: str = opt(
        "budget",
        *_choice("budget", "dense"),
        help="empty-queue rounds (round 1 included): budget (rho meeting T_bar on the nominal "
        "channel) | dense (rho_min, P3 as written)",
    )
    tsfa_deadline: str = opt(
        "budget-multiple",
        *_choice("budget-multiple", "off"),
        help="TSFA/OSFA outage rule (PROPOSED, not in paper A): budget-multiple (a scheduled "
        "client that cannot upload within tsfa-deadline-factor x T_bar skips the round) | off "
        "(paper A: wait for every scheduled client)",
    )
    tsfa_deadline_factor: float = opt(
        3.0,
        lambda v: 0 < v <= 1000,
        "0 < tsfa-deadline-factor <= 1000 (F: deadline = F x T_bar)",
        help="F: round deadline F x T_bar of the outage rule",
    )
    payload_model: str = opt(
        "wire",
        *_choice("wire", "values"),
        help="offline stage, P3, predicted latency: wire (encoded size: values, positions, counts, "
        "head, framing) | values (paper eq. 6)",
    )
    lyapunov_v: float = opt(
        0.001,
        _non_negative,
        ">= 0 (V, eq. 33)",
        help="TSFA/OSFA: Lyapunov penalty weight V (eq. 33); see bench/tsfa_v_sweep.py",
    )
    sparsity_min: float = opt(
        0.0, lambda v: 0 <= v < 1, "0 <= sparsity-min < 1", help="TSFA/OSFA: rho_min (eq. 39b)"
    )
    sparsity_max: float = opt(
        0.99,
        lambda v: 0 < v < 1,
        "0 < sparsity-max < 1",
        help="TSFA/OSFA: practical cap rho_max < 1",
    )
    tsfa_ranks: str = opt(
        "1,2,4,8,16,32",
        None,
        "comma-separated candidate ranks >= 1",
        help="TSFA offline stage: candidate LoRA ranks",
    )
    p3_solver: str = opt(
        "cvxpy",
        *_choice("cvxpy", "bisection", "closed_form"),
        help="TSFA online P3 solver: cvxpy | bisection | closed_form",
    )
    offline_nominal: str = opt(
        "scaled",
        *_choice("scaled", "representative"),
        help="offline scheduled set: scaled (all N x K/N) | representative",
    )


@dataclass(frozen=True)
class ChannelSection:
    """The wireless uplink: geometry, path loss, fading, noise, CSI (eq. 6)."""

    channel_distance_min: float = opt(
        50.0, _positive, "> 0 metres", help="channel: client distance range in m (uniform)"
    )
    channel_distance_max: float = opt(
        300.0,
        _positive,
        "> 0 metres, >= channel-distance-min",
        help="channel: client distance range in m (uniform)",
    )
    path_loss_exponent: float = opt(3.5, _positive, "> 0", help="channel: kappa")
    tx_power_w: float = opt(0.1, _positive, "> 0 W", help="channel: transmit power P in W")
    bandwidth_hz: float = opt(
        1.0e6, _positive, "> 0 Hz", help="channel: total uplink bandwidth B_tot in Hz (FDMA)"
    )
    noise_psd_dbm_hz: float = opt(-174.0, None, "dBm/Hz", help="channel: thermal noise PSD N0")
    path_loss_model: str = opt(
        "log-distance",
        *_choice("log-distance", "3gpp-uma", "paper"),
        help="channel: log-distance (PL(d0) + 10 n log10(d/d0)) | 3gpp-uma (128.1 + 37.6 "
        "log10(d/km)) | paper (d^-kappa)",
    )
    path_loss_ref_db: float = opt(
        43.3,
        _non_negative,
        ">= 0 dB (PL(d0) of log-distance)",
        help="channel: PL(d0) in dB (free space at 1 m, 3.5 GHz)",
    )
    path_loss_ref_distance_m: float = opt(
        1.0, _positive, "> 0 metres (d0 of log-distance)", help="channel: d0 in m"
    )
    shadowing_db: float = opt(
        0.0,
        lambda v: 0 <= v <= 30,
        "0 <= shadowing-db <= 30 dB (sigma)",
        help="channel: log-normal shadowing sigma in dB, per client, fixed",
    )
    noise_figure_db: float = opt(
        7.0,
        lambda v: 0 <= v <= 30,
        "0 <= noise-figure-db <= 30 dB",
        help="channel: receiver noise figure in dB",
    )
    bandwidth_noise: str = opt(
        "allocated",
        *_choice("allocated", "total"),
        help="channel: noise over the allocated share N0 F b_i B_tot | total (paper: N0 F B_tot, "
        "eq. 41 exact)",
    )
    csi_error: float = opt(
        0.0,
        lambda v: 0 <= v <= 10,
        "0 <= csi-error <= 10 (0 = perfect CSI)",
        help="channel: server's CSI error, LS estimate g + eps w (NMSE eps^2); 0 = perfect",
    )


@dataclass(frozen=True)
class BoundSection:
    """Constants of the convergence-bound surrogate Phi (A.8) and their calibration."""

    bound_kappa_r: float = opt(
        1.0, _non_negative, ">= 0", help="surrogate Phi (A.8): rank-error weight"
    )
    bound_kappa_s: float = opt(
        0.0, _non_negative, ">= 0", help="surrogate Phi: constant (partial participation) term"
    )
    bound_kappa_c: float = opt(
        0.001, _non_negative, ">= 0", help="surrogate Phi: covariance weight"
    )
    bound_kappa_e: float = opt(
        1.0, _non_negative, ">= 0", help="surrogate Phi: sparsification weight"
    )
    bound_rank_ideal: float = opt(
        64.0,
        lambda v: v >= 1,
        ">= 1 (R*, a rank)",
        help="surrogate Phi: R*, rank of the ideal LoRA update (eq. 19)",
    )
    bound_sigma_bar: float = opt(
        1.0, _non_negative, ">= 0", help="surrogate Phi: sigma_bar_r (eq. 19)"
    )
    bound_sigma_max: float = opt(
        1.0, _non_negative, ">= 0", help="surrogate Phi: sigma_max (Assumption 6)"
    )
    bound_p: int = opt(
        1, lambda v: v in (1, 2), "1 or 2", help="surrogate Phi: exponent of rho/(1-rho)^2 (1 | 2)"
    )
    bound_calibration: str = opt(
        "",
        None,
        "'auto', a path to a calibration.json, or empty",
        help="'auto' (pilot run first) | calibration.json from `python -m "
        "fedsoft.wireless.calibration` | '' (sigma-bar/max keys)",
    )
    bound_pilot_rounds: int = opt(
        3,
        _positive,
        ">= 1 rounds (bound-calibration = 'auto')",
        help="bound-calibration = 'auto': rounds of the dense pilot at max(tsfa-ranks)",
    )
    bound_pilot_local_steps: int = opt(
        5,
        _positive,
        ">= 1 local steps per pilot round (bound-calibration = 'auto')",
        help="bound-calibration = 'auto': local steps per pilot round",
    )


@dataclass(frozen=True)
class SketchingSection:
    """Paper B (arXiv 2505.23555): sampling, sketch sizes, objective J, system model."""

    sampling: str = opt(
        "optimized",
        *_choice("optimized", "uniform", "full"),
        help="sketch: optimized | uniform | full participation",
    )
    sampling_q: float = opt(
        0.5,
        lambda v: 0 < v <= 1,
        "0 < sampling-q <= 1",
        help="sketch: uniform q; budget of expected participants = q x N",
    )
    sampling_q_min: float = opt(
        0.05,
        lambda v: 0 < v <= 1,
        "0 < sampling-q-min <= 1",
        help="sketch: smallest q_n the optimiser may choose",
    )
    sketch_ratio: float = opt(
        0.5,
        lambda v: 0 < v <= 1,
        "0 < sketch-ratio <= 1",
        help="sketch: k/r of the fixed sketch (and the optimiser's start)",
    )
    sketch_k: str = opt(
        "optimized",
        *_choice("optimized", "fixed"),
        help="sketch: optimized | fixed sketch sizes k_n",
    )
    sketch_alpha0: float = opt(
        1.0, _non_negative, ">= 0", help="sketch: R_eps constant alpha0 (B.4)"
    )
    sketch_alpha1: float = opt(
        1.0, _positive, "> 0", help="sketch: R_eps variance weight alpha1 (B.4)"
    )
    sketch_xi: float = opt(
        0.5,
        _non_negative,
        ">= 0",
        help="sketch: variance inflation of sketching, alpha_n(k) ~ 1 + xi (r/k - 1)",
    )
    sketch_mc_draws: int = opt(
        256, _positive, ">= 1", help="sketch: Monte-Carlo draws for E[round time]"
    )
    sketch_calibration: str = opt(
        "",
        None,
        "'' (sketch-alpha0/alpha1/xi as given), 'auto' (pilot "
        "in the ServerApp, then fit) or a path to a "
        "sketch_calibration.json",
        help="sketch: '' (alpha0/alpha1/xi above) | 'auto' (pilot, fit) | path to "
        "sketch_calibration.json",
    )
    sketch_pilot_rounds: int = opt(
        4,
        lambda v: v >= 2,
        ">= 2 rounds per pilot setting",
        help="sketch: rounds per (q, k) setting of the 'auto' pilot",
    )
    sketch_pilot_target: float = opt(
        0.8,
        lambda v: 0 < v <= 1,
        "0 < sketch-pilot-target <= 1",
        help="sketch: fit target = this x the smallest loss decrease of a pilot run",
    )
    server_lr: float = opt(
        1.0, _positive, "> 0", help="sketch: server step on the unbiased aggregate (B.1)"
    )
    compute_s_per_step: float = opt(
        0.5,
        _positive,
        "> 0 seconds",
        help="sketch: mean seconds per local step at full rank (simulated)",
    )
    compute_heterogeneity: float = opt(
        0.5,
        _non_negative,
        ">= 0 (log-normal sigma)",
        help="sketch: log-normal sigma of per-client compute speed",
    )
    compute_lora_share: float = opt(
        0.3,
        lambda v: 0 <= v <= 1,
        "0 <= compute-lora-share <= 1",
        help="sketch: share of a step that scales with k/r (1 - phi0)",
    )
    bandwidth_allocation: str = opt(
        "equal_finish",
        *_choice("equal_finish", "equal"),
        help="sketch: equal_finish | equal among participants (B.3)",
    )
    round_overhead_s: float = opt(
        1.0,
        _non_negative,
        ">= 0 seconds",
        help="sketch: fixed simulated seconds per round (sync + broadcast)",
    )


SECTION_TYPES: dict[str, type] = {
    "run": RunSection,
    "training": TrainingSection,
    "partitioning": PartitioningSection,
    "compression": CompressionSection,
    "tsfa": TSFASection,
    "channel": ChannelSection,
    "bound": BoundSection,
    "sketching": SketchingSection,
}


def _schema() -> dict[str, Key]:
    out: dict[str, Key] = {}
    for section in SECTION_TYPES.values():
        for f in fields(section):
            key = f.name.replace("_", "-")
            if key in out:
                raise AssertionError(f"run-config key {key!r} is in two sections")
            out[key] = f.metadata["key"]
    return out


_SCHEMA: dict[str, Key] = _schema()
# run-config key -> (section attribute, field name)
KEY_SECTION: dict[str, tuple[str, str]] = {
    f.name.replace("_", "-"): (name, f.name)
    for name, section in SECTION_TYPES.items()
    for f in fields(section)
}


@dataclass(frozen=True)
class RunConfig:
    """The resolved run config: one frozen section per topic, built and checked once.

    Users write the flat kebab-case keys (``[tool.flwr.app.config]``, presets, ``--run-config``);
    code reads typed fields, e.g. ``cfg.training.lora_rank`` or ``cfg.channel.csi_error``
    (the field is the key with ``-`` -> ``_``). ``cfg["lora-rank"]`` and :meth:`flat` give the
    flat view (config.json, checkpoints, error messages); :meth:`with_values` returns a
    re-checked copy with some keys changed (e.g. the rank TSFA's offline stage picked).
    """

    run: RunSection = field(default_factory=RunSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    partitioning: PartitioningSection = field(default_factory=PartitioningSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    tsfa: TSFASection = field(default_factory=TSFASection)
    channel: ChannelSection = field(default_factory=ChannelSection)
    bound: BoundSection = field(default_factory=BoundSection)
    sketching: SketchingSection = field(default_factory=SketchingSection)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from flat keys (missing keys take their defaults); each value is checked."""
        checked = validate(values)
        parts: dict[str, dict[str, Scalar]] = {name: {} for name in SECTION_TYPES}
        for key, value in checked.items():
            section, name = KEY_SECTION[key]
            parts[section][name] = value
        return cls(**{name: SECTION_TYPES[name](**kw) for name, kw in parts.items()})

    @classmethod
    def coerce(cls, cfg: RunConfig | Mapping[str, Any]) -> RunConfig:
        """``cfg`` itself, or a flat mapping (e.g. ``{**DEFAULTS, ...}``) checked key by key."""
        return cfg if isinstance(cfg, RunConfig) else cls.from_flat(cfg)

    def flat(self) -> dict[str, Scalar]:
        """Every key as users write it, in schema order (what config.json holds)."""
        return {key: getattr(getattr(self, s), n) for key, (s, n) in KEY_SECTION.items()}

    def with_values(self, changes: Mapping[str, Any]) -> RunConfig:
        """A copy with flat ``changes`` applied, each checked as if the user had given it."""
        checked = validate(changes)
        out = self
        for key, value in checked.items():
            section, name = KEY_SECTION[key]
            out = replace(out, **{section: replace(getattr(out, section), **{name: value})})
        return out

    # the flat, read-only Mapping view, for code and files that speak in keys
    def __getitem__(self, key: str) -> Scalar:
        try:
            section, name = KEY_SECTION[key]
        except KeyError:
            raise KeyError(f"unknown run-config key {key!r}") from None
        return getattr(getattr(self, section), name)

    def __contains__(self, key: object) -> bool:
        return key in KEY_SECTION

    def __iter__(self):  # noqa: ANN204 - iterates the flat keys, like a Mapping
        return iter(KEY_SECTION)

    def __len__(self) -> int:
        return len(KEY_SECTION)

    def keys(self):  # noqa: ANN201
        return KEY_SECTION.keys()

    def items(self):  # noqa: ANN201
        return self.flat().items()

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in KEY_SECTION else default

    def __eq__(self, other: object) -> bool:
        """Equal to another RunConfig or a mapping with the same flat keys and values."""
        if isinstance(other, RunConfig):
            return self.flat() == other.flat()
        if isinstance(other, Mapping):
            return self.flat() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to dicts, so not hashable


Mapping.register(RunConfig)  # a read-only Mapping of the flat keys (isinstance checks)


ConfigLike = RunConfig | Mapping[str, Any]  # what library functions accept (coerced on entry)


def help_text(key: str) -> str:
    """The one-line help of a run-config key (the same words as pyproject.toml's comment)."""
    return _SCHEMA[key].help


DEFAULTS: dict[str, Scalar] = {k: spec.default for k, spec in _SCHEMA.items()}


def _coerce(key: str, value: Any) -> Scalar:
    """Return ``value`` converted to the type of the key's default, or raise ConfigError."""
    default = _SCHEMA[key].default
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(
                    f"run-config key '{key}' = {value!r}: must be a finite number (not inf or nan)"
                )
            return float(value)
    elif isinstance(value, str):
        return value
    raise ConfigError(f"run-config key '{key}' = {value!r}: expected {type(default).__name__}")


def validate(config: Mapping[str, Any]) -> dict[str, Scalar]:
    """Check every key: unknown keys and out-of-range values raise ConfigError."""
    unknown = sorted(set(config) - set(_SCHEMA))
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {unknown}; known keys: {sorted(_SCHEMA)}")
    out: dict[str, Scalar] = {}
    for key, value in config.items():
        value = _coerce(key, value)
        spec = _SCHEMA[key]
        if spec.check is not None and not spec.check(value):
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be {spec.allowed}")
        out[key] = value
    for key in ("lora-layers", "tsfa-ranks"):
        if key in out:
            ranks = parse_int_list(str(out[key]), key)
            if key == "tsfa-ranks" and (not ranks or min(ranks) < 1):
                raise ConfigError(f"run-config key '{key}' = {out[key]!r}: need ranks >= 1")
            if key == "tsfa-ranks" and len(set(ranks)) != len(ranks):
                raise ConfigError(f"run-config key '{key}' = {out[key]!r}: ranks must be distinct")
    return out


def parse_list(value: str) -> list[str]:
    """Split a comma-separated run-config string into its non-empty items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_int_list(value: str, key: str = "lora-layers") -> list[int]:
    """Parse a comma-separated list of non-negative integers."""
    items = parse_list(value)
    try:
        out = [int(item) for item in items]
    except ValueError:
        raise ConfigError(
            f"run-config key '{key}' = {value!r}: must be comma-separated integers"
        ) from None
    if any(i < 0 for i in out):
        raise ConfigError(f"run-config key '{key}' = {value!r}: indices must be >= 0")
    return out


def preset_names(conf_dir: Path) -> list[str]:
    """The presets of ``conf_dir``: stems of its ``*.toml`` files that are valid preset names."""
    return sorted(
        p.stem
        for p in Path(conf_dir).glob("*.toml")
        if PRESET_NAME.fullmatch(p.stem) and p.is_file()
    )


def load_preset(name: str, conf_dir: Path) -> dict[str, Scalar]:
    """Read ``conf_dir/<name>.toml`` (flat TOML of run-config keys).

    ``name`` must be one of :func:`preset_names` (no paths, no ``.toml``); errors list the
    known names and never show a file-system path."""
    known = preset_names(conf_dir)
    if not isinstance(name, str) or not PRESET_NAME.fullmatch(name) or name not in known:
        raise ConfigError(
            f"run-config key 'preset' = {name!r}: not a known preset; the presets "
            f"are the names of the files in conf/ without .toml: {known}"
        )
    try:
        with (Path(conf_dir) / f"{name}.toml").open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"run-config key 'preset' = {name!r}: conf/{name}.toml is unreadable "
            f"({type(exc).__name__})"
        ) from None
    if "preset" in data:
        raise ConfigError(f"preset {name!r}: conf/{name}.toml must not set 'preset' itself")
    try:
        return validate(data)
    except ConfigError as exc:
        raise ConfigError(f"preset {name!r} (conf/{name}.toml): {exc}") from None


def resolve(run_config: Mapping[str, Any], conf_dir: Path | None = None) -> RunConfig:
    """Fuse defaults, the named preset and the user's overrides, then validate.

    Precedence: DEFAULTS < ``conf/<preset>.toml`` < keys of ``run_config`` whose value differs
    from the default. flwr fuses pyproject defaults with ``--run-config`` before the app sees
    them, so an override that restates the default value cannot be told apart from no override:
    the preset's value then wins. ``run_config`` may be empty (``run_simulation`` passes ``{}``).
    """
    given = validate(run_config)
    merged = dict(DEFAULTS)
    preset = str(given.get("preset", ""))
    if preset:
        if conf_dir is None:
            raise ConfigError(f"run-config key 'preset' = {preset!r}: no conf/ directory given")
        merged.update(load_preset(preset, conf_dir))
    merged.update({k: v for k, v in given.items() if v != DEFAULTS[k]})
    merged["preset"] = preset
    out = validate(merged)
    _check_across_keys(out)
    return RunConfig.from_flat(out)


def _check_across_keys(out: dict[str, Scalar]) -> None:
    """Checks (and the one default) that involve more than one key; ``out`` is validated."""
    if out["sparsity-min"] >= out["sparsity-max"]:
        raise ConfigError(
            f"run-config keys 'sparsity-min' = {out['sparsity-min']!r} and 'sparsity-max' = "
            f"{out['sparsity-max']!r}: need 0 <= sparsity-min < sparsity-max < 1"
        )
    if out["channel-distance-min"] > out["channel-distance-max"]:
        raise ConfigError(
            f"run-config key 'channel-distance-max' = {out['channel-distance-max']!r}: must be "
            f">= channel-distance-min = {out['channel-distance-min']!r}"
        )
    if out["strategy"] in ("tsfa", "osfa") and out["sparsifier"] == "dense":
        # TSFA/OSFA choose SOFT's ratio every round: the default sparsifier means SOFT here
        out["sparsifier"] = "soft"
    if out["strategy"] == "sketch" and out["sparsifier"] != "dense":
        raise ConfigError(
            f"run-config key 'sparsifier' = {out['sparsifier']!r} with strategy = 'sketch': "
            "sketching sends whole rank components (sketch-ratio); set sparsifier = 'dense'"
        )
    if out["sampling-q-min"] > out["sampling-q"]:
        raise ConfigError(
            f"run-config key 'sampling-q-min' = {out['sampling-q-min']!r}: must be <= "
            f"sampling-q = {out['sampling-q']!r}"
        )
    if out["sparsifier"] == "svd":
        raise ConfigError(
            "run-config key 'sparsifier' = 'svd': the SVD oracle is a diagnostic (the reference "
            "of kept_energy_ratio and bench/selection_time.py), not an uplink: it sends "
            "rotated factors B' A' = B A whose difference from the local factors error feedback "
            "cannot carry, so training diverges even at sparsity 0; use soft (the SVD proxy)")
    if out["sparsifier"] == "dense" and (out["head-sparsity"] > 0
                                         or out["wire-dtype"] != "float32"):
        raise ConfigError(
            f"run-config keys 'head-sparsity' = {out['head-sparsity']!r} / 'wire-dtype' = "
            f"{out['wire-dtype']!r} with sparsifier = 'dense': dense LoRA replies with the "
            "full float32 arrays; choose a sparsifier (soft at sparsity = 0 sends every entry "
            "in the wire dtype)")
    if out["downlink-sparsity"] > 0 and out["sparsify-target"] == "factors":
        raise ConfigError(
            f"run-config key 'downlink-sparsity' = {out['downlink-sparsity']!r} with "
            "sparsify-target = 'factors': the server averages the clients' factors, which "
            "start from the compressed broadcast, so the server's unsent residual would be "
            "lost; use sparsify-target = 'update'")
    if out["sparsifier"] == "dense" and out["sparsity"] > 0:
        raise ConfigError(
            f"run-config key 'sparsity' = {out['sparsity']!r} with sparsifier = 'dense': dense "
            "LoRA sends every entry; set sparsity = 0 or choose a sparsifier"
        )
    if out["strategy"] == "sketch":  # independent sampling: at most the nodes waited for reply
        if out["min-replies"] > out["min-available-nodes"]:
            raise ConfigError(
                f"run-config keys 'min-replies' = {out['min-replies']!r} and "
                f"'min-available-nodes' = {out['min-available-nodes']!r}: with strategy = "
                "'sketch' need min-replies <= min-available-nodes, or no round is ever applied"
            )
    elif out["min-replies"] > out["clients-per-round"]:
        raise ConfigError(
            f"run-config keys 'min-replies' = {out['min-replies']!r} and 'clients-per-round' = "
            f"{out['clients-per-round']!r}: need min-replies <= clients-per-round, or no round "
            "is ever applied"
        )
    if (
        out["strategy"] in ("tsfa", "osfa")
        and out["p3-solver"] == "closed_form"
        and out["bound-p"] != 1
    ):
        raise ConfigError(
            f"run-config keys 'p3-solver' = 'closed_form' and 'bound-p' = {out['bound-p']!r}: "
            "the closed-form P3 solution needs bound-p = 1; use p3-solver = 'cvxpy' or "
            "'bisection'"
        )

