"""End to end through `flwr run`: real MiniLM, the ci preset, learning happens, adapter reloads."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedsoft.config import resolve
from fedsoft.experiments.launch import ROOT, flwr_run
from fedsoft.runlog import read_metrics
from fedsoft.task import workload
from fedsoft.task.models import get_spec, resolve_source
from fedsoft.task.train import evaluate

CONTRACT_KEYS = {"round", "accuracy", "loss", "num_clients", "uplink_bytes", "wall_s"}


@pytest.mark.slow
def test_flwr_run_learns_and_saves_adapter(tmp_path):
    run_dir = tmp_path / "run"
    proc = flwr_run(tmp_path / "flwr-home",
                    f'preset="ci" num-server-rounds=3 run-dir="{run_dir}"', num_supernodes=3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    cfg = json.loads((run_dir / "config.json").read_text())
    assert [r["round"] for r in rows] == list(range(cfg["num-server-rounds"] + 1))
    assert all(CONTRACT_KEYS <= set(r) for r in rows)
    assert rows[0]["num_clients"] == 0 and rows[0]["uplink_bytes"] == 0
    assert all(r["num_clients"] == cfg["clients-per-round"] for r in rows[1:])
    assert all(r["uplink_bytes"] > 0 for r in rows[1:])
    # learning happened: the server's held-out accuracy and loss improved over round 0
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.1
    assert rows[-1]["loss"] < rows[0]["loss"]

    # the saved peft adapter (+ head) reloads and reproduces the server's final accuracy
    cfg = resolve(cfg, ROOT / "conf")
    work = workload.build_workload(cfg)
    spec = get_spec(cfg["model"])
    backbone = AutoModelForSequenceClassification.from_pretrained(
        resolve_source(spec), num_labels=work.num_classes)
    reloaded = PeftModel.from_pretrained(backbone, str(run_dir / "adapter"))
    loss, acc, _ = evaluate(reloaded, workload.test_loader(cfg, work), torch.device("cpu"))
    assert acc == pytest.approx(rows[-1]["accuracy"], abs=1e-9)
    assert loss == pytest.approx(rows[-1]["loss"], rel=1e-4)


@pytest.mark.slow
def test_quickstart_exits_non_zero_when_the_server_app_fails(tmp_path):
    """flwr run exits 0 even when the ServerApp raises; the README's main command must not."""
    import os
    import subprocess

    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "NUM_SUPERNODES": "2"}
    proc = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--run-config",
         f'preset="ci" resume-from="{tmp_path / "no-such-checkpoint"}"'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "did not finish all its rounds" in proc.stderr
