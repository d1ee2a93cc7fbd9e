"""Run-config schema: defaults, presets from conf/, validation with clear messages."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Scalar = bool | int | float | str

# what a preset may be called: the stem of a file in conf/, no path separators or dots
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ConfigError(ValueError):
    """A run-config key has a bad value, or is unknown."""


@dataclass(frozen=True)
class Key:
    """One run-config key: default, type and the allowed range in words."""

    default: Scalar
    check: Callable[[Any], bool] | None = None
    allowed: str = ""


def _choice(*names: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in names), "one of " + ", ".join(repr(n) for n in names)


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


STRATEGIES = ("fedavg", "tsfa", "osfa", "sketch")
SPARSIFIERS = ("dense", "soft", "flasc", "rlora", "hetlora", "fedlodrop", "svd")

_SCHEMA: dict[str, Key] = {
    "preset": Key("", None, "a name of a file in conf/ (without .toml) or empty"),
    "num-server-rounds": Key(5, _non_negative, ">= 0"),
    "clients-per-round": Key(2, _positive, ">= 1"),
    "min-available-nodes": Key(1, _positive, ">= 1"),
    "seed": Key(0, _non_negative, ">= 0"),
    "model": Key("minilm-l6", None, "a model spec name"),
    "dataset": Key("yahoo", None, "a dataset spec name"),
    "max-train-examples": Key(4000, _non_negative, ">= 0 (0 = all)"),
    "max-test-examples": Key(500, _non_negative, ">= 0 (0 = all)"),
    "max-length": Key(64, _positive, ">= 1"),
    "image-size": Key(224, _positive, ">= 1"),
    "partitioner": Key("iid", *_choice("iid", "dirichlet", "shard")),
    "dirichlet-alpha": Key(0.5, _positive, "> 0"),
    "shards-per-client": Key(2, _positive, ">= 1"),
    "lora-rank": Key(8, _positive, ">= 1"),
    "lora-alpha": Key(16.0, _positive, "> 0"),
    "lora-target-modules": Key("", None, "comma-separated module names"),
    "lora-layers": Key("", None, "comma-separated non-negative block indices"),
    "local-epochs": Key(1, _positive, ">= 1"),
    "local-steps": Key(20, _non_negative, ">= 0 (0 = use local-epochs)"),
    "batch-size": Key(16, _positive, ">= 1"),
    "lr": Key(0.002, _positive, "> 0"),
    "weight-decay": Key(0.01, _non_negative, ">= 0"),
    "eval-batch-size": Key(64, _positive, ">= 1"),
    "strategy": Key("fedavg", *_choice(*STRATEGIES)),
    "sparsifier": Key("dense", *_choice(*SPARSIFIERS)),
    "sparsity": Key(0.0, lambda v: 0 <= v < 1, "0 <= sparsity < 1"),
    "sparsify-target": Key("update", *_choice("update", "factors")),
    "wire-dtype": Key("float32", *_choice("float32", "float16")),
    "soft-split": Key("joint", *_choice("joint", "ab")),
    "zeta": Key(0.0, _non_negative, ">= 0"),
    "latency-budget": Key(0.0, _non_negative, ">= 0 seconds (T_bar, eq. 24c); 0 = "
                          "latency-budget-fraction x the nominal dense round latency"),
    "latency-budget-fraction": Key(0.5, _positive,
                                   "> 0 (T_bar as a fraction of the nominal dense round "
                                   "latency; used when latency-budget = 0)"),
    "tsfa-start": Key("budget", *_choice("budget", "dense")),
    "tsfa-deadline": Key("budget-multiple", *_choice("budget-multiple", "off")),
    "tsfa-deadline-factor": Key(3.0, lambda v: 0 < v <= 1000,
                                "0 < tsfa-deadline-factor <= 1000 (F: deadline = F x T_bar)"),
    "payload-model": Key("wire", *_choice("wire", "values")),
    "lyapunov-v": Key(0.001, _non_negative, ">= 0 (V, eq. 33)"),
    "sparsity-min": Key(0.0, lambda v: 0 <= v < 1, "0 <= sparsity-min < 1"),
    "sparsity-max": Key(0.99, lambda v: 0 < v < 1, "0 < sparsity-max < 1"),
    "tsfa-ranks": Key("1,2,4,8,16,32", None, "comma-separated candidate ranks >= 1"),
    "p3-solver": Key("cvxpy", *_choice("cvxpy", "bisection", "closed_form")),
    "offline-nominal": Key("scaled", *_choice("scaled", "representative")),
    "channel-distance-min": Key(50.0, _positive, "> 0 metres"),
    "channel-distance-max": Key(300.0, _positive, "> 0 metres, >= channel-distance-min"),
    "path-loss-exponent": Key(3.5, _positive, "> 0"),
    "tx-power-w": Key(0.1, _positive, "> 0 W"),
    "bandwidth-hz": Key(1.0e6, _positive, "> 0 Hz"),
    "noise-psd-dbm-hz": Key(-174.0, None, "dBm/Hz"),
    "path-loss-model": Key("log-distance", *_choice("log-distance", "3gpp-uma", "paper")),
    "path-loss-ref-db": Key(43.3, _non_negative, ">= 0 dB (PL(d0) of log-distance)"),
    "path-loss-ref-distance-m": Key(1.0, _positive, "> 0 metres (d0 of log-distance)"),
    "shadowing-db": Key(0.0, lambda v: 0 <= v <= 30, "0 <= shadowing-db <= 30 dB (sigma)"),
    "noise-figure-db": Key(7.0, lambda v: 0 <= v <= 30, "0 <= noise-figure-db <= 30 dB"),
    "bandwidth-noise": Key("allocated", *_choice("allocated", "total")),
    "csi-error": Key(0.0, lambda v: 0 <= v <= 10, "0 <= csi-error <= 10 (0 = perfect CSI)"),
    "bound-kappa-r": Key(1.0, _non_negative, ">= 0"),
    "bound-kappa-s": Key(0.0, _non_negative, ">= 0"),
    "bound-kappa-c": Key(0.001, _non_negative, ">= 0"),
    "bound-kappa-e": Key(1.0, _non_negative, ">= 0"),
    "bound-rank-ideal": Key(64.0, lambda v: v >= 1, ">= 1 (R*, a rank)"),
    "bound-sigma-bar": Key(1.0, _non_negative, ">= 0"),
    "bound-sigma-max": Key(1.0, _non_negative, ">= 0"),
    "bound-p": Key(1, lambda v: v in (1, 2), "1 or 2"),
    "bound-calibration": Key("", None, "'auto', a path to a calibration.json, or empty"),
    "bound-pilot-rounds": Key(3, _positive, ">= 1 rounds (bound-calibration = 'auto')"),
    "bound-pilot-local-steps": Key(5, _positive,
                                   ">= 1 local steps per pilot round (bound-calibration = "
                                   "'auto')"),
    "sampling": Key("optimized", *_choice("optimized", "uniform", "full")),
    "sampling-q": Key(0.5, lambda v: 0 < v <= 1, "0 < sampling-q <= 1"),
    "sampling-q-min": Key(0.05, lambda v: 0 < v <= 1, "0 < sampling-q-min <= 1"),
    "sketch-ratio": Key(0.5, lambda v: 0 < v <= 1, "0 < sketch-ratio <= 1"),
    "sketch-k": Key("optimized", *_choice("optimized", "fixed")),
    "sketch-alpha0": Key(1.0, _non_negative, ">= 0"),
    "sketch-alpha1": Key(1.0, _positive, "> 0"),
    "sketch-xi": Key(0.5, _non_negative, ">= 0"),
    "sketch-mc-draws": Key(256, _positive, ">= 1"),
    "sketch-calibration": Key("", None, "'' (sketch-alpha0/alpha1/xi as given), 'auto' (pilot "
                              "in the ServerApp, then fit) or a path to a "
                              "sketch_calibration.json"),
    "sketch-pilot-rounds": Key(4, lambda v: v >= 2, ">= 2 rounds per pilot setting"),
    "sketch-pilot-target": Key(0.8, lambda v: 0 < v <= 1, "0 < sketch-pilot-target <= 1"),
    "server-lr": Key(1.0, _positive, "> 0"),
    "compute-s-per-step": Key(0.5, _positive, "> 0 seconds"),
    "compute-heterogeneity": Key(0.5, _non_negative, ">= 0 (log-normal sigma)"),
    "compute-lora-share": Key(0.3, lambda v: 0 <= v <= 1, "0 <= compute-lora-share <= 1"),
    "bandwidth-allocation": Key("equal_finish", *_choice("equal_finish", "equal")),
    "round-overhead-s": Key(1.0, _non_negative, ">= 0 seconds"),
    "checkpoint-every": Key(0, _non_negative, ">= 0 rounds (0 = no checkpoints)"),
    "resume-from": Key("", None, "a checkpoint directory (or a run's checkpoints/) or empty"),
    "client-state-dir": Key("", None, "a directory or empty (= <run-dir>/client-state)"),
    "min-replies": Key(1, _positive, ">= 1"),
    "fail-fraction": Key(0.0, lambda v: 0 <= v < 1, "0 <= fail-fraction < 1"),
    "fail-mode": Key("crash", *_choice("crash", "timeout")),
    "max-num-examples": Key(1_000_000, _positive,
                            ">= 1 (cap on a reply's reported num-examples when the server does "
                            "not know the client's data share)"),
    "update-norm-bound": Key(10.0, _non_negative,
                             ">= 0 (reject an update whose norm exceeds this multiple of the "
                             "round's reference norm; 0 = off)"),
    "attack-partition": Key(-1, lambda v: v >= -1, ">= -1 (fault injection; -1 = off)"),
    "attack-mode": Key("cycle", *_choice("cycle", "crash", "empty-data", "huge-header",
                                         "float64", "huge-values", "garbage", "num-examples",
                                         "stale-round", "bad-metric", "nan")),
    "device": Key("auto", *_choice("auto", "cpu", "cuda")),
    "run-dir": Key("", None, "a path or empty"),
    "round-timeout": Key(3600.0, _positive, "> 0 seconds"),
}

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
    raise ConfigError(
        f"run-config key '{key}' = {value!r}: expected {type(default).__name__}"
    )


def validate(config: Mapping[str, Any]) -> dict[str, Scalar]:
    """Check every key: unknown keys and out-of-range values raise ConfigError."""
    unknown = sorted(set(config) - set(_SCHEMA))
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {unknown}; known keys: {sorted(_SCHEMA)}"
        )
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
    return sorted(p.stem for p in Path(conf_dir).glob("*.toml")
                  if PRESET_NAME.fullmatch(p.stem) and p.is_file())


def load_preset(name: str, conf_dir: Path) -> dict[str, Scalar]:
    """Read ``conf_dir/<name>.toml`` (flat TOML of run-config keys).

    ``name`` must be one of :func:`preset_names` (no paths, no ``.toml``); errors list the
    known names and never show a file-system path."""
    known = preset_names(conf_dir)
    if not isinstance(name, str) or not PRESET_NAME.fullmatch(name) or name not in known:
        raise ConfigError(f"run-config key 'preset' = {name!r}: not a known preset; the presets "
                          f"are the names of the files in conf/ without .toml: {known}")
    try:
        with (Path(conf_dir) / f"{name}.toml").open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"run-config key 'preset' = {name!r}: conf/{name}.toml is unreadable "
                          f"({type(exc).__name__})") from None
    if "preset" in data:
        raise ConfigError(f"preset {name!r}: conf/{name}.toml must not set 'preset' itself")
    try:
        return validate(data)
    except ConfigError as exc:
        raise ConfigError(f"preset {name!r} (conf/{name}.toml): {exc}") from None


def resolve(run_config: Mapping[str, Any], conf_dir: Path | None = None) -> dict[str, Scalar]:
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
    if (out["strategy"] in ("tsfa", "osfa") and out["p3-solver"] == "closed_form"
            and out["bound-p"] != 1):
        raise ConfigError(
            f"run-config keys 'p3-solver' = 'closed_form' and 'bound-p' = {out['bound-p']!r}: "
            "the closed-form P3 solution needs bound-p = 1; use p3-solver = 'cvxpy' or "
            "'bisection'"
        )
    return out


def split_message_config(values: Mapping[str, Any]) -> tuple[dict[str, Scalar], dict[str, Any]]:
    """Split a train ConfigRecord into the validated run config and per-round extras
    (``server-round``, per-node ratio, bandwidth share, ...)."""
    run = {k: v for k, v in values.items() if k in _SCHEMA}
    extras = {k: v for k, v in values.items() if k not in _SCHEMA}
    missing = sorted(set(_SCHEMA) - set(run))
    if missing:
        raise ConfigError(f"train config from the server lacks run-config keys {missing}")
    return validate(run), extras
