"""Paper B calibration: alpha0, alpha1, xi of R_eps (B.4) fitted to pilot loss curves."""

import json

import numpy as np
import pytest

from fedsoft.config import DEFAULTS, ConfigError, resolve
from fedsoft.sketching.calibration import (
    PilotRun,
    design_row,
    fit_constants,
    load_sketch_calibration,
    main,
    pilot_settings,
    rounds_to_target,
    write_sketch_calibration,
)
from fedsoft.sketching.optimizer import SketchObjective
from fedsoft.sketching.plan import objective

RANK = 8
A = np.array([0.3, 0.25, 0.2, 0.15, 0.1])


def _runs(true: SketchObjective, settings, rank=RANK, a=A, slope=0.05):
    """Linear loss curves whose rounds to any decrease are proportional to R_eps(q, k)."""
    out = []
    for name, q, k in settings:
        qv, kv = np.full(a.size, float(q)), np.full(a.size, int(k))
        r = true.rounds(qv, kv, a / a.sum(), rank)
        t = np.arange(int(np.ceil(3 * r)) + 2)
        out.append(PilotRun(name, qv, kv, a.copy(), rank, 3.0 - slope * t / r))
    return out


def test_rounds_to_target_interpolates_on_the_running_minimum():
    assert rounds_to_target([3.0, 2.0, 2.5, 1.0], 1.5) == pytest.approx(2.5)  # env 3,2,2,1
    assert rounds_to_target([3.0, 2.0], 2.5) == pytest.approx(0.5)
    assert rounds_to_target([3.0, 2.9], 1.0) is None
    assert rounds_to_target([1.0, 2.0], 1.5) == 0.0


def test_design_row_reproduces_the_objective():
    q = np.array([0.2, 0.9, 0.5, 0.4, 1.0])
    k = np.array([1, 8, 3, 2, 5])
    obj = SketchObjective(1.7, 0.6, 0.9)
    s, v, w = design_row(q, k, A, RANK)
    assert obj.alpha0 * s + obj.alpha1 * v + obj.alpha1 * obj.xi * w == pytest.approx(
        obj.rounds(q, k, A, RANK))


def test_the_auto_pilot_design_identifies_all_three_constants():
    true = SketchObjective(2.0, 5.0, 0.3)
    cal = fit_constants(_runs(true, pilot_settings(RANK, 0.4)), target_fraction=0.5)
    assert cal.fitted == ["alpha0", "alpha1", "xi"] and cal.assumed == []
    assert cal.alpha0 / cal.alpha1 == pytest.approx(0.4, rel=1e-6)
    assert cal.xi == pytest.approx(0.3, rel=1e-6)
    assert cal.rel_rms_residual < 1e-6
    # R is measured in rounds to the target: the fitted R_eps predicts them
    for row in cal.runs:
        assert row["rounds_predicted"] == pytest.approx(row["rounds_to_target"], rel=1e-6)


def test_one_k_leaves_xi_assumed_with_a_warning_and_still_fits_the_ratio(caplog):
    true = SketchObjective(2.0, 5.0, 0.3)
    runs = _runs(true, [("a", 1.0, 4), ("b", 0.5, 4), ("c", 0.25, 4)])
    fb = SketchObjective(1.0, 1.0, 0.7)
    cal = fit_constants(runs, fb)
    assert cal.fitted == ["alpha0", "alpha1"] and cal.assumed == ["xi"]
    assert cal.xi == 0.7
    assert any("xi is not identified" in w for w in cal.warnings)
    assert "xi is not identified" in caplog.text
    # with xi = 0.7 assumed instead of 0.3 the fit is no longer exact, but every round count
    # is still explained within a few per cent by the fitted (alpha0, alpha1)
    assert cal.rel_rms_residual < 0.05


def test_one_q_leaves_the_ratio_assumed_and_one_run_only_the_scale():
    true = SketchObjective(2.0, 5.0, 0.3)
    fb = SketchObjective(3.0, 1.0, 0.5)
    cal = fit_constants(_runs(true, [("a", 1.0, 8), ("b", 1.0, 2), ("c", 1.0, 1)]), fb)
    assert cal.fitted == ["alpha1", "xi"] and cal.assumed == ["alpha0/alpha1"]
    assert cal.alpha0 / cal.alpha1 == pytest.approx(3.0)
    one = fit_constants(_runs(true, [("a", 0.5, 4)]), fb)
    assert one.fitted == ["scale"] and one.assumed == ["alpha0/alpha1", "xi"]
    assert (one.alpha0 / one.alpha1, one.xi) == (pytest.approx(3.0), 0.5)
    assert one.rel_rms_residual < 1e-9  # one point, one scale


def test_a_flat_pilot_assumes_everything():
    flat = [PilotRun("f", np.ones(5), np.full(5, 8), A, RANK, np.full(5, 2.0))]
    cal = fit_constants(flat, SketchObjective(1.0, 2.0, 0.5))
    assert cal.assumed == ["alpha0", "alpha1", "xi"] and cal.fitted == []
    assert (cal.alpha0, cal.alpha1, cal.xi) == (1.0, 2.0, 0.5)
    assert "never lowered its loss" in cal.warnings[0]


def _write_run(d, run: PilotRun):
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"lora-rank": run.rank}))
    (d / "sampling_plan.json").write_text(json.dumps({"clients": [
        {"client": i, "q": float(q), "k": int(k), "examples": int(100 * a)}
        for i, (q, k, a) in enumerate(zip(run.q, run.k, run.a, strict=True))]}))
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"round": t, "loss": float(v)}) + "\n" for t, v in enumerate(run.losses)))


def test_cli_writes_a_calibration_that_the_run_config_reads(tmp_path, capsys):
    true = SketchObjective(2.0, 5.0, 0.3)
    runs = _runs(true, pilot_settings(RANK, 0.5))
    for run in runs:
        _write_run(tmp_path / run.name, run)
    out = tmp_path / "sketch_calibration.json"
    assert main([str(tmp_path / r.name) for r in runs] + ["--out", str(out)]) == 0
    assert "fitted: alpha0, alpha1, xi" in capsys.readouterr().out
    cal = load_sketch_calibration(out)
    assert cal.alpha0 / cal.alpha1 == pytest.approx(0.4, rel=1e-4)
    assert cal.xi == pytest.approx(0.3, rel=1e-4)
    cfg = resolve({**DEFAULTS, "strategy": "sketch", "sketch-calibration": str(out)})
    obj = objective(cfg)
    assert (obj.alpha0, obj.alpha1, obj.xi) == (cal.alpha0, cal.alpha1, cal.xi)
    write_sketch_calibration(tmp_path / "again.json", cal)
    assert load_sketch_calibration(tmp_path / "again.json") == cal


def test_sketch_calibration_keys_and_bad_files_name_the_key(tmp_path):
    cfg = resolve({**DEFAULTS, "strategy": "sketch"})
    assert cfg["sketch-calibration"] == "" and cfg["sketch-pilot-rounds"] == 4
    obj = objective(cfg)
    assert (obj.alpha0, obj.alpha1, obj.xi) == (1.0, 1.0, 0.5)
    bad = tmp_path / "bad.json"
    bad.write_text('{"alpha0": 1}')
    for path in (str(bad), str(tmp_path / "missing.json")):
        with pytest.raises(ConfigError, match="sketch-calibration"):
            objective({**cfg, "sketch-calibration": path})
    with pytest.raises(ConfigError, match="sketch-pilot-rounds"):
        resolve({**DEFAULTS, "sketch-pilot-rounds": 1})
    with pytest.raises(ConfigError, match="sketch-pilot-target"):
        resolve({**DEFAULTS, "sketch-pilot-target": 0.0})


def test_a_calibration_with_no_fit_survives_a_json_writer_that_turns_nan_into_null(tmp_path):
    import json
    import math

    from fedsoft.sketching.calibration import (
        SketchCalibration,
        calibration_json,
        load_sketch_calibration,
        write_sketch_calibration,
    )

    cal = load_sketch_calibration(write_sketch_calibration(
        tmp_path / "a.json", SketchCalibration(1.0, 1.0, 0.5, [], ["alpha0", "alpha1", "xi"])))
    assert math.isnan(cal.rel_rms_residual)  # nothing fitted: NaN, kept by its own writer
    raw = calibration_json(cal)
    raw["rel_rms_residual"] = None  # what a strict JSON writer makes of NaN
    (tmp_path / "b.json").write_text(json.dumps(raw))
    assert math.isnan(load_sketch_calibration(tmp_path / "b.json").rel_rms_residual)
