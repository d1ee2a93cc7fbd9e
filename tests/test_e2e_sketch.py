"""End to end through `flwr run`: paper B's sketching + independent sampling strategy."""

import json

import pytest

from fedsoft.experiments.launch import flwr_run
from fedsoft.runlog import read_metrics


@pytest.mark.slow
def test_sketch_run_reports_cumulative_wallclock_and_sends_k_of_r(tmp_path):
    # sketch-calibration = "auto": a 2-round pilot per (q, k) setting runs first on the same
    # federation, then the main run is priced with the fitted constants
    run_dir = tmp_path / "run"
    proc = flwr_run(
        tmp_path / "home",
        f'preset="ci" strategy="sketch" num-server-rounds=3 local-steps=4 sampling="uniform" '
        f'sampling-q=0.7 sketch-ratio=0.25 sketch-calibration="auto" sketch-pilot-rounds=2 '
        f'run-dir="{run_dir}"',
        num_supernodes=3,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sketch plan (uniform)" in proc.stdout
    assert proc.stdout.count("sketch pilot ") == 4
    cal = json.loads((run_dir / "sketch_calibration.json").read_text())
    assert len(cal["runs"]) == 4 and all(len(r["losses"]) == 3 for r in cal["runs"])
    # every constant is either fitted or listed as assumed (with the reason in the warnings)
    assert set(cal["fitted"]) | set(cal["assumed"]) and (cal["assumed"] == [] or cal["warnings"])
    constants = json.loads((run_dir / "sampling_plan.json").read_text())["constants"]
    assert (constants["alpha0"], constants["alpha1"], constants["xi"]) == (
        cal["alpha0"], cal["alpha1"], cal["xi"])
    plan = json.loads((run_dir / "sampling_plan.json").read_text())
    assert [c["q"] for c in plan["clients"]] == [0.7] * 3
    r = json.loads((run_dir / "config.json").read_text())["lora-rank"]
    assert {c["k"] for c in plan["clients"]} == {max(1, round(0.25 * r))}
    first, *rows = read_metrics(run_dir / "metrics.jsonl")
    assert len(rows) == 3
    clock = 0.0
    for row in rows:
        assert {"participants", "sim_round_s", "sim_wallclock_s", "q", "k"} <= set(row)
        assert row["num_clients"] <= row["participants"] <= 3
        # every round costs the fixed overhead (1 s by default); participants add to it
        assert row["sim_round_s"] >= 1.0
        assert (row["sim_round_s"] > 1.0) == (row["participants"] > 0)
        clock += row["sim_round_s"]
        assert row["sim_wallclock_s"] == pytest.approx(clock)
    active = [row for row in rows if row["num_clients"] > 0]
    assert active, "no round had participants"
    for row in active:  # k/r of the LoRA values plus the dense head, against dense fp32 LoRA
        assert 0.2 < row["uplink_bytes"] / row["dense_uplink_bytes"] < 0.35
    # learning happened: the unbiased sketched updates moved the model the right way
    assert max(r["accuracy"] for r in rows) > first["accuracy"]
    assert min(r["loss"] for r in rows) < first["loss"]
