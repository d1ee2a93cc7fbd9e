"""Run config: pyproject table == schema defaults, presets valid, clear errors."""

import tomllib
from pathlib import Path

import pytest

from fedsoft.config import DEFAULTS, ConfigError, resolve, validate
from strategies.messages import (
    PLAN_KEYS,
    MessageError,
    RoundPlan,
    TrainInstruction,
    train_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_match_schema():
    with (ROOT / "pyproject.toml").open("rb") as fh:
        table = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert table == DEFAULTS


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf").glob("*.toml")))
def test_every_preset_resolves(preset):
    cfg = resolve({**DEFAULTS, "preset": preset}, ROOT / "conf")
    assert cfg["preset"] == preset


def test_override_beats_preset_and_preset_beats_default():
    cfg = resolve({**DEFAULTS, "preset": "ci", "lr": 0.5}, ROOT / "conf")
    with (ROOT / "conf" / "ci.toml").open("rb") as fh:
        ci = tomllib.load(fh)
    assert cfg["lr"] == 0.5
    assert cfg["num-server-rounds"] == ci["num-server-rounds"]
    assert cfg["model"] == DEFAULTS["model"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("lora-rank", 0), ("sparsity", 1.0), ("lr", -1.0), ("partitioner", "zipf"),
     ("clients-per-round", 0), ("strategy", "magic"), ("lora-layers", "a,b"), ("seed", "x"),
     ("tsfa-deadline", "always"), ("tsfa-deadline-factor", 0.0),
     ("tsfa-deadline-factor", 5000.0)],
)
def test_bad_values_name_key_and_value(key, value):
    with pytest.raises(ConfigError) as err:
        validate({key: value})
    assert key in str(err.value) and str(value) in str(err.value)


def test_unknown_key_and_unknown_preset():
    with pytest.raises(ConfigError, match="unknown run-config key"):
        validate({"learning-rate": 0.1})
    with pytest.raises(ConfigError, match="preset") as err:
        resolve({"preset": "nope"}, ROOT / "conf")
    assert "'ci'" in str(err.value) and str(ROOT) not in str(err.value)  # names, no paths


def test_message_config_round_trip():
    base = resolve({})
    cfg = base.with_values({"lora-rank": 4, "run-dir": "/tmp/x"})
    record = train_config(cfg, base)
    assert {k for k in record if k != "config-digest"} == {"lora-rank", "run-dir"}  # changes only
    record.update(RoundPlan(server_round=3, client_key=1).to_values())
    got = TrainInstruction.from_record(record)
    assert got.config(base) == cfg and got.plan == RoundPlan(3, 1)
    assert train_config(base, base).keys() == {"config-digest"}
    with pytest.raises(MessageError, match="lacks"):
        TrainInstruction.from_record({"lr": 0.1})
    with pytest.raises(MessageError, match="differs from the server"):  # another conf/ on a node
        got.config(base.with_values({"lr": 0.5}))
    with pytest.raises(MessageError, match="sparsity-ratio"):
        TrainInstruction.from_record({**record, "sparsity-ratio": 1.5})
    with pytest.raises(MessageError, match="unknown run-config key"):
        TrainInstruction.from_record({**record, "no-such-key": 1})


@pytest.mark.parametrize("strategy", ["tsfa", "osfa"])
def test_tsfa_with_the_default_sparsifier_runs_soft(strategy):
    cfg = resolve({"strategy": strategy})
    assert cfg["sparsifier"] == "soft"
    assert resolve({"strategy": strategy, "sparsifier": "flasc"})["sparsifier"] == "flasc"
    assert resolve({})["sparsifier"] == "dense"


def test_per_node_message_keys_do_not_shadow_run_config_keys():
    per_node = ["server-round", "sparsity-ratio", "bandwidth-share", "channel-gain", "sketch-size",
                "client-key", "downlink-base"]
    assert PLAN_KEYS == set(per_node) and not PLAN_KEYS & set(DEFAULTS)
    record = {**train_config(resolve({})), **dict.fromkeys(per_node, 1), "sparsity-ratio": 0.5,
              "server-round": 2}  # downlink-base must be an earlier round
    got = TrainInstruction.from_record(record)
    assert got.config(resolve({})) == validate(DEFAULTS)


def test_every_key_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    missing = [k for k in DEFAULTS if f"`{k}`" not in doc]
    assert not missing, f"keys missing from docs/CONFIG.md: {missing}"
