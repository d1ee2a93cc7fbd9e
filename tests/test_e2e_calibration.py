"""End to end through `flwr run`: TSFA with bound-calibration = "auto" on the ci preset."""

import json

import numpy as np
import pytest

from fedsoft.config import resolve
from fedsoft.experiments.launch import ROOT, flwr_run
from fedsoft.runlog import read_metrics
from fedsoft.wireless import pilot
from fedsoft.wireless import plan as tsfa_plan
from fedsoft.wireless.calibration import calibrate_run, load_calibration, read_scores


@pytest.mark.slow
def test_auto_calibration_pilot_then_tsfa_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = flwr_run(
        tmp_path / "home",
        'preset="ci" strategy="tsfa" bound-calibration="auto" bound-pilot-rounds=2 '
        'bound-pilot-local-steps=2 num-server-rounds=2 local-steps=2 max-test-examples=100 '
        f'run-dir="{run_dir}"')
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["bound-calibration"] == "auto"
    # flwr run exits 0 even when the ServerApp raised: the real run finished all its rounds
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(cfg["num-server-rounds"] + 1)) == [0, 1, 2]
    assert all(r["num_clients"] == 2 for r in rows[1:])
    # the pilot: dense, at the largest candidate rank, its own rounds 0..2 in <run-dir>/pilot
    pdir = run_dir / pilot.PILOT_DIR
    scores = read_scores(pdir, first_round=0)
    assert len(scores) == 3 and scores[0].shape[1] == pilot.pilot_rank(cfg) == 32
    assert np.all(scores[0] == 0)  # round 0: B = 0, the real run's init is not the pilot's
    pilot_rows = read_metrics(pdir / "metrics.jsonl")
    assert [r["round"] for r in pilot_rows] == [0, 1, 2]
    assert json.loads((pdir / "config.json").read_text())["sparsifier"] == "dense"
    # calibration.json was written from that log, with the pilot's identity
    cal = calibrate_run(pdir)
    data = json.loads((run_dir / "calibration.json").read_text())
    assert data["sigma_bar"] == pytest.approx(cal.sigma_bar.tolist(), rel=1e-12)
    assert data["sigma_max"] == pytest.approx(cal.sigma_max) and data["num_rounds"] == 2
    assert data["pilot"] == pilot.identity(resolve(cfg, ROOT / "conf"), 2)
    # the offline table used it: Phi0(r, rho*) with the measured sigma_bar_r and sigma_max
    bound = tsfa_plan.bound_constants(cfg)
    sigma_bar, sigma_max = load_calibration(run_dir / "calibration.json")
    assert bound.sigma_max == sigma_max and bound.max_rank == sigma_bar.size == 32
    offline = json.loads((run_dir / "offline.json").read_text())
    for row in offline:
        assert row["phi0"] == pytest.approx(bound.value(row["rank"], row["rho_star"]), rel=1e-12)
    chosen = [r["rank"] for r in offline if r["chosen"]]
    assert cfg["lora-rank"] == chosen[0] and all(r["rank"] == chosen[0] for r in rows[1:])
    assert f"r* = {chosen[0]} with the measured spectra" in out
    assert "the run starts from a fresh model" in out
