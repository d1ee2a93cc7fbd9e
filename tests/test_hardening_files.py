"""Hardening: durable and corruption-tolerant checkpoints and client memory, strict run config."""

import json
import logging
import math
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedsoft import checkpoint, durable
from fedsoft.checkpoint import CheckpointError
from fedsoft.compression.client_state import load_ef, save_ef
from fedsoft.config import DEFAULTS, ConfigError, preset_names, resolve, validate
from fedsoft.sketching import plan as sketch_plan
from fedsoft.sketching.wallclock import compute_speeds
from fedsoft.wireless import plan as tsfa_plan

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"l0.lora_A": rng.standard_normal((4, 6)).astype(np.float32),
            "l0.lora_B": rng.standard_normal((5, 4)).astype(np.float32),
            "head.w": rng.standard_normal((3, 4)).astype(np.float32)}


def _state(**extra) -> dict:
    return {"config": resolve({}).flat(), "strategy": {"rng": [1, 2]}, "metrics": [{"round": 1}],
            **extra}


def _save(root: Path, t: int, seed: int = 0) -> Path:
    return checkpoint.save(root, t, {k: v * t for k, v in _arrays(seed).items()}, _state(),
                           save_adapter=lambda p: (p.mkdir(), (p / "adapter.bin").write_bytes(
                               b"weights")))


def _member_data_offset(path: Path) -> tuple[int, int]:
    """(offset, length) of the first member's bytes inside a stored (uncompressed) zip."""
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
    raw = path.read_bytes()
    h = info.header_offset
    name_len = int.from_bytes(raw[h + 26:h + 28], "little")
    extra_len = int.from_bytes(raw[h + 28:h + 30], "little")
    return h + 30 + name_len + extra_len, info.compress_size


def _flip_data_byte(path: Path) -> None:
    """Flip one byte in the middle of a member's data: the zip structure stays valid, its
    CRC-32 no longer matches."""
    offset, length = _member_data_offset(path)
    raw = bytearray(path.read_bytes())
    raw[offset + length - 2] ^= 0xFF  # inside the array values, past the .npy header
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------ corrupt checkpoints


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _state_edit(fn):
    def edit(ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps(fn(state)))
    return edit


def _nonfinite(ckpt: Path) -> None:
    arrays = _arrays()
    arrays["l0.lora_B"][1, 2] = np.nan
    np.savez(ckpt / "arrays.npz", **arrays)


def _int_arrays(ckpt: Path) -> None:
    np.savez(ckpt / "arrays.npz", **{k: v.astype(np.int64) for k, v in _arrays().items()})


def _pickled(ckpt: Path) -> None:
    np.savez(ckpt / "arrays.npz", x=np.array([object()], dtype=object))


CORRUPTIONS = {  # name: (edit of a saved round dir, what the message must say)
    "truncated arrays.npz": (lambda c: _truncate(c / "arrays.npz"), "arrays.npz"),
    "CRC-corrupted arrays.npz": (lambda c: _flip_data_byte(c / "arrays.npz"), "CRC"),
    "zero-length arrays.npz": (lambda c: _empty(c / "arrays.npz"), "arrays.npz is empty"),
    "zero-length state.json": (lambda c: _empty(c / "state.json"), "state.json is empty"),
    "truncated state.json": (lambda c: _truncate(c / "state.json"), "state.json is not valid"),
    "state.json a list": (lambda c: (c / "state.json").write_text("[1, 2]"), "JSON list"),
    "state.json not utf-8": (lambda c: (c / "state.json").write_bytes(b"\xff\xfe{"),
                             "state.json is not valid"),
    "no config": (_state_edit(lambda s: {k: v for k, v in s.items() if k != "config"}),
                  "lacks 'config'"),
    "config a list": (_state_edit(lambda s: {**s, "config": []}), "'config' is a list"),
    "strategy missing": (_state_edit(lambda s: {k: v for k, v in s.items() if k != "strategy"}),
                         "lacks 'strategy'"),
    "metrics a dict": (_state_edit(lambda s: {**s, "metrics": {}}), "'metrics' is a dict"),
    "metrics rows not objects": (_state_edit(lambda s: {**s, "metrics": [1]}), "rows [0]"),
    "round a string": (_state_edit(lambda s: {**s, "round": "4"}), "'round'"),
    "round a bool": (_state_edit(lambda s: {**s, "round": True}), "'round'"),
    "round missing": (_state_edit(lambda s: {k: v for k, v in s.items() if k != "round"}),
                      "'round'"),
    "round of another dir": (_state_edit(lambda s: {**s, "round": 3}), "directory round 4"),
    "non-finite arrays": (_nonfinite, "non-finite"),
    "integer arrays": (_int_arrays, "need floats"),
    "pickled arrays": (_pickled, "arrays.npz"),
    "no arrays": (lambda c: np.savez(c / "arrays.npz"), "no arrays"),
    "arrays.npz not a zip": (lambda c: (c / "arrays.npz").write_bytes(b"garbage!"),
                             "not an .npz"),
    "arrays.npz removed": (lambda c: (c / "arrays.npz").unlink(), "lacks arrays.npz"),
    "state.json removed": (lambda c: (c / "state.json").unlink(), "lacks state.json"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_round_dir_raises_checkpoint_error_naming_path_and_problem(tmp_path, case):
    edit, what = CORRUPTIONS[case]
    ckpt = _save(tmp_path, 4)
    edit(ckpt)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(ckpt)
    assert str(ckpt) in str(err.value) and what in str(err.value), str(err.value)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_newest_good_with_a_warning(tmp_path, case, caplog):
    edit, what = CORRUPTIONS[case]
    _save(tmp_path, 2)
    good = _save(tmp_path, 3)
    latest = _save(tmp_path, 4)
    edit(latest)
    with caplog.at_level(logging.INFO):
        t, arrays, state = checkpoint.load(tmp_path)
    assert t == 3
    assert all(np.array_equal(arrays[k], v * 3) for k, v in _arrays().items())
    assert state["metrics"] == [{"round": 1}] and "round" not in state
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(latest) in m and what in m for m in warnings), warnings
    assert any(str(good) in m for m in warnings)  # which checkpoint was used instead
    assert checkpoint.load(good)[0] == 3  # the good one is untouched


def test_every_checkpoint_corrupt_raises_listing_them(tmp_path):
    for t in (1, 2):
        _empty(_save(tmp_path, t) / "arrays.npz")
    with pytest.raises(CheckpointError, match="every round-") as err:
        checkpoint.load(tmp_path)
    assert "round-00001" in str(err.value) and "round-00002" in str(err.value)


def test_rounds_are_ordered_by_number_and_stray_entries_ignored(tmp_path):
    _save(tmp_path, 9)
    _save(tmp_path, 100000)  # six digits: later than round-00009 though it sorts first as text
    (tmp_path / ".round-00200.tmp-1").mkdir()  # an interrupted save
    (tmp_path / "round-notes").mkdir()
    (tmp_path / "round-00300").write_text("a file, not a checkpoint")
    assert checkpoint.load(tmp_path)[0] == 100000


def test_missing_paths_and_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        checkpoint.load(tmp_path / "f")
    (tmp_path / "round-00007").mkdir()
    with pytest.raises(CheckpointError, match="lacks state.json and arrays.npz"):
        checkpoint.load(tmp_path / "round-00007")
    assert issubclass(CheckpointError, ValueError)


def test_good_checkpoint_round_trip_is_a_tuple(tmp_path):
    _save(tmp_path, 5)
    out = checkpoint.load(tmp_path)
    assert isinstance(out, tuple) and out[0] == 5 and out[2]["config"] == resolve({})


# ------------------------------------------------------------------ fsync


class FsyncLog:
    """Records os.fsync and os.replace calls as (event, inode, is_dir) in order."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, int, bool]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            st = os.fstat(fd)
            self.events.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode)))
            return real_fsync(fd)

        def replace(src, dst, *a, **kw):
            self.events.append(("replace", os.stat(src).st_ino, os.path.isdir(src)))
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, event: str, inode: int, last: bool = False) -> int:
        hits = [i for i, (e, ino, _) in enumerate(self.events) if e == event and ino == inode]
        assert hits, f"no {event} of inode {inode}: {self.events}"
        return hits[-1] if last else hits[0]


def test_checkpoint_save_fsyncs_files_and_dirs_around_the_rename(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    root.mkdir()
    fs = FsyncLog(monkeypatch)
    final = _save(root, 4)
    publish = fs.index("replace", final.stat().st_ino)  # the rename of the tmp dir
    for f in ("arrays.npz", "state.json", "adapter/adapter.bin"):
        assert fs.index("fsync", (final / f).stat().st_ino) < publish, f
    for d in (final, final / "adapter"):
        assert fs.index("fsync", d.stat().st_ino) < publish, d
    assert fs.index("fsync", root.stat().st_ino, last=True) > publish  # parent after rename
    # replacing an existing round: still fsynced, and the parent after the rename
    fs.events.clear()
    final = _save(root, 4, seed=1)
    publish = fs.index("replace", final.stat().st_ino)
    assert fs.index("fsync", (final / "arrays.npz").stat().st_ino) < publish
    assert fs.index("fsync", root.stat().st_ino, last=True) > publish
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_save_ef_fsyncs_file_before_and_dir_after_the_rename(tmp_path, monkeypatch):
    fs = FsyncLog(monkeypatch)
    final = save_ef(tmp_path, 1, 3, {"x": np.ones(3, np.float32)})
    publish = fs.index("replace", final.stat().st_ino)
    assert fs.index("fsync", final.stat().st_ino) < publish
    assert fs.index("fsync", tmp_path.stat().st_ino, last=True) > publish
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_durable_helpers(tmp_path, monkeypatch):
    fs = FsyncLog(monkeypatch)
    target = tmp_path / "config.json"
    durable.atomic_write_text(target, "one")
    durable.atomic_write_text(target, "two ü")
    assert target.read_text(encoding="utf-8") == "two ü"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left
    publish = fs.index("replace", target.stat().st_ino)
    assert fs.index("fsync", target.stat().st_ino) < publish
    assert fs.index("fsync", tmp_path.stat().st_ino, last=True) > publish

    log = tmp_path / "metrics.jsonl"
    fs.events.clear()
    durable.append_line(log, '{"round": 1}')
    durable.append_line(log, '{"round": 2}')
    assert log.read_text() == '{"round": 1}\n{"round": 2}\n'
    assert sum(1 for e, ino, _ in fs.events if e == "fsync" and ino == log.stat().st_ino) == 2
    assert any(e == "fsync" and is_dir for e, _, is_dir in fs.events)  # the new file's entry
    with log.open("ab") as fh:
        fh.write(b'{"round": 3, "trunc')  # a crash in the middle of an append
    durable.append_line(log, '{"round": 4}')
    assert log.read_text().splitlines()[-2:] == ['{"round": 3, "trunc', '{"round": 4}']
    with pytest.raises(ValueError, match="newline"):
        durable.append_line(log, "a\nb")


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    durable.atomic_write_text(target, "old")

    def boom(fd):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        durable.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# ------------------------------------------------------------------ corrupt client memory


def _mem_garbage(p: Path) -> None:
    p.write_bytes(b"garbage")


def _mem_nan(p: Path) -> None:
    np.savez(p, x=np.array([1.0, np.inf], np.float32), __round__=np.array(5))


def _mem_int(p: Path) -> None:
    np.savez(p, x=np.array([1, 2]), __round__=np.array(5))


def _mem_no_round(p: Path) -> None:
    np.savez(p, x=np.ones(2, np.float32))


def _mem_wrong_round(p: Path) -> None:
    np.savez(p, x=np.ones(2, np.float32), __round__=np.array(4))


MEMORY_CORRUPTIONS = {
    "truncated": (_truncate, "corrupt or truncated"),
    "zero-length": (_empty, "empty file"),
    "CRC": (_flip_data_byte, "CRC"),
    "garbage": (_mem_garbage, "not an .npz"),
    "non-finite": (_mem_nan, "non-finite"),
    "integer": (_mem_int, "need floats"),
    "no round": (_mem_no_round, "__round__"),
    "wrong round": (_mem_wrong_round, "__round__ = 4"),
}


@pytest.mark.parametrize("case", sorted(MEMORY_CORRUPTIONS))
def test_corrupt_client_memory_is_reset_moved_aside_and_the_run_continues(tmp_path, case,
                                                                          caplog):
    edit, what = MEMORY_CORRUPTIONS[case]
    mem = {"x": np.arange(2, dtype=np.float32)}
    save_ef(tmp_path, 0, 4, mem, keep_every=4)  # an older good memory (kept: checkpoint round)
    latest = save_ef(tmp_path, 0, 5, {"x": mem["x"] + 5}, keep_every=4)
    edit(latest)
    with caplog.at_level(logging.WARNING):
        assert load_ef(tmp_path, 0, server_round=6) == (None, None)  # reset, not round 4's
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(latest) in warnings[0] and what in warnings[0], warnings
    assert "reset" in warnings[0]
    assert not latest.exists() and latest.with_name(latest.name + ".corrupt").is_file()
    caplog.clear()
    assert load_ef(tmp_path, 0, server_round=6) == (None, None)  # not retried, no new warning
    assert not caplog.records
    save_ef(tmp_path, 0, 6, {"x": mem["x"] + 6}, keep_every=4)  # the round with a reset memory
    got, t = load_ef(tmp_path, 0, server_round=7)
    assert t == 6 and np.array_equal(got["x"], mem["x"] + 6)
    got, t = load_ef(tmp_path, 0, server_round=5)  # a resume from the round-4 checkpoint
    assert t == 4 and np.array_equal(got["x"], mem["x"])


def test_client_memory_of_another_partition_is_not_touched(tmp_path):
    save_ef(tmp_path, 1, 2, {"x": np.ones(2, np.float32)})
    _empty(save_ef(tmp_path, 10, 2, {"x": np.ones(2, np.float32)}))
    assert load_ef(tmp_path, 10, 3) == (None, None)
    assert load_ef(tmp_path, 1, 3)[1] == 2
    assert load_ef(tmp_path / "missing", 1, 3) == (None, None)


# ------------------------------------------------------------------ run config


FLOAT_KEYS = sorted(k for k, v in DEFAULTS.items() if isinstance(v, float))


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_key_rejects_non_finite_values(key, value):
    with pytest.raises(ConfigError) as err:
        validate({key: value})
    assert f"'{key}'" in str(err.value) and "finite" in str(err.value)


@pytest.mark.parametrize("override", [{"lr": math.inf}, {"lr": math.nan},
                                      {"noise-psd-dbm-hz": math.nan},
                                      {"latency-budget": math.inf}])
def test_non_finite_values_stop_resolve_naming_the_key(override):
    (key, value), = override.items()
    with pytest.raises(ConfigError) as err:
        resolve({**DEFAULTS, **override})
    assert f"'{key}'" in str(err.value) and repr(value) in str(err.value)


def test_min_replies_must_not_exceed_the_clients_that_can_reply():
    with pytest.raises(ConfigError) as err:
        resolve({"min-replies": 3, "clients-per-round": 2})
    msg = str(err.value)
    assert "'min-replies' = 3" in msg and "'clients-per-round' = 2" in msg
    assert resolve({"min-replies": 2, "clients-per-round": 2})["min-replies"] == 2
    # sketch samples every client independently: the bound is the nodes waited for
    with pytest.raises(ConfigError) as err:
        resolve({"strategy": "sketch", "min-replies": 3, "min-available-nodes": 2})
    msg = str(err.value)
    assert "'min-replies' = 3" in msg and "'min-available-nodes' = 2" in msg
    cfg = resolve({"strategy": "sketch", "min-replies": 3, "min-available-nodes": 3,
                   "clients-per-round": 2})
    assert cfg["min-replies"] == 3


def test_closed_form_solver_needs_p1_for_tsfa_only():
    with pytest.raises(ConfigError) as err:
        resolve({"strategy": "tsfa", "p3-solver": "closed_form", "bound-p": 2})
    assert "'p3-solver'" in str(err.value) and "'bound-p' = 2" in str(err.value)
    assert resolve({"p3-solver": "closed_form", "bound-p": 2})["bound-p"] == 2  # fedavg: unused


@pytest.mark.parametrize("override, key", [({"tsfa-ranks": "4,8,4"}, "tsfa-ranks"),
                                           ({"bound-rank-ideal": 0.5}, "bound-rank-ideal")])
def test_values_the_tsfa_set_up_would_refuse_are_caught_by_the_schema(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        resolve({"strategy": "tsfa", **override})


BAD_PRESETS = ["../conf/ci", "/etc/passwd", "ci.toml", "..", ".", " ", "\t", "ci/", "./ci",
               "conf/ci", "-ci", "ci\x00", "CI", "c*", "~/ci", "ci " + "x" * 300]


@pytest.mark.parametrize("name", BAD_PRESETS)
def test_preset_accepts_only_names_from_conf(name):
    with pytest.raises(ConfigError) as err:
        resolve({"preset": name}, CONF)
    msg = str(err.value)
    assert "'preset'" in msg and str(preset_names(CONF)) in msg
    assert str(ROOT) not in msg and str(CONF) not in msg and "/etc/passwd.toml" not in msg


def test_preset_error_does_not_reveal_whether_a_file_exists(tmp_path):
    (tmp_path / "evil.toml").write_text('lr = 0.5\n')
    rel_exists = os.path.relpath(tmp_path / "evil", CONF)
    rel_missing = os.path.relpath(tmp_path / "missing", CONF)
    msgs = []
    for name in (rel_exists, rel_missing):
        with pytest.raises(ConfigError) as err:
            resolve({"preset": name}, CONF)
        msgs.append(str(err.value).replace(repr(name), "NAME"))
    assert msgs[0] == msgs[1]
    assert str(tmp_path) not in msgs[0]


def test_known_presets_still_load_and_broken_preset_files_name_no_path(tmp_path):
    assert set(preset_names(CONF)) == {p.stem for p in CONF.glob("*.toml")}
    for name in preset_names(CONF):
        assert resolve({"preset": name}, CONF)["preset"] == name
    (tmp_path / "broken.toml").write_text("lr = [")
    (tmp_path / "bad-value.toml").write_text("lr = -1.0\n")
    (tmp_path / "loop.toml").write_text('preset = "loop"\n')
    for name, what in (("broken", "unreadable"), ("bad-value", "'lr' = -1.0"),
                       ("loop", "must not set 'preset'")):
        with pytest.raises(ConfigError) as err:
            resolve({"preset": name}, tmp_path)
        assert what in str(err.value) and str(tmp_path) not in str(err.value)


# ------------------------------------------------------------------ errors after the schema


def test_an_infeasible_latency_budget_names_the_run_config_key():
    cfg = resolve({"strategy": "tsfa", "latency-budget": 1e-9})  # passes the schema
    with pytest.raises(ConfigError) as err:
        tsfa_plan.plan(cfg, num_clients=4, d_plus_k_total=64)
    msg = str(err.value)
    assert "'latency-budget' = 1e-09" in msg and "infeasible" in msg
    assert isinstance(err.value.__cause__, ValueError)  # the library's own error, chained


def test_a_dead_channel_names_the_channel_keys():
    cfg = resolve({"strategy": "tsfa", "path-loss-exponent": 1000.0})  # gains underflow to 0
    with pytest.raises(ConfigError, match="'path-loss-exponent' = 1000.0"):
        tsfa_plan.plan(cfg, num_clients=4, d_plus_k_total=64)
    cfg = resolve({"strategy": "tsfa", "noise-psd-dbm-hz": 1e5})  # noise power overflows
    with pytest.raises(ConfigError, match="'noise-psd-dbm-hz' = 100000.0"):
        tsfa_plan.plan(cfg, num_clients=4, d_plus_k_total=64)


def _library_error(fn, *args, **kwargs) -> Exception:
    try:
        fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        return exc
    raise AssertionError("no error")


@pytest.mark.parametrize("make, key", [
    (lambda: _library_error(__import__("fedsoft.wireless.controller", fromlist=["x"]).VirtualQueue,
                            math.inf), "latency-budget"),
    (lambda: ValueError("V must be >= 0, got -1"), "lyapunov-v"),
    (lambda: ValueError("rho_min must lie in [0, 1), got 2"), "sparsity-min"),
    (lambda: ValueError("need rho_min < rho_max, got rho_max=0.1"), "sparsity-max"),
    (lambda: ValueError("solver='closed_form' needs bound.p == 1, got p=2"), "bound-p"),
    (lambda: ValueError("ranks must be distinct, got [4, 4]"), "tsfa-ranks"),
    (lambda: _library_error(compute_speeds, 4, -1.0, 0.5, 0), "compute-s-per-step"),
])
def test_internal_names_map_to_run_config_keys(make, key):
    exc = make()
    cfg = resolve({"strategy": "tsfa"})
    err = tsfa_plan.as_config_error(exc, cfg)
    assert isinstance(err, ConfigError) and f"'{key}' = {cfg[key]!r}" in str(err)
    assert str(exc) in str(err)  # the library's message is kept


def test_errors_without_a_run_config_name_are_not_misattributed():
    cfg = resolve({})
    assert tsfa_plan.as_config_error(ValueError("data shares must be 4 finite values"),
                                     cfg) is None
    assert tsfa_plan.as_config_error(ValueError("the mode of the run is odd"), cfg) is None
    named = tsfa_plan.as_config_error(ValueError("sampling-q = 2: must be in (0, 1]"), cfg)
    assert str(named) == "sampling-q = 2: must be in (0, 1]"


def test_sketch_set_up_errors_name_the_key():
    cfg = {**resolve({"strategy": "sketch"}), "compute-s-per-step": -1.0}  # past the schema
    with pytest.raises(ConfigError, match="'compute-s-per-step' = -1.0"):
        sketch_plan.system_model(cfg, 4, 8, 64, 12)


# ---------------------------------------------------------------- run log: nothing is lost
def test_runlog_writes_nothing_before_open_and_keeps_what_it_replaces(tmp_path):
    from fedsoft.runlog import RunLog, read_metrics

    run_dir = tmp_path / "run"
    first = RunLog(run_dir, {"lr": 0.1})
    assert not run_dir.exists()  # constructing (e.g. a refused resume) writes nothing
    first.open()
    first.append({"round": 0, "accuracy": 0.1})
    first.append({"round": 1, "accuracy": 0.2})
    before = (run_dir / "metrics.jsonl").read_bytes()
    # a later run in the same directory, refused before open(): everything stays as it was
    RunLog(run_dir, {"lr": 0.5})
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert json.loads((run_dir / "config.json").read_text()) == {"lr": 0.1}
    # a resume from round 0's checkpoint keeps the longer old file beside the new one
    resumed = RunLog(run_dir, {"lr": 0.1})
    resumed.open(read_metrics(run_dir / "metrics.jsonl")[:1])
    assert [r["round"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0]
    (backup,) = run_dir.glob("metrics.jsonl.*.bak")
    assert backup.read_bytes() == before
    assert not list(run_dir.glob("config.json.*.bak"))  # same config: not rewritten


def test_runlog_append_fsyncs_each_row(tmp_path, monkeypatch):
    from fedsoft.runlog import RunLog

    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    log = RunLog(tmp_path / "r", {})
    log.open()
    n = len(calls)
    log.append({"round": 0})
    assert len(calls) > n
    with pytest.raises(RuntimeError, match="before open"):
        RunLog(tmp_path / "other", {}).append({"round": 0})


def test_a_real_error_memory_with_its_signature_round_trips(tmp_path):
    """What clients actually save: ErrorFeedback.to_arrays(), uint8 signature included."""
    import torch

    from fedsoft.compression.error_feedback import ErrorFeedback

    ef = ErrorFeedback(signature="minilm|r=8|soft|update")
    from fedsoft.compression.sparsifiers.base import SparseRows

    ef.step("l0", torch.ones(2, 6),
            lambda u: SparseRows(u * 0, torch.zeros_like(u, dtype=torch.bool)))
    save_ef(tmp_path, 1, 2, ef.to_arrays(), keep_every=2)
    memory, t = load_ef(tmp_path, 1, 3)
    assert t == 2 and not list(tmp_path.glob("*.corrupt"))
    back = ErrorFeedback.from_arrays(memory, "minilm|r=8|soft|update")
    assert back.reset_reason is None and torch.equal(back.memory["l0"], ef.memory["l0"])
