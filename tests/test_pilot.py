"""bound-calibration = "auto": pilot config and identity, pilot log -> calibration.json -> the
offline stage (A.8, eqs. 19 and 25-29), reuse and resume rules, a fresh model afterwards."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedsoft import lora
from fedsoft.config import DEFAULTS, ConfigError, resolve
from fedsoft.task import workload
from fedsoft.wireless import pilot
from fedsoft.wireless import plan as tsfa_plan
from fedsoft.wireless.bound import sparsification_term
from fedsoft.wireless.calibration import (
    append_scores,
    calibrate_run,
    load_calibration,
    write_calibration,
)
from strategies import pilot as server_pilot

CONF = Path(__file__).resolve().parents[1] / "conf"


def auto_cfg(run_dir, **over):
    return {**DEFAULTS, "strategy": "tsfa", "sparsifier": "soft", "tsfa-ranks": "1,2,4,8",
            "bound-calibration": "auto", "run-dir": str(run_dir), **over}


def write_pilot_log(run_dir, seed=0, ranks=8, layers=3, rounds=3):
    """A pilot score log with a decaying spectrum (what run_pilot writes), round 0 = B = 0."""
    rng = np.random.default_rng(seed)
    pdir = Path(run_dir) / pilot.PILOT_DIR
    pdir.mkdir(parents=True, exist_ok=True)
    append_scores(pdir, 0, np.zeros((layers, ranks)).tolist())
    for t in range(1, rounds + 1):
        decay = 2.0 ** -np.arange(ranks)
        append_scores(pdir, t, (t * decay * (1 + 0.1 * rng.random((layers, ranks)))).tolist())
    return pdir


def test_pilot_config_is_dense_at_the_largest_candidate_rank(tmp_path):
    cfg = auto_cfg(tmp_path, **{"bound-pilot-rounds": 2, "bound-pilot-local-steps": 3})
    pcfg = pilot.pilot_config(cfg, tmp_path)
    assert pcfg["lora-rank"] == 8 == pilot.pilot_rank(cfg)
    assert (pcfg["strategy"], pcfg["sparsifier"], pcfg["sparsity"]) == ("fedavg", "dense", 0.0)
    assert pcfg["num-server-rounds"] == 2 and pcfg["local-steps"] == 3
    assert pcfg["run-dir"] == str(tmp_path / "pilot") and pcfg["bound-calibration"] == ""
    for key in ("seed", "lr", "clients-per-round", "model", "dataset", "partitioner"):
        assert pcfg[key] == cfg[key]


def test_identity_changes_with_what_the_pilot_trains_only(tmp_path):
    cfg = auto_cfg(tmp_path)
    base = pilot.identity(cfg, 4)
    assert base["lora-rank"] == 8 and base["num-nodes"] == 4
    # keys the dense pilot does not use leave it as is
    for key, value in [("latency-budget-fraction", 0.3), ("bound-kappa-e", 2.0), ("run-dir", "/x"),
                       ("lyapunov-v", 1.0), ("num-server-rounds", 50)]:
        assert pilot.identity({**cfg, key: value}, 4) == base, key
    # what it trains with changes it
    for key, value in [("lr", 0.01), ("seed", 1), ("tsfa-ranks", "1,2,16"),
                       ("bound-pilot-rounds", 5), ("clients-per-round", 3)]:
        assert pilot.identity({**cfg, key: value}, 4) != base, key
    assert pilot.identity(cfg, 5) != base


def test_pilot_log_to_calibration_to_offline_stage(tmp_path):
    """The auto path without Flower: the pilot's log -> calibration.json -> plan() reads it."""
    cfg = auto_cfg(tmp_path, **{"latency-budget-fraction": 0.5})
    pdir = write_pilot_log(tmp_path)
    cal = calibrate_run(pdir)
    path = write_calibration(pilot.calibration_file(cfg), cal, pilot=pilot.identity(cfg, 4))
    assert path == tmp_path / "calibration.json"
    assert pilot.reusable(path, pilot.identity(cfg, 4))
    assert not pilot.reusable(path, pilot.identity(cfg, 5))
    sigma_bar, sigma_max = load_calibration(path)
    assert sigma_bar.size == 8 and sigma_max == cal.sigma_max > 0
    # the offline table of the auto config uses the file's per-rank sigma_bar (eq. 19 term)
    dk = 2 * 384 * 12
    plan = tsfa_plan.plan(cfg, num_clients=4, d_plus_k_total=dk)
    default = tsfa_plan.plan({**cfg, "bound-calibration": ""}, num_clients=4, d_plus_k_total=dk)
    b = plan.bound
    for r, row in plan.offline.table.items():
        rank_term = row.phi0 - b.kappa_E * sparsification_term(row.rho, b.p) \
            - b.kappa_C * r * sigma_max ** 2 - b.kappa_S
        assert rank_term == pytest.approx(
            b.kappa_R * (b.r_star_ideal - r) * sigma_bar[r - 1] ** 2, rel=1e-9)
        assert row.rho == default.offline.table[r].rho  # rho*(r) (eq. 29) does not move
    assert [plan.bound.sigma_bar_at(r) for r in (1, 2, 4, 8)] == \
        pytest.approx(sigma_bar[[0, 1, 3, 7]].tolist())
    # auto with no file is a config error naming the key; osfa ignores "auto"
    (tmp_path / "calibration.json").unlink()
    with pytest.raises(ConfigError, match="bound-calibration"):
        tsfa_plan.plan(cfg, num_clients=4, d_plus_k_total=dk)
    osfa = tsfa_plan.bound_constants({**cfg, "strategy": "osfa", "lora-rank": 4})
    assert osfa.sigma_bar_at(4) == DEFAULTS["bound-sigma-bar"]


def test_ensure_calibration_runs_the_pilot_once_reuses_it_and_never_on_resume(
        tmp_path, monkeypatch, capsys):
    calls = []

    def fake_pilot(grid, cfg, node_ids, base=None):  # what run_pilot returns, from its log
        calls.append(dict(cfg))
        return calibrate_run(write_pilot_log(cfg["run-dir"], seed=len(calls)))

    monkeypatch.setattr(server_pilot, "run_pilot", fake_pilot)
    nodes = [11, 12, 13, 14]
    cfg = auto_cfg(tmp_path / "run", **{"latency-budget-fraction": 0.5})
    kw = {"d_plus_k_total": 2 * 384 * 12}
    path = server_pilot.ensure_calibration(None, cfg, nodes, **kw)
    assert path == tmp_path / "run" / "calibration.json" and len(calls) == 1
    written = json.loads(path.read_text())
    assert written["pilot"] == pilot.identity(cfg, 4)
    out = capsys.readouterr().out
    measured = tsfa_plan.plan(cfg, 4, **kw).rank
    assert f"r* = {measured} with the measured spectra" in out
    assert f"sigma_max = {written['sigma_max']:.4g}" in out
    # same identity: reused, no second pilot; another budget does not change the identity
    server_pilot.ensure_calibration(None, {**cfg, "latency-budget-fraction": 0.4}, nodes, **kw)
    assert len(calls) == 1 and "reused" in capsys.readouterr().out
    # another lr: a new pilot
    server_pilot.ensure_calibration(None, {**cfg, "lr": 0.01}, nodes, **kw)
    assert len(calls) == 2
    # resume: never a pilot, the first run's file is copied to a new run-dir
    new = {**cfg, "run-dir": str(tmp_path / "elsewhere"), "lr": 0.05}
    got = server_pilot.ensure_calibration(None, new, nodes, resume_config=cfg, **kw)
    assert len(calls) == 2 and got.read_text() == path.read_text()
    with pytest.raises(ConfigError, match="never re-runs"):
        server_pilot.ensure_calibration(None, {**cfg, "run-dir": str(tmp_path / "a")}, nodes,
                                        resume_config={"run-dir": str(tmp_path / "b")}, **kw)
    # nothing to do for other values and strategies
    assert server_pilot.ensure_calibration(None, {**cfg, "bound-calibration": ""}, nodes,
                                           **kw) is None
    assert server_pilot.ensure_calibration(None, {**cfg, "strategy": "osfa"}, nodes, **kw) is None
    assert len(calls) == 2


def test_infeasible_budget_fails_before_the_pilot(tmp_path, monkeypatch):
    monkeypatch.setattr(server_pilot, "run_pilot", lambda *a: pytest.fail("pilot ran"))
    cfg = auto_cfg(tmp_path, **{"latency-budget-fraction": 1e-6})
    with pytest.raises(ConfigError, match="latency-budget"):
        server_pilot.ensure_calibration(None, cfg, [1, 2], d_plus_k_total=2 * 384 * 12)
    assert not (tmp_path / "pilot").exists()


def test_simulated_pilot_measures_and_leaves_a_fresh_model(tmp_path):
    cfg = resolve({"preset": "ci", "strategy": "tsfa", "tsfa-ranks": "1,2,4",
                   "bound-pilot-rounds": 2, "bound-pilot-local-steps": 1,
                   "run-dir": str(tmp_path)}, CONF)
    workload.clear_cache()
    fresh = lora.to_arrays(workload.build_workload({**cfg, "lora-rank": 4}).model)
    pdir = pilot.simulate_pilot(cfg, 2, tmp_path / "pilot")
    cal = calibrate_run(pdir)
    assert cal.pilot_rank == 4 and cal.num_rounds == 2 and cal.sigma_max > 0
    assert np.all(np.diff(cal.sigma_bar) <= 0)
    after = lora.to_arrays(workload.build_workload({**cfg, "lora-rank": 4}).model)
    assert set(after) == set(fresh)
    for key in fresh:  # the pilot trained rank 4 too, yet the next build is the seeded init
        np.testing.assert_array_equal(after[key], fresh[key])
