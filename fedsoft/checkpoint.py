"""Server checkpoints: adapter, exact arrays, strategy state and metrics, written durably."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np

from fedsoft.config import RunConfig
from fedsoft.durable import fsync_dir, fsync_file, fsync_tree
from fedsoft.logs import log

__all__ = ["CheckpointError", "RESUME_IGNORED", "check_compatible", "load", "save"]

# keys a resumed run may change (everything else must match the checkpoint's config)
RESUME_IGNORED = frozenset({"num-server-rounds", "run-dir", "resume-from", "checkpoint-every",
                            "round-timeout", "device", "preset"})

_ROUND_DIR = re.compile(r"round-(\d+)")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty one
# what numpy, zipfile, zlib and json raise on a truncated, corrupted or hostile file
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, struct.error,
                OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
                NotImplementedError, RecursionError, MemoryError, OverflowError)


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or does not belong to this run config."""


def save(root: Path | str, server_round: int, arrays: Mapping[str, np.ndarray],
         state: Mapping[str, Any], save_adapter: Callable[[Path], None] | None = None) -> Path:
    """Write ``<root>/round-<t>/`` (``arrays.npz``, ``state.json``, ``adapter/``) durably:
    everything goes to a temporary sibling directory, every file and directory in it is fsynced,
    one rename publishes it and the parent directory is fsynced after the rename."""
    root = Path(root)
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        fsync_dir(root.parent)
    final = root / f"round-{int(server_round):05d}"
    tmp = root / f".round-{int(server_round):05d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        text = json.dumps({"round": int(server_round), **state}, default=_flat_config)
        np.savez(tmp / "arrays.npz", **{k: np.asarray(v) for k, v in arrays.items()})
        fsync_file(tmp / "arrays.npz")
        (tmp / "state.json").write_text(text)
        fsync_file(tmp / "state.json")
        if save_adapter is not None:
            save_adapter(tmp / "adapter")
            if (tmp / "adapter").exists():
                fsync_tree(tmp / "adapter")
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = root / f".round-{int(server_round):05d}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
        fsync_dir(root)
    return final


def _round_dirs(root: Path) -> list[Path]:
    """``round-<t>`` directories under ``root``, newest first."""
    found = []
    for p in root.iterdir():
        m = _ROUND_DIR.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def _is_round_dir(path: Path) -> bool:
    return bool(_ROUND_DIR.fullmatch(path.name)) or (path / "state.json").exists() \
        or (path / "arrays.npz").exists()


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"resume-from={str(path)!r}: {what}")


def _read_state(path: Path) -> tuple[int, dict[str, Any]]:
    file = path / "state.json"
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise _bad(path, f"state.json unreadable ({exc})") from exc
    if not raw.strip():
        raise _bad(path, f"state.json is empty ({len(raw)} bytes): truncated checkpoint")
    try:
        state = json.loads(raw.decode("utf-8"))
    except _READ_ERRORS as exc:
        raise _bad(path, f"state.json is not valid JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise _bad(path, f"state.json holds a JSON {type(state).__name__}, not an object")
    server_round = state.pop("round", None)
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise _bad(path, f"state.json 'round' = {server_round!r}: need an integer >= 0")
    m = _ROUND_DIR.fullmatch(path.name)
    if m and int(m.group(1)) != server_round:
        raise _bad(path, f"state.json says round {server_round}, the directory round "
                         f"{int(m.group(1))}")
    for key, kind in (("config", dict), ("strategy", dict), ("metrics", list)):
        if key not in state:
            raise _bad(path, f"state.json lacks '{key}'")
        if not isinstance(state[key], kind):
            raise _bad(path, f"state.json '{key}' is a {type(state[key]).__name__}, "
                             f"need a {kind.__name__}")
    if not all(isinstance(k, str) for k in state["config"]):
        raise _bad(path, "state.json 'config' has non-string keys")
    bad_rows = [i for i, row in enumerate(state["metrics"]) if not isinstance(row, dict)]
    if bad_rows:
        raise _bad(path, f"state.json 'metrics' rows {bad_rows[:5]} are not objects")
    return server_round, state


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    file = path / "arrays.npz"
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise _bad(path, f"arrays.npz unreadable ({exc})") from exc
    if size == 0:
        raise _bad(path, "arrays.npz is empty (0 bytes): truncated checkpoint")
    try:
        with open(file, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise _bad(path, f"arrays.npz unreadable ({exc})") from exc
    if head not in _ZIP_MAGIC:
        raise _bad(path, f"arrays.npz is not an .npz (zip) archive: starts with {head!r}")
    try:
        with np.load(file, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise TypeError(f"a {type(data).__name__}, not an .npz archive")
            arrays = {k: np.array(data[k]) for k in data.files}  # reads (and CRC-checks) all
    except _READ_ERRORS as exc:
        raise _bad(path, f"arrays.npz is corrupt or truncated ({type(exc).__name__}: {exc})"
                   ) from exc
    if not arrays:
        raise _bad(path, "arrays.npz holds no arrays")
    for k, a in arrays.items():
        if a.dtype.kind != "f":
            raise _bad(path, f"arrays.npz '{k}' has dtype {a.dtype}, need floats")
        if not np.all(np.isfinite(a)):
            raise _bad(path, f"arrays.npz '{k}' has {int(np.sum(~np.isfinite(a)))} non-finite "
                             "values")
    return arrays


def _load_one(path: Path) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
    if not path.is_dir():
        raise _bad(path, "no such checkpoint directory")
    missing = [n for n in ("state.json", "arrays.npz") if not (path / n).is_file()]
    if missing:
        raise _bad(path, f"not a checkpoint directory (lacks {' and '.join(missing)}; needs "
                         "state.json and arrays.npz)")
    server_round, state = _read_state(path)
    arrays = _read_arrays(path)
    return server_round, arrays, state


def load(path: Path | str) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
    """(round, arrays, state) of a checkpoint directory, or of the newest good one under a run's
    ``checkpoints/`` directory.

    Under ``checkpoints/`` the ``round-*`` directories are tried newest first; a corrupt one is
    skipped with a WARNING naming it and what is wrong. An explicit ``round-*`` directory that
    is corrupt raises. Every failure is a :class:`CheckpointError` naming the path and the
    problem. The checkpoint used is logged (INFO)."""
    path = Path(path)
    if not path.exists():
        raise _bad(path, "no such directory")
    if not path.is_dir():
        raise _bad(path, "not a directory (give a round-* checkpoint or a run's checkpoints/)")
    if _is_round_dir(path):
        out = _load_one(path)
        log(INFO, "resume-from: checkpoint %s (round %d)", path, out[0])
        return out
    rounds = _round_dirs(path)
    if not rounds:
        raise _bad(path, "no round-* checkpoint in it")
    skipped = []
    for candidate in rounds:
        try:
            out = _load_one(candidate)
        except CheckpointError as exc:
            log(WARNING, "skipping corrupt checkpoint %s: %s", candidate, exc)
            skipped.append(str(exc))
            continue
        if skipped:
            log(WARNING, "resume-from: using the newest good checkpoint %s (round %d); %d newer "
                "one(s) skipped as corrupt", candidate, out[0], len(skipped))
        else:
            log(INFO, "resume-from: checkpoint %s (round %d)", candidate, out[0])
        return out
    raise _bad(path, f"every round-* checkpoint in it is corrupt: {'; '.join(skipped)}")


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to resume under a config that changes the model, data, strategy or seed."""
    diff = sorted(k for k in set(saved) | set(current)
                  if k not in RESUME_IGNORED and saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:5])
        raise CheckpointError(f"resume-from: the run config differs from the checkpoint's "
                              f"({detail}); only {sorted(RESUME_IGNORED)} may change")


def _flat_config(obj: Any) -> Any:
    """JSON for a :class:`fedsoft.config.RunConfig` in a checkpoint: its flat keys."""
    if isinstance(obj, RunConfig):
        return obj.flat()
    raise TypeError(f"checkpoint state holds a {type(obj).__name__}, which is not JSON")
