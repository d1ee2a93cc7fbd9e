"""A client's error-feedback memory on disk, so a restarted SuperNode or a resumed run continues."""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path

import numpy as np

from fedsoft.compression.error_feedback import SIGNATURE_KEY
from fedsoft.durable import fsync_dir, fsync_file
from fedsoft.logs import log

__all__ = ["load_ef", "save_ef", "simulated_failure"]

_ROUND_KEY = "__round__"
CORRUPT_SUFFIX = ".corrupt"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty one
# what numpy, zipfile and zlib raise on a truncated, corrupted or hostile .npz
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, struct.error,
                OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
                NotImplementedError, RecursionError, MemoryError, OverflowError)


class _CorruptMemory(ValueError):
    """An error-memory file that cannot be used (the message says why)."""


def _path(state_dir: Path, partition_id: int, server_round: int) -> Path:
    return state_dir / f"ef-partition{int(partition_id)}-round{int(server_round)}.npz"


def _rounds(state_dir: Path, partition_id: int, suffix: str = ".npz") -> dict[int, Path]:
    """round -> file of this partition's memories (``suffix`` ``.npz.corrupt``: set aside)."""
    files = {}
    for path in state_dir.glob(f"ef-partition{int(partition_id)}-round*{suffix}"):
        try:
            files[int(path.name[: -len(suffix)].rsplit("round", 1)[1])] = path
        except ValueError:  # a temporary file
            continue
    return files


def save_ef(state_dir: Path | str, partition_id: int, server_round: int,
            arrays: Mapping[str, np.ndarray], keep_every: int = 0) -> Path:
    """Write the memory after ``server_round`` (write, fsync, rename, fsync of the directory).
    Older files are removed except the latest multiple of ``keep_every`` (the round of the
    server's last checkpoint)."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        state_dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(state_dir.parent)
    final = _path(state_dir, partition_id, server_round)
    tmp = final.with_suffix(f".tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()},
                 **{_ROUND_KEY: np.array(server_round)})
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(state_dir)
    files = _rounds(state_dir, partition_id)
    keep = {server_round}
    if keep_every > 0:  # the memory a resume from the last checkpoint round would need
        last_ckpt = server_round - server_round % keep_every
        older = [t for t in files if t <= last_ckpt]
        if older:
            keep.add(max(older))
    for t, old in files.items():
        if t not in keep:
            old.unlink(missing_ok=True)
    return final


def _read(path: Path, server_round: int) -> dict[str, np.ndarray]:
    """The memory in ``path`` saved after ``server_round``; :class:`_CorruptMemory` says why not."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise _CorruptMemory("empty file (0 bytes)")
    if head not in _ZIP_MAGIC:
        raise _CorruptMemory(f"not an .npz (zip) archive: starts with {head!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise _CorruptMemory(f"a {type(data).__name__}, not an .npz archive")
            arrays = {k: np.array(data[k]) for k in data.files}  # reads (and CRC-checks) all
    except _CorruptMemory:
        raise
    except _READ_ERRORS as exc:
        raise _CorruptMemory(f"corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    saved = arrays.pop(_ROUND_KEY, None)
    if saved is None or saved.shape != () or saved.dtype.kind not in "iu":
        raise _CorruptMemory(f"no valid {_ROUND_KEY} entry")
    if int(saved) != server_round:
        raise _CorruptMemory(f"{_ROUND_KEY} = {int(saved)} but the name says round {server_round}")
    signature = arrays.get(SIGNATURE_KEY)
    if signature is not None and (signature.dtype != np.uint8 or signature.ndim != 1):
        raise _CorruptMemory(f"'{SIGNATURE_KEY}' has dtype {signature.dtype} and ndim "
                             f"{signature.ndim}, need 1-D uint8")
    for k, a in arrays.items():
        if k == SIGNATURE_KEY:
            continue
        if a.dtype.kind != "f":
            raise _CorruptMemory(f"'{k}' has dtype {a.dtype}, need floats")
        if not np.all(np.isfinite(a)):
            raise _CorruptMemory(f"'{k}' has {int(np.sum(~np.isfinite(a)))} non-finite values")
    return arrays


def load_ef(state_dir: Path | str, partition_id: int,
            server_round: int) -> tuple[dict[str, np.ndarray] | None, int | None]:
    """(memory, round) of the latest file saved before ``server_round``, or (None, None).

    Files from ``server_round`` on (a run that went further before it was resumed from an
    earlier checkpoint) are ignored. A corrupt latest file resets the memory: (None, None), a
    WARNING naming the file and the cause, and the file is renamed to ``<name>.corrupt`` so it
    is not tried again. An older file is not used instead, now or later (the set-aside file
    still counts as the latest until a newer memory is saved): its memory is stale."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return None, None
    rounds = [t for t in _rounds(state_dir, partition_id) if t < server_round]
    aside = [t for t in _rounds(state_dir, partition_id, ".npz" + CORRUPT_SUFFIX)
             if t < server_round]
    if not rounds or (aside and max(aside) >= max(rounds)):
        return None, None
    t = max(rounds)
    path = _path(state_dir, partition_id, t)
    try:
        return _read(path, t), t
    except FileNotFoundError:  # removed meanwhile (another process of this partition)
        return None, None
    except (_CorruptMemory, OSError) as exc:
        aside = path.with_name(path.name + CORRUPT_SUFFIX)
        try:
            os.replace(path, aside)
            fsync_dir(state_dir)
            where = f"moved aside to {aside.name}"
        except OSError as move_exc:
            where = f"could not be moved aside ({move_exc})"
        log(WARNING, "client error memory %s is unusable (%s): reset to zero for partition %d "
            "in round %d; the file %s", path, exc, int(partition_id), int(server_round), where)
        return None, None


def simulated_failure(seed: int, server_round: int, partition_id: int, fraction: float) -> bool:
    """Whether this client fails this round under ``fail-fraction`` (seeded, for tests)."""
    if fraction <= 0:
        return False
    rng = np.random.default_rng(np.random.SeedSequence(
        int(seed), spawn_key=(977, int(server_round), int(partition_id))))
    return bool(rng.random() < fraction)
