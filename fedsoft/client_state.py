"""A client's error-feedback memory on disk, so a restarted SuperNode or a resumed run continues."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["load_ef", "save_ef", "simulated_failure"]

_ROUND_KEY = "__round__"


def _path(state_dir: Path, partition_id: int, server_round: int) -> Path:
    return state_dir / f"ef-partition{int(partition_id)}-round{int(server_round)}.npz"


def save_ef(state_dir: Path | str, partition_id: int, server_round: int,
            arrays: Mapping[str, np.ndarray], keep_every: int = 0) -> Path:
    """Write the memory after ``server_round`` (write + rename). Older files are removed except
    the latest multiple of ``keep_every`` (the round of the server's last checkpoint)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    final = _path(state_dir, partition_id, server_round)
    tmp = final.with_suffix(f".tmp-{os.getpid()}.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()},
             **{_ROUND_KEY: np.array(server_round)})
    os.replace(tmp, final)
    files = {}
    for old in state_dir.glob(f"ef-partition{int(partition_id)}-round*.npz"):
        try:
            files[int(old.stem.rsplit("round", 1)[1])] = old
        except ValueError:
            continue
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


def load_ef(state_dir: Path | str, partition_id: int,
            server_round: int) -> tuple[dict[str, np.ndarray] | None, int | None]:
    """(memory, round) of the latest file saved before ``server_round``, or (None, None).

    Files from ``server_round`` on (a run that went further before it was resumed from an
    earlier checkpoint) are ignored; unreadable files count as absent."""
    state_dir = Path(state_dir)
    rounds = []
    for path in state_dir.glob(f"ef-partition{int(partition_id)}-round*.npz"):
        try:
            t = int(path.stem.rsplit("round", 1)[1])
        except ValueError:
            continue
        if t < server_round:
            rounds.append(t)
    for t in sorted(rounds, reverse=True):
        try:
            with np.load(_path(state_dir, partition_id, t), allow_pickle=False) as data:
                if int(data[_ROUND_KEY]) == t:
                    return {k: data[k] for k in data.files if k != _ROUND_KEY}, t
        except (OSError, ValueError, KeyError):
            continue
    return None, None


def simulated_failure(seed: int, server_round: int, partition_id: int, fraction: float) -> bool:
    """Whether this client fails this round under ``fail-fraction`` (seeded, for tests)."""
    if fraction <= 0:
        return False
    rng = np.random.default_rng(np.random.SeedSequence(
        int(seed), spawn_key=(977, int(server_round), int(partition_id))))
    return bool(rng.random() < fraction)
