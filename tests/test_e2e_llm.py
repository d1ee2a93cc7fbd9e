"""End to end through `flwr run`: the offline causal-LM preset learns with dense LoRA, SOFT and
sketching, and the saved adapter reloads on the causal LM with the server's final loss."""

import json

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedsoft.config import RunConfig
from fedsoft.experiments.launch import flwr_run
from fedsoft.runlog import read_metrics
from fedsoft.task import workload
from fedsoft.task.models import tiny_llama_dir
from fedsoft.task.train import evaluate

CHEAP = ('preset="llm-offline" num-server-rounds=2 local-steps=8 max-train-examples=400 '
         'max-test-examples=60 max-length=80')


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    'sparsifier="dense"',
    'sparsifier="soft" sparsity=0.9 zeta=0.01 wire-dtype="int8"',
    'strategy="sketch" sampling="uniform" sampling-q=1.0 sketch-ratio=0.5',
])
def test_tiny_causal_lm_learns_and_its_adapter_reloads(tmp_path, method):
    run_dir = tmp_path / "run"
    proc = flwr_run(tmp_path / "home", f'{CHEAP} {method} run-dir="{run_dir}"', num_supernodes=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, *rows = read_metrics(run_dir / "metrics.jsonl")
    assert len(rows) == 2 and all(r["num_clients"] >= 1 for r in rows)
    # learning happened: the held-out loss per response token fell
    assert rows[-1]["loss"] < first["loss"] - 0.5
    assert {"perplexity", "accuracy", "uplink_bytes", "downlink_bytes"} <= set(rows[-1])
    if "dense" not in method:
        assert rows[-1]["uplink_bytes"] < 0.6 * rows[-1]["dense_uplink_bytes"]
    # the adapter loads with peft's own API on the causal LM and gives the server's final loss
    cfg = RunConfig.from_flat(json.loads((run_dir / "config.json").read_text()))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir())
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    workload.clear_cache()
    loss, acc, _ = evaluate(model, workload.test_loader(cfg, workload.build_workload(cfg)))
    assert loss == pytest.approx(rows[-1]["loss"], rel=1e-5)
    assert acc == pytest.approx(rows[-1]["accuracy"])
    workload.clear_cache()
