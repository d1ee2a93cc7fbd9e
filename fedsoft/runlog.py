"""Run directory: resolved config.json, per-round metrics.jsonl and progress lines."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
    """Writes ``config.json`` once and appends one JSON object per round to ``metrics.jsonl``."""

    def __init__(self, run_dir: Path | str, config: Mapping[str, Any]) -> None:
        self.dir = Path(run_dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.metrics_path.write_text("")
        (self.dir / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
        self.t0 = time.time()
        self.rows: list[dict[str, Any]] = []

    def restore(self, rows: list[Mapping[str, Any]]) -> None:
        """Start from the rows of a checkpoint (resume): rewrite metrics.jsonl, keep wall_s."""
        self.rows = [dict(r) for r in rows]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        if self.rows:
            self.t0 = time.time() - float(self.rows[-1].get("wall_s", 0.0))

    def append(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Add ``wall_s`` and write the row; returns what was written."""
        out = _jsonable({**row, "wall_s": round(time.time() - self.t0, 3)})
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(out) + "\n")
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
