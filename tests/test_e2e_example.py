"""End to end through `flwr run`: the FlowerTune-shaped example with soft_mod + SoftDecode."""

import json
import tomllib

import pytest

from fedsoft.experiments.launch import ROOT, flwr_run

APP = ROOT / "examples" / "flowertune-soft"


@pytest.mark.slow
def test_flowertune_soft_learns_sends_a_fraction_and_saves_a_reloadable_adapter(
        tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    proc = flwr_run(tmp_path / "flwr-home", f'run-dir="{run_dir}" num-server-rounds=3',
                    num_supernodes=2, app_dir=APP, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # learning: the server's held-out loss fell
    assert rows[-1]["heldout_loss"] < rows[0]["heldout_loss"] - 0.05
    # the uplink, as Flower counts the received ArrayRecords, is a fraction of the dense one
    for r in rows[1:]:
        assert r["soft_decoded"] == 2 and r["soft_dropped"] == 0
        assert 0 < r["uplink_bytes"] < 0.25 * r["dense_uplink_bytes"]

    # the saved adapter reloads on the rebuilt tiny model and gives the final held-out loss
    from peft import PeftModel

    monkeypatch.syspath_prepend(str(APP))
    from flowertune_soft.dataset import batches, load_test, replace_keys
    from flowertune_soft.models import base_model, get_tokenizer, heldout_loss

    cfg = replace_keys(tomllib.loads((APP / "pyproject.toml").read_text())
                       ["tool"]["flwr"]["app"]["config"])
    tokenizer = get_tokenizer(cfg["model"]["name"])
    model = PeftModel.from_pretrained(base_model(cfg["model"], tokenizer),
                                      str(run_dir / "adapter"))
    test = batches(load_test(cfg["dataset"]), tokenizer, int(cfg["train"]["seq_length"]),
                   int(cfg["train"]["batch_size"]))
    assert heldout_loss(model, test) == pytest.approx(rows[-1]["heldout_loss"], abs=1e-5)
