"""TSFA calibration: sigma_bar_r and sigma_max of the bound surrogate (A.8) from a pilot run.

How it is done. Every fedsoft run appends, after each round, the SOFT per-rank scores
``s_j = ||b_j|| ||a_j||`` (eq. 8) of the *global* adapter's factors of every adapted layer to
``<run-dir>/rank_scores.jsonl``. Those scores are the surrogate singular values of the LoRA
product B A (exact when the factors are orthogonal, A.7), i.e. of the update whose spectrum
Assumption 2 / eq. (19) bounds. ``python -m fedsoft.wireless.calibration <pilot-run-dir>`` then
sorts
each layer's scores, takes column r-1 as sigma_bar_r averaged over layers and rounds >= 1
(round 0 is the initial adapter, B = 0), and the largest score as sigma_max
(:func:`fedsoft.wireless.offline_rank.calibrate`). It writes ``calibration.json``; a TSFA run reads
it through
``bound-calibration="<path>"``. The pilot's ``lora-rank`` must be >= the largest of
``tsfa-ranks`` so every candidate rank has a sigma_bar value.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedsoft import lora
from fedsoft.compression.spectrum import soft_scores
from fedsoft.durable import atomic_write_text
from fedsoft.wireless.offline_rank import Calibration, calibrate

__all__ = [
    "SCORES_FILE",
    "append_scores",
    "calibrate_run",
    "keep_scores_through",
    "layer_scores",
    "load_calibration",
    "write_calibration",
]

SCORES_FILE = "rank_scores.jsonl"
CALIBRATION_FILE = "calibration.json"


def layer_scores(model: torch.nn.Module) -> list[list[float]]:
    """Per adapted layer, the SOFT scores (eq. 8) of its (A, B), sorted in descending order."""
    out = []
    for _, a, b in lora.get_factors(model):
        s = soft_scores(a.double(), b.double())
        out.append(sorted((float(v) for v in s), reverse=True))
    return out


def append_scores(run_dir: Path | str, server_round: int, scores: list[list[float]]) -> None:
    """Append one round's per-layer scores to ``<run-dir>/rank_scores.jsonl``."""
    with (Path(run_dir) / SCORES_FILE).open("a") as fh:
        fh.write(json.dumps({"round": int(server_round), "scores": scores}) + "\n")


def keep_scores_through(run_dir: Path | str, last_round: int) -> None:
    """Drop the ``rank_scores.jsonl`` rows of rounds > ``last_round``.

    The server calls it when a run starts in its run-dir: ``-1`` for a fresh run (the file is
    emptied), the checkpoint's round for a resume, so a reused run-dir holds each round once
    and :func:`calibrate_run` never averages a round twice."""
    path = Path(run_dir) / SCORES_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and _round_of(line) <= last_round]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _round_of(line: str) -> float:
    try:
        return int(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a malformed row is dropped, not kept for read_scores to choke on


def read_scores(run_dir: Path | str, first_round: int = 1) -> list[np.ndarray]:
    """Per-round (layers, r) score arrays of rounds >= ``first_round`` from a run directory."""
    path = Path(run_dir) / SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: calibrate from the run-dir of a finished fedsoft run"
        )
    rounds = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            t, scores = int(row["round"]), np.asarray(row["scores"], dtype=np.float64)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: malformed scores row ({exc})") from exc
        if t >= first_round:
            rounds.append(scores)
    if not rounds:
        raise ValueError(f"{path} holds no round >= {first_round}: run the pilot for >= 1 round")
    return rounds


def calibrate_run(
    run_dir: Path | str, aggregate: Literal["mean", "max"] = "mean"
) -> Calibration:
    """sigma_bar_r (r = 1..pilot rank) and sigma_max from a pilot run's score log (A.8)."""
    return calibrate(read_scores(run_dir), aggregate=aggregate)


def write_calibration(path: Path | str, cal: Calibration, source: str = "",
                      pilot: Mapping[str, Any] | None = None) -> Path:
    """Write ``calibration.json`` (sigma_bar list, sigma_max, rounds, pilot rank, source and,
    from ``bound-calibration = "auto"``, the pilot's identity, see
    :func:`fedsoft.wireless.pilot.identity`)
    atomically."""
    path = Path(path)
    body: dict[str, Any] = {
        "sigma_bar": [float(v) for v in cal.sigma_bar],
        "sigma_max": float(cal.sigma_max),
        "num_rounds": int(cal.num_rounds),
        "pilot_rank": int(cal.pilot_rank),
        "source": source,
    }
    if pilot is not None:
        body["pilot"] = dict(pilot)
    atomic_write_text(path, json.dumps(body, indent=2))
    return path


def load_calibration(path: Path | str) -> tuple[np.ndarray, float]:
    """(sigma_bar per rank, sigma_max) from a ``calibration.json``; clear errors on bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bound-calibration={str(path)!r}: no such file")
    try:
        data = json.loads(path.read_text())
        sigma_bar = np.asarray(data["sigma_bar"], dtype=np.float64)
        sigma_max = float(data["sigma_max"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"bound-calibration={str(path)!r}: malformed file ({exc})") from exc
    if sigma_bar.ndim != 1 or sigma_bar.size == 0 or not np.all(np.isfinite(sigma_bar)) \
            or np.any(sigma_bar < 0) or not math.isfinite(sigma_max) or sigma_max < 0:
        raise ValueError(
            f"bound-calibration={str(path)!r}: sigma_bar must be a non-empty list of finite "
            f"values >= 0 and sigma_max finite >= 0, got {data['sigma_bar']!r}, {sigma_max!r}"
        )
    return sigma_bar, sigma_max


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m fedsoft.wireless.calibration <pilot-run-dir> [--aggregate mean|max] [--out
    F]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="run-dir of a finished pilot run")
    ap.add_argument("--aggregate", choices=("mean", "max"), default="mean",
                    help="sigma_bar_r as the mean over layers and rounds, or the max")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"output file (default <run-dir>/{CALIBRATION_FILE})")
    args = ap.parse_args(argv)
    cal = calibrate_run(args.run_dir, args.aggregate)
    out = write_calibration(args.out or args.run_dir / CALIBRATION_FILE, cal,
                            source=str(args.run_dir.resolve()))
    print(f"pilot rank {cal.pilot_rank}, {cal.num_rounds} rounds, sigma_max {cal.sigma_max:.4g}")
    for r, s in enumerate(cal.sigma_bar, start=1):
        print(f"  sigma_bar_{r} = {s:.4g}")
    print(f"wrote {out}\nuse: flwr run . --run-config 'strategy=\"tsfa\" "
          f"bound-calibration=\"{out.resolve()}\"'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
