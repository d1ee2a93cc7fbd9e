"""Server checkpoints: adapter, exact arrays, strategy state and metrics, written atomically."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CheckpointError", "RESUME_IGNORED", "check_compatible", "load", "save"]

# keys a resumed run may change (everything else must match the checkpoint's config)
RESUME_IGNORED = frozenset({"num-server-rounds", "run-dir", "resume-from", "checkpoint-every",
                            "round-timeout", "device", "preset"})


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or does not belong to this run config."""


def save(root: Path | str, server_round: int, arrays: Mapping[str, np.ndarray],
         state: Mapping[str, Any], save_adapter: Callable[[Path], None] | None = None) -> Path:
    """Write ``<root>/round-<t>/`` (``arrays.npz``, ``state.json``, ``adapter/``) atomically:
    everything goes to a temporary sibling directory first, then one rename publishes it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{int(server_round):05d}"
    tmp = root / f".round-{int(server_round):05d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    np.savez(tmp / "arrays.npz", **{k: np.asarray(v) for k, v in arrays.items()})
    (tmp / "state.json").write_text(json.dumps({"round": int(server_round), **state}))
    if save_adapter is not None:
        save_adapter(tmp / "adapter")
    if final.exists():
        old = root / f".round-{int(server_round):05d}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def load(path: Path | str) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
    """(round, arrays, state) from a checkpoint directory, or the latest one under a run's
    ``checkpoints/`` directory; :class:`CheckpointError` names what is wrong."""
    path = Path(path)
    if path.is_dir() and not (path / "state.json").exists():
        rounds = sorted(p for p in path.glob("round-*") if (p / "state.json").exists())
        if not rounds:
            raise CheckpointError(f"resume-from={str(path)!r}: no round-* checkpoint in it")
        path = rounds[-1]
    if not (path / "state.json").is_file() or not (path / "arrays.npz").is_file():
        raise CheckpointError(f"resume-from={str(path)!r}: not a checkpoint directory "
                              "(needs state.json and arrays.npz)")
    try:
        state = json.loads((path / "state.json").read_text())
        with np.load(path / "arrays.npz", allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        server_round = int(state.pop("round"))
    except (ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"resume-from={str(path)!r}: unreadable checkpoint ({exc})") from exc
    return server_round, arrays, state


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to resume under a config that changes the model, data, strategy or seed."""
    diff = sorted(k for k in set(saved) | set(current)
                  if k not in RESUME_IGNORED and saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:5])
        raise CheckpointError(f"resume-from: the run config differs from the checkpoint's "
                              f"({detail}); only {sorted(RESUME_IGNORED)} may change")
