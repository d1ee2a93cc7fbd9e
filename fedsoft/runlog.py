"""Run directory: resolved config.json, per-round metrics.jsonl (fsynced) and progress lines."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsoft.durable import append_line, atomic_write_bytes, atomic_write_text


def default_run_dir(strategy: str, root: Path | str = "runs") -> Path:
    """``runs/<time>-<strategy>`` (contract default)."""
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{strategy}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


class RunLog:
    """A run directory's ``config.json`` and ``metrics.jsonl``, written so that nothing is lost.

    Constructing it writes nothing: :meth:`open` does, once the run's config is validated and
    a resume is known to be compatible, so a refused run leaves the directory as it was. Rows
    are appended and fsynced one by one; files a fresh run or a resume would replace are kept
    beside it as ``<name>.<time>.bak`` when their content differs."""

    def __init__(self, run_dir: Path | str, config: Mapping[str, Any]) -> None:
        self.dir = Path(run_dir).resolve()
        self.metrics_path = self.dir / "metrics.jsonl"
        self.config = dict(config)
        self.t0 = time.time()
        self.rows: list[dict[str, Any]] = []
        self.opened = False

    def open(self, rows: list[Mapping[str, Any]] | None = None) -> None:
        """Create the directory, write ``config.json`` and start ``metrics.jsonl`` with
        ``rows`` (a resume's rows from its checkpoint; wall_s continues from the last)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows = [dict(r) for r in rows or []]
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        self._replace(self.metrics_path, text)
        self.write_config(self.config)
        if self.rows:
            self.t0 = time.time() - float(self.rows[-1].get("wall_s", 0.0) or 0.0)
        self.opened = True

    def write_config(self, config: Mapping[str, Any]) -> None:
        """(Re)write ``config.json`` atomically (e.g. after the offline stage set the rank)."""
        self.config = dict(config)
        self._replace(self.dir / "config.json",
                      json.dumps(_jsonable(self.config), indent=2, sort_keys=True))

    def write_json(self, name: str, value: Any) -> Path:
        """An extra JSON file of the run (offline table, sampling plan), written atomically."""
        path = self.dir / name
        self._replace(path, json.dumps(_jsonable(value), indent=2))
        return path

    def _replace(self, path: Path, text: str) -> None:
        if path.is_file() and path.stat().st_size:
            old = path.read_bytes()
            if old == text.encode():
                return
            backup = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
            n = 1
            while backup.exists():
                backup = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}-{n}.bak")
                n += 1
            atomic_write_bytes(backup, old)
        atomic_write_text(path, text)

    def restore(self, rows: list[Mapping[str, Any]]) -> None:
        """Start from the rows of a checkpoint (resume): :meth:`open` with them."""
        self.open(rows)

    def append(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Add ``wall_s``, append the row to metrics.jsonl and fsync it; returns what was
        written."""
        if not self.opened:
            raise RuntimeError(f"RunLog({self.dir}): append before open")
        out = _jsonable({**row, "wall_s": round(time.time() - self.t0, 3)})
        append_line(self.metrics_path, json.dumps(out))
        self.rows.append(out)
        return out


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def progress_line(row: Mapping[str, Any], num_rounds: int) -> str:
    """One human-readable line per round."""
    acc, loss = row.get("accuracy"), row.get("loss")
    parts = [f"[fedsoft] round {row['round']}/{num_rounds}"]
    if acc is not None:
        parts.append(f"acc={acc:.4f}")
    if loss is not None:
        parts.append(f"loss={loss:.4f}")
    parts.append(f"clients={row.get('num_clients', 0)}")
    parts.append(f"uplink={row.get('uplink_bytes', 0) / 1e6:.3f} MB")
    parts.append(f"t={row.get('wall_s', 0):.1f}s")
    return " ".join(parts)
