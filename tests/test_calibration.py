"""Calibration of sigma_bar_r / sigma_max from a pilot run's per-rank score log."""

import json

import numpy as np
import pytest
import torch

from fedsoft import lora
from fedsoft.config import DEFAULTS
from fedsoft.task.models import build_model, get_spec
from fedsoft.wireless.calibration import (
    append_scores,
    calibrate_run,
    keep_scores_through,
    layer_scores,
    load_calibration,
    main,
    read_scores,
    write_calibration,
)
from fedsoft.wireless.plan import bound_constants


@pytest.fixture
def model(tiny_dir):
    return build_model(get_spec("minilm-l6"), 4, 4, 8.0, source=tiny_dir("bert"), seed=0)


def test_layer_scores_are_singular_values_for_orthogonal_factors(model):
    torch.manual_seed(1)
    factors = []
    for name, a, b in lora.get_factors(model):
        qa, _ = torch.linalg.qr(torch.randn(a.shape[1], a.shape[0]))  # orthonormal rows of A
        qb, _ = torch.linalg.qr(torch.randn(b.shape[0], b.shape[1]))  # orthogonal columns of B
        factors.append((name, qa.T.contiguous(), qb * torch.rand(b.shape[1]) * 3))
    lora.set_factors(model, factors)
    scores = layer_scores(model)
    assert len(scores) == len(factors)
    for s, (_, a, b) in zip(scores, factors, strict=True):
        sv = torch.linalg.svdvals((b @ a).double())[: a.shape[0]]
        assert s == sorted(s, reverse=True)
        np.testing.assert_allclose(s, sv.numpy(), rtol=1e-5, atol=1e-6)


def test_calibrate_run_averages_sorted_columns_and_skips_round_zero(tmp_path):
    rng = np.random.default_rng(0)
    logged = {t: rng.random((3, 4)).tolist() for t in range(4)}
    for t, s in logged.items():
        append_scores(tmp_path, t, s)
    cal = calibrate_run(tmp_path)
    used = np.concatenate([-np.sort(-np.asarray(logged[t]), axis=1) for t in (1, 2, 3)])
    np.testing.assert_allclose(cal.sigma_bar, used.mean(axis=0))
    assert cal.sigma_max == used.max() and cal.num_rounds == 3 and cal.pilot_rank == 4
    assert np.all(np.diff(cal.sigma_bar) <= 0)
    np.testing.assert_allclose(calibrate_run(tmp_path, "max").sigma_bar, used.max(axis=0))


def test_cli_writes_a_file_that_tsfa_reads(tmp_path, capsys):
    for t in range(3):
        append_scores(tmp_path, t, [[4.0 - t, 2.0, 1.0, 0.5], [3.0, 1.0, 0.25, 0.1]])
    assert main([str(tmp_path)]) == 0
    assert "bound-calibration=" in capsys.readouterr().out
    sigma_bar, sigma_max = load_calibration(tmp_path / "calibration.json")
    cfg = {**DEFAULTS, "strategy": "tsfa", "tsfa-ranks": "1,2,4",
           "bound-calibration": str(tmp_path / "calibration.json")}
    bound = bound_constants(cfg)
    assert [bound.sigma_bar_at(r) for r in (1, 2, 3, 4)] == pytest.approx(sigma_bar.tolist())
    assert bound.sigma_max == sigma_max == 3.0
    # a candidate rank beyond the pilot's rank is refused with the keys named
    with pytest.raises(ValueError, match="tsfa-ranks"):
        bound_constants({**cfg, "tsfa-ranks": "4,8"})


@pytest.mark.parametrize("content, match", [
    ("not json", "malformed"),
    (json.dumps({"sigma_max": 1.0}), "malformed"),
    (json.dumps({"sigma_bar": [1.0, float("nan")], "sigma_max": 1.0}), "finite"),
    (json.dumps({"sigma_bar": [], "sigma_max": 1.0}), "non-empty"),
    (json.dumps({"sigma_bar": [1.0], "sigma_max": -2.0}), "sigma_max"),
])
def test_bad_calibration_files_name_the_key(tmp_path, content, match):
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="bound-calibration") as err:
        load_calibration(path)
    assert match in str(err.value)


def test_missing_inputs_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="bound-calibration"):
        load_calibration(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="rank_scores.jsonl"):
        calibrate_run(tmp_path)
    append_scores(tmp_path, 0, [[0.0, 0.0]])
    with pytest.raises(ValueError, match="no round >= 1"):
        calibrate_run(tmp_path)


def test_write_calibration_round_trips(tmp_path):
    append_scores(tmp_path, 1, [[2.0, 1.0]])
    cal = calibrate_run(tmp_path)
    sb, sm = load_calibration(write_calibration(tmp_path / "c.json", cal))
    np.testing.assert_array_equal(sb, cal.sigma_bar)
    assert sm == cal.sigma_max


def test_keep_scores_through_drops_later_rounds_and_malformed_rows(tmp_path):
    for t in range(4):
        append_scores(tmp_path, t, [[float(t + 1), 1.0]])
    with (tmp_path / "rank_scores.jsonl").open("a") as fh:
        fh.write("not json\n")
    keep_scores_through(tmp_path, 2)  # a resume after round 2
    kept = read_scores(tmp_path, first_round=0)
    assert [s[0][0] for s in kept] == [1.0, 2.0, 3.0]
    append_scores(tmp_path, 3, [[9.0, 1.0]])  # round 3 again, once
    assert [s[0][0] for s in read_scores(tmp_path, first_round=0)] == [1.0, 2.0, 3.0, 9.0]
    keep_scores_through(tmp_path, -1)  # a fresh run in the same run-dir
    assert (tmp_path / "rank_scores.jsonl").read_text() == ""
    keep_scores_through(tmp_path / "absent", -1)  # nothing to do, no error
