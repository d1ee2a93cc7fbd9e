"""Run bookkeeping of the figure runner: finished runs, reuse across figures, Gram matrices."""

from __future__ import annotations

import json
from pathlib import Path

from fedsoft.experiments.catalogue import GRAM
from fedsoft.runlog import read_metrics


def num_rounds(run_dir: Path, fallback: int) -> int:
    cfg_path = run_dir / "config.json"
    if cfg_path.is_file():
        try:
            return int(json.loads(cfg_path.read_text())["num-server-rounds"])
        except (ValueError, KeyError):
            pass
    return fallback


def is_finished(run_dir: Path, rounds: int, key: str | None = None) -> bool:
    """``metrics.jsonl`` has ``rounds + 1`` rows (round 0 .. rounds) and, when ``key`` is given
    and ``run.json`` exists, the run was made for the same resolved config."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    try:
        rows = read_metrics(metrics)
    except ValueError:
        return False
    if len(rows) != num_rounds(run_dir, rounds) + 1:
        return False
    info = run_dir / "run.json"
    if key is not None and info.is_file():
        try:
            return json.loads(info.read_text()).get("key") == key
        except ValueError:
            return False
    return True


def find_reusable(out_root: Path, scale: str, key: str, rounds: int,
                  exclude: Path) -> Path | None:
    """A finished run of the same scale in any experiment under ``out_root`` with this key."""
    for info in sorted(out_root.glob(f"*/{scale}/*/run.json")):
        run_dir = info.parent
        if run_dir.resolve() == exclude.resolve():
            continue
        try:
            if json.loads(info.read_text()).get("key") != key:
                continue
        except ValueError:
            continue
        if is_finished(run_dir, rounds, key):
            return run_dir
    return None


def write_gram(run_dir: Path) -> Path:
    """Gram matrices A Aᵀ and Bᵀ B (eq. 7) of every layer of the saved final adapter -> JSONL."""
    import torch
    from safetensors.torch import load_file

    from fedsoft.compression.orthogonality import gram_matrices, orth_offdiag

    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}."
            if tag in name:
                layer = name.split(tag)[0].removeprefix("base_model.model.")
                layers.setdefault(layer, {})[part] = t.float()
    out = run_dir / GRAM
    with out.open("w") as fh:
        for layer, ab in layers.items():
            A, B = ab["lora_A"], ab["lora_B"]
            aat, btb = gram_matrices(A, B)
            fh.write(json.dumps({
                "layer": layer, "r": int(A.shape[0]), "AAt": aat.tolist(), "BtB": btb.tolist(),
                "orth_offdiag": orth_offdiag([(A, B)]),
            }) + "\n")
    return out
