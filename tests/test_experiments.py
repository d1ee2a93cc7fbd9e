"""Experiment runner and figures: every figure's ci scale end to end, plots from fixture JSONL."""

import json
import statistics
import subprocess
import sys

import numpy as np
import pytest

from fedsoft.experiments import plots
from fedsoft.experiments import runner as ex
from fedsoft.experiments.launch import ROOT
from fedsoft.runlog import read_metrics

CONTRACT_KEYS = {"round", "accuracy", "loss", "num_clients", "uplink_bytes", "wall_s"}
FLWR_FIGURES = ("fig3ab", "fig3c", "fig4", "fig56", "fig7", "figB")
EXTRA_KEYS = {  # per figure: keys every round >= 1 of (some of) its runs must have
    "fig3ab": set(),
    "fig3c": {"rank", "queue", "latency_s", "latency_avg_s", "sparsity", "bandwidth_shares"},
    "fig4": {"orth_offdiag", "sparsity"},
    "fig56": {"cov_fro", "sparsity"},
    "fig7": set(),
    "figB": {"participants", "q", "k", "sim_round_s", "sim_wallclock_s"},
}
RUN_INDEX_KEYS = {"run", "series", "panel", "seed", "status", "run_dir", "command"}
TIMING_KEYS = {"sweep", "method", "r", "d", "k", "layers", "keep_per_layer", "sparsity", "seed",
               "seconds", "repeats", "threads"}


# ----------------------------------------------------------------------------- designs (fast)


@pytest.mark.parametrize("scale", ex.SCALES)
@pytest.mark.parametrize("name", list(ex.EXPERIMENTS))
def test_every_run_of_every_scale_is_a_valid_run_config(name, scale):
    specs = ex.expand(name, scale, seeds=2)
    assert len({s.run_name for s in specs}) == len(specs)
    for spec in specs:
        cfg = ex.resolved(spec.overrides)  # raises on an unknown key or a bad value
        assert cfg["seed"] == spec.seed
        assert "run-dir" not in spec.overrides
        assert ex.render(spec.overrides).count("=") == len(spec.overrides)
    if ex.EXPERIMENTS[name].runs is None:
        assert specs == [] and ex.EXPERIMENTS[name].params(scale)["ranks"]


def test_scales_follow_the_brief():
    ci, gpu = ex.FEDERATION["ci"], ex.FEDERATION["gpu"]
    assert ci.supernodes == 2 and 4 <= ex.FEDERATION["cpu"].supernodes <= 10
    assert gpu.supernodes == 100
    for name in ("fig3ab", "fig3c", "fig4", "fig56", "fig7", "figB"):
        for spec in ex.expand(name, "ci"):
            cfg = ex.resolved(spec.overrides)
            assert cfg["num-server-rounds"] <= 2 and cfg["local-steps"] <= 2
            assert cfg["max-test-examples"] <= 100
        for spec in ex.expand(name, "gpu"):
            cfg = ex.resolved(spec.overrides)
            assert cfg["preset"] in ("paper-vit-cifar100", "paper-distilbert-agnews")
            assert cfg["clients-per-round"] == 10
    fig3 = {(s.series, ex.resolved(s.overrides)["sparsity"]) for s in ex.expand("fig3ab", "cpu")}
    assert {m for m, _ in fig3} == set(ex.SPARSIFIERS)
    assert {rho for m, rho in fig3 if m != "dense"} == {ex.SPARSITY}
    assert {rho for m, rho in fig3 if m == "dense"} == {0.0}
    assert len(ex.FIG3_RANKS["cpu"]) == 2
    assert ex.resolved(ex.expand("fig7", "gpu")[0].overrides)["dataset"] == "ag_news"
    sketch = {s.series: ex.resolved(s.overrides) for s in ex.expand("figB", "cpu")}
    assert sketch["uniform"]["sketch-k"] == sketch["full"]["sketch-k"] == "fixed"
    assert {c["sampling"] for c in sketch.values()} == {"optimized", "uniform", "full"}


def test_issue14_figures_expand_without_running_flower():
    # fig3c-long / figB-het are not in FLWR_FIGURES (their ci runs would add minutes: TSFA's
    # pilot, the sketch pilot); this checks their designs only
    from fedsoft.sketching.wallclock import compute_speeds

    long = ex.expand("fig3c-long", "cpu", seeds=3)
    assert sorted({s.name for s in long}) == ["osfa-r1", "osfa-r2", "osfa-r32", "osfa-r8", "tsfa"]
    assert {s.seed for s in long} == {0, 1, 2}
    cfgs = {s.run_name: ex.resolved(s.overrides) for s in long}
    for cfg in cfgs.values():
        assert cfg["num-server-rounds"] >= 30
        assert cfg["path-loss-model"] == "log-distance"
        assert cfg["tsfa-deadline"] == "budget-multiple" and cfg["latency-budget"] == 0
    assert cfgs["tsfa-s0"]["strategy"] == "tsfa" and cfgs["tsfa-s0"]["bound-calibration"] == "auto"
    assert cfgs["tsfa-s0"]["latency-budget-fraction"] == 0.5  # the default
    # one budget in seconds for every run: fraction x dense bits at the run's rank is the same
    budget_bits = {name: cfg["latency-budget-fraction"] * ex.dense_upload_bits(
        s.overrides, cfg["lora-rank"]) for s in long for name, cfg in [(s.run_name,
                                                                        cfgs[s.run_name])]}
    ref = budget_bits["tsfa-s0"]
    assert all(abs(b / ref - 1) < 1e-12 for b in budget_bits.values())
    assert {cfg["lora-rank"] for n, cfg in cfgs.items() if n.startswith("osfa")} == {1, 2, 8, 32}

    het = ex.expand("figB-het", "cpu", seeds=3)
    assert sorted({s.name for s in het}) == ["full", "optimized", "uniform"]
    n = ex.FEDERATION["cpu"].supernodes
    for spec in het:
        cfg = ex.resolved(spec.overrides)
        assert cfg["strategy"] == "sketch" and cfg["shadowing-db"] == 8.0
        c = compute_speeds(n, 0.5, cfg["compute-heterogeneity"], spec.seed)
        assert abs(c.max() / c.min() - 10.0) < 0.01  # 10x in every seed
        assert cfg["sketch-calibration"] == ("auto" if spec.name == "optimized" else "")
    assert len({ex.resolved(s.overrides)["compute-heterogeneity"] for s in het}) == 3
    for name in ("fig3c-long", "figB-het"):
        for spec in ex.expand(name, "ci"):
            cfg = ex.resolved(spec.overrides)
            assert cfg["num-server-rounds"] <= 2 and cfg["local-steps"] <= 2


def test_final_columns_take_the_last_logged_value_and_ratios():
    rows = [{"round": 0}, {"round": 1, "latency_avg_s": 2.0, "latency_budget_s": 1.0},
            {"round": 2, "latency_avg_s": 1.5, "latency_budget_s": 1.0}, {"round": 3}]
    assert plots.run_value(rows, "latency_avg_s") == 1.75
    assert plots.run_value(rows, "final:latency_avg_s") == 1.5
    assert plots.run_value(rows, "final:latency_avg_s/latency_budget_s") == 1.5
    assert plots.run_value(rows, "final:outage") is None


def test_render_quotes_strings_and_rejects_quotes():
    assert ex.render({"a": "x", "b": 2, "c": 0.5}) == 'a="x" b=2 c=0.5'
    with pytest.raises(ValueError, match="double quote"):
        ex.render({"a": 'x"y'})
    with pytest.raises(TypeError):
        ex.render({"a": True})


def test_finished_means_rounds_plus_one_rows_for_the_same_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"num-server-rounds": 2}))
    rows = [{"round": i, "accuracy": 0.1} for i in range(2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not ex.is_finished(run, 2)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"round": 2, "accuracy": 0.2}) + "\n")
    assert ex.is_finished(run, 2)
    (run / "run.json").write_text(json.dumps({"key": "a"}))
    assert ex.is_finished(run, 2, "a") and not ex.is_finished(run, 2, "b")


# ----------------------------------------------------------------------------- fixture JSONL


def _write_exp(root, name, runs):
    """runs: list of (run, series, panel, seed, metrics rows); returns the exp dir."""
    exp = root / name / "ci"
    exp.mkdir(parents=True)
    (exp / "experiment.json").write_text(json.dumps({"experiment": name, "scale": "ci",
                                                     "title": name}))
    with (exp / "runs.jsonl").open("w") as fh:
        for run, series, panel, seed, rows in runs:
            (exp / run).mkdir()
            (exp / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            fh.write(json.dumps({"run": run, "series": series, "panel": panel, "seed": seed,
                                 "status": "done", "run_dir": run, "wall_s": 10.0}) + "\n")
    return exp


def _rows(accs, up=100, **extra):
    return [{"round": i, "accuracy": a, "loss": 1.0, "uplink_bytes": 0 if i == 0 else up,
             **({k: v[i] for k, v in extra.items() if v[i] is not None})}
            for i, a in enumerate(accs)]


def test_fig3ab_series_average_seeds_and_bytes_to_target(tmp_path):
    exp = _write_exp(tmp_path, "fig3ab", [
        ("soft-r4-s0", "soft", "r = 4", 0, _rows([0.1, 0.5, 0.7], up=100)),
        ("soft-r4-s1", "soft", "r = 4", 1, _rows([0.1, 0.3, 0.9], up=100)),
        ("dense-r4-s0", "dense", "r = 4", 0, _rows([0.1, 0.6, 0.8], up=300)),
        ("soft-r8-s0", "soft", "r = 8", 0, _rows([0.1, 0.2, 0.4], up=200)),
    ])
    data = plots.figure_series(exp)
    assert data["experiment"] == "fig3ab" and data["x"] == "round"
    acc = data["panels"]["accuracy"]
    assert set(acc) == {"r = 4", "r = 8"} and set(acc["r = 4"]) == {"soft", "dense"}
    soft = acc["r = 4"]["soft"]
    assert soft["x"] == [0, 1, 2] and soft["seeds"] == 2
    assert soft["y"] == pytest.approx([0.1, 0.4, 0.8])
    assert soft["y_std"] == pytest.approx([0.0, 0.1414214, 0.1414214], rel=1e-5)
    assert acc["r = 4"]["dense"]["y_std"] == [0.0, 0.0, 0.0]

    table = {(r["panel"], r["series"]): r for r in plots.summary(exp, target_frac=0.75)}
    # target = 0.75 x dense final 0.8 = 0.6: seed 0 reaches it in round 2 (200 B), seed 1 too
    s = table[("r = 4", "soft")]
    assert s["reference"] == "dense" and s["target_acc"] == pytest.approx(0.6)
    assert s["final_acc_mean"] == pytest.approx(0.8) and s["bytes_to_target"] == 200
    assert s["rounds_to_target"] == 2 and s["reached"] == 2 and s["uplink_bytes_total"] == 200
    assert table[("r = 4", "dense")]["bytes_to_target"] == 300  # 0.6 in round 1
    # no dense run in panel r = 8: the reference is the best series (soft itself, 0.4 -> 0.3)
    r8 = table[("r = 8", "soft")]
    assert r8["reference"] == "soft" and r8["bytes_to_target"] == 400
    md = plots.markdown(exp, 0.75)
    assert "0.8000 ± 0.1414" in md and "| r = 4 | dense |" in md
    assert plots.draw(exp).stat().st_size > 0


def test_target_not_reached_and_round0_counts_as_zero_bytes():
    rows = _rows([0.5, 0.4, 0.45])
    assert plots.to_target(rows, 0.5) == {"bytes": 0, "both_bytes": 0, "round": 0, "sim_s": None}
    clocked = _rows([0.5, 0.6], sim_wallclock_s=[None, 3.0])
    assert plots.to_target(clocked, 0.5)["sim_s"] == 0.0
    assert plots.to_target(clocked, 0.55)["sim_s"] == 3.0
    assert plots.to_target(rows, 0.6) is None


def test_fig56_and_figb_series_use_their_keys(tmp_path):
    exp = _write_exp(tmp_path, "fig56", [
        ("shards1-s0", "1 shard/client", "", 0,
         _rows([0.1, 0.2, 0.3], cov_fro=[None, 0.5, 0.7])),
        ("shards2-s0", "2 shards/client", "", 0,
         _rows([0.1, 0.3, 0.5], cov_fro=[None, 0.2, 0.1])),
    ])
    data = plots.figure_series(exp)
    cov = data["panels"]["cov_fro"][""]
    assert cov["1 shard/client"]["x"] == [1, 2] and cov["1 shard/client"]["y"] == [0.5, 0.7]
    assert data["panels"]["accuracy"][""]["2 shards/client"]["y"] == [0.1, 0.3, 0.5]
    assert plots.draw(exp).stat().st_size > 0

    exp = _write_exp(tmp_path, "figB", [
        ("optimized-s0", "optimized", "", 0,
         _rows([0.1, 0.4, 0.6], sim_wallclock_s=[None, 2.0, 5.0])),
        ("optimized-s1", "optimized", "", 1,
         _rows([0.1, 0.2, 0.6], sim_wallclock_s=[None, 4.0, 7.0])),
        ("full-s0", "full", "", 0, _rows([0.1, 0.5, 0.6], sim_wallclock_s=[None, 9.0, 18.0])),
    ])
    data = plots.figure_series(exp)
    assert data["x"] == "sim_wallclock_s"
    opt = data["panels"]["accuracy"][""]["optimized"]
    assert opt["x"] == [0.0, 3.0, 6.0] and opt["y"] == pytest.approx([0.1, 0.3, 0.6])
    table = {r["series"]: r for r in plots.summary(exp, target_frac=0.5)}  # target 0.3
    assert table["optimized"]["sim_s_to_target"] == pytest.approx(4.5)  # 2.0 and 7.0
    assert table["full"]["sim_s_to_target"] == pytest.approx(9.0)
    assert "sim. s to target" in plots.markdown(exp, 0.5)


def test_fig2_timing_series_and_fig4_gram_series(tmp_path):
    exp = tmp_path / "fig2" / "ci"
    exp.mkdir(parents=True)
    rows = []
    for seed, scale in ((0, 1.0), (1, 3.0)):
        for sweep, r, d in (("rank", 2, 64), ("rank", 4, 64), ("size", 4, 32)):
            for method, sec in (("soft", 1e-4), ("svd", 1e-2)):
                rows.append({"sweep": sweep, "method": method, "r": r, "d": d, "k": d,
                             "seed": seed, "seconds": sec * scale})
    (exp / "timings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = plots.figure_series(exp)["timings"]
    assert t["rank"]["svd"]["x"] == [2, 4] and t["rank"]["svd"]["fixed"] == 64
    assert t["rank"]["svd"]["y"] == pytest.approx([2e-2, 2e-2])
    assert t["size"]["soft"]["x"] == [32] and t["size"]["soft"]["fixed"] == 4
    assert t["size"]["soft"]["seeds"] == 2
    assert "| rank | 2 | 64 |" in plots.timing_markdown(exp)
    assert plots.draw(exp).stat().st_size > 0

    exp = _write_exp(tmp_path, "fig4", [
        ("zeta0-s0", "zeta = 0", "", 0, _rows([0.1, 0.2])),
        ("zeta1-s0", "zeta = 1", "", 0, _rows([0.1, 0.2])),
    ])
    gram = [{"layer": "l0", "r": 2, "AAt": [[4.0, 1.0], [1.0, 1.0]], "BtB": [[1.0, 0.0],
             [0.0, 0.0]], "orth_offdiag": 0.2},
            {"layer": "l1", "r": 2, "AAt": [[1.0, 0.0], [0.0, 1.0]], "BtB": [[1.0, 0.5],
             [0.5, 1.0]], "orth_offdiag": 0.1}]
    (exp / "zeta0-s0" / "gram.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gram))
    data = plots.figure_series(exp)
    g = data["gram"]["zeta = 0"]
    assert set(data["gram"]) == {"zeta = 0"}  # no gram.jsonl for zeta = 1
    # |G_ij| / sqrt(G_ii G_jj) averaged over the 2 layers; a zero diagonal entry gives 0
    np.testing.assert_allclose(g["AAt"], [[1.0, 0.25], [0.25, 1.0]])  # (0.5 + 0) / 2
    np.testing.assert_allclose(g["BtB"], [[1.0, 0.25], [0.25, 0.5]])
    assert g["orth_offdiag"] == pytest.approx(0.15) and g["layers"] == 2
    assert plots.draw(exp).stat().st_size > 0


def test_plots_cli_redraws_from_jsonl(tmp_path):
    exp = _write_exp(tmp_path, "fig7", [("soft-s0", "soft", "r = 4", 0, _rows([0.1, 0.2])),
                                       ("dense-s0", "dense", "r = 4", 0, _rows([0.1, 0.3]))])
    proc = subprocess.run([sys.executable, "-m", "fedsoft.experiments.plots", str(exp),
                           "--markdown"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (exp / "fig7.png").stat().st_size > 0
    assert "| r = 4 | soft |" in proc.stdout


def test_summary_extra_columns_average_rounds_then_seeds(tmp_path):
    exp = _write_exp(tmp_path, "fig56", [
        ("shards1-s0", "1 shard/client", "", 0, _rows([0.1, 0.2, 0.3], cov_fro=[None, 0.2, 0.4])),
        ("shards1-s1", "1 shard/client", "", 1, _rows([0.1, 0.2, 0.3], cov_fro=[None, 0.4, 0.6])),
    ])
    (row,) = plots.summary(exp)
    mean, std = row["extra"]["cov_fro"]
    per_run = [(0.2 + 0.4) / 2, (0.4 + 0.6) / 2]  # round 0 has no cov_fro
    assert mean == pytest.approx(statistics.fmean(per_run))
    assert std == pytest.approx(statistics.stdev(per_run))
    assert "| mean cov_fro |" in plots.markdown(exp) and "0.4 ± 0.14" in plots.markdown(exp)


def test_summary_pairs_each_seed_with_the_reference_of_the_same_seed(tmp_path):
    soft, dense = {0: 0.5, 1: 0.3}, {0: 0.45, 1: 0.32}
    exp = _write_exp(tmp_path, "fig3ab", [
        *[(f"soft-s{k}", "soft", "r = 4", k, _rows([0.1, v])) for k, v in soft.items()],
        *[(f"dense-s{k}", "dense", "r = 4", k, _rows([0.1, v])) for k, v in dense.items()]])
    rows = {r["series"]: r for r in plots.summary(exp)}
    diffs = [soft[k] - dense[k] for k in soft]
    assert rows["soft"]["delta_vs_ref"] == pytest.approx(
        (statistics.fmean(diffs), statistics.stdev(diffs)))
    assert rows["dense"]["delta_vs_ref"] is None and rows["soft"]["paired_seeds"] == 2
    assert "final acc - ref, paired by seed" in plots.markdown(exp)


def test_labels_sort_by_the_numbers_in_them():
    labels = ["r = 16", "OSFA r=32", "r = 4", "OSFA r=2", "TSFA", "2 shards/client",
              "10 shards/client"]
    assert sorted(labels, key=plots.natural_key) == [
        "2 shards/client", "10 shards/client", "OSFA r=2", "OSFA r=32", "TSFA", "r = 4",
        "r = 16"]


def test_export_copies_what_the_figure_is_drawn_from(tmp_path):
    exp = _write_exp(tmp_path / "src", "fig3ab", [
        ("soft-r4-s0", "soft", "r = 4", 0, _rows([0.1, 0.5, 0.7])),
        ("dense-r4-s0", "dense", "r = 4", 0, _rows([0.1, 0.6, 0.8], up=200))])
    (exp / "soft-r4-s0" / "adapter").mkdir()  # heavy run outputs are not exported
    (exp / "soft-r4-s0" / "flwr.log").write_text("log")
    assert plots.main([str(exp), "--export", str(tmp_path / "pub")]) == 0
    out = tmp_path / "pub" / "fig3ab" / "ci"
    assert (out / "fig3ab.png").stat().st_size > 0
    assert plots.figure_series(out) == plots.figure_series(exp)
    assert plots.summary(out) == plots.summary(exp)
    assert sorted(p.name for p in (out / "soft-r4-s0").iterdir()) == ["metrics.jsonl"]
    with pytest.raises(FileNotFoundError, match="runs.jsonl"):
        plots.export(tmp_path / "nothing", tmp_path / "x")


# ----------------------------------------------------------------------------- ci end to end


@pytest.fixture(scope="module")
def ci_root(tmp_path_factory):
    """fig2 and FLWR_FIGURES at ci scale through the CLI, once for the module (shared runs
    copied). Not "all": fig3c-long and figB-het would add 4 ci runs with pilots (128 s
    measured); test_issue14_figures_expand_without_running_flower checks their designs."""
    root = tmp_path_factory.mktemp("experiments")
    proc = subprocess.run(
        [sys.executable, "-m", "fedsoft.experiments", "fig2", *FLWR_FIGURES, "--scale", "ci",
         "--out-root", str(root)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    return root, proc.stdout


@pytest.mark.slow
def test_ci_fig2_writes_timings_and_a_figure(ci_root):
    root, _ = ci_root
    exp = root / "fig2" / "ci"
    rows = read_metrics(exp / "timings.jsonl")
    params = ex.FIG2["ci"]
    assert len(rows) == 2 * (len(params["ranks"]) + len(params["sizes"]))
    assert all(TIMING_KEYS <= set(r) and r["seconds"] > 0 for r in rows)
    assert {r["method"] for r in rows} == {"soft", "svd"}
    assert (exp / "fig2.png").stat().st_size > 0
    meta = json.loads((exp / "experiment.json").read_text())
    assert meta["params"]["ranks"] == params["ranks"] and meta["invocations"][-1]["wall_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", FLWR_FIGURES)
def test_ci_figure_end_to_end(ci_root, name):
    root, stdout = ci_root
    exp = root / name / "ci"
    assert (exp / f"{name}.png").stat().st_size > 0
    index = read_metrics(exp / "runs.jsonl")
    specs = ex.expand(name, "ci")
    assert [r["run"] for r in index] == [s.run_name for s in specs]
    for row in index:
        assert RUN_INDEX_KEYS <= set(row) and row["status"] == "done"
        assert row["command"].startswith("flwr run . --run-config ")
        run_dir = exp / row["run_dir"]
        cfg = json.loads((run_dir / "config.json").read_text())
        metrics = read_metrics(run_dir / "metrics.jsonl")
        assert [m["round"] for m in metrics] == list(range(cfg["num-server-rounds"] + 1))
        assert all(CONTRACT_KEYS <= set(m) for m in metrics)
        assert all(m["uplink_bytes"] > 0 for m in metrics[1:] if m["num_clients"] > 0)
        assert all(EXTRA_KEYS[name] <= set(m) for m in metrics[1:]), (row["run"], metrics[1])
        assert f"[exp {name}/ci]" in stdout
    data = plots.figure_series(exp)
    acc = data["panels"]["accuracy"]
    assert {s for panel in acc.values() for s in panel} == {s.series for s in specs}
    if name == "fig4":
        assert set(data["gram"]) == {s.series for s in specs}
        for g in data["gram"].values():
            assert len(g["AAt"]) == len(g["BtB"]) == ex.FIG4_RANK["ci"]
    if name == "fig56":
        cov = data["panels"]["cov_fro"][""]
        assert all(len(c["y"]) == 2 and all(v > 0 for v in c["y"]) for c in cov.values())
    assert plots.summary(exp)


@pytest.mark.slow
def test_ci_runs_are_shared_resumed_and_redrawn_without_flower(ci_root, monkeypatch, capsys):
    root, stdout = ci_root
    fig4 = json.loads((root / "fig4" / "ci" / "zeta0-s0" / "run.json").read_text())
    assert fig4["reused_from"] == "fig3ab/ci/soft-r4-s0"
    fig56 = json.loads((root / "fig56" / "ci" / "shards2-s0" / "run.json").read_text())
    assert fig56["reused_from"] == "fig3ab/ci/soft-r4-s0"
    launched = sum(len(ex.expand(n, "ci")) for n in FLWR_FIGURES) - 2  # 2 runs copied
    assert stdout.count(": done in ") == launched

    def no_flower(*args, **kwargs):
        raise AssertionError("a finished run was launched again")

    monkeypatch.setattr(ex, "launch_run", no_flower)
    for name in FLWR_FIGURES:
        png = root / name / "ci" / f"{name}.png"
        png.unlink()
        ex.run_experiment(name, "ci", out_root=root)
        assert png.stat().st_size > 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == sum(len(ex.expand(n, "ci"))
                                                         for n in FLWR_FIGURES)
    meta = json.loads((root / "fig3ab" / "ci" / "experiment.json").read_text())
    first, again = meta["invocations"]
    assert first["runs"] == {"launched": 2} and again["runs"] == {"skipped": 2}
    assert json.loads((root / "fig4" / "ci" / "experiment.json").read_text())[
        "invocations"][0]["runs"] == {"copied": 1, "launched": 1}
    png = root / "fig3ab" / "ci" / "fig3ab.png"
    png.unlink()
    assert ex.main(["fig3ab", "--scale", "ci", "--out-root", str(root), "--plot-only"]) == 0
    assert png.stat().st_size > 0
    # --only that selects none of the seed-1 runs: nothing launched, seed 0 stays in the index
    capsys.readouterr()
    ex.run_experiment("fig3ab", "ci", seeds=2, out_root=root, only=["*-s9"])
    index = read_metrics(root / "fig3ab" / "ci" / "runs.jsonl")
    assert [r["run"] for r in index] == [s.run_name for s in ex.expand("fig3ab", "ci")]
    assert capsys.readouterr().out.count("not selected by --only, not run") == len(index)


def test_list_with_only_prints_just_the_matching_runs(capsys):
    assert ex.main(["fig3ab", "fig2", "--scale", "cpu", "--only", "*-r4-s0", "--list"]) == 0
    out = capsys.readouterr().out
    wanted = [s.run_name for s in ex.expand("fig3ab", "cpu") if s.run_name.endswith("-r4-s0")]
    assert [ln.split(":")[0].strip() for ln in out.splitlines() if "flwr run" in ln] == wanted
    assert "timing benchmark" in out
    assert ex.main(["fig3ab", "--scale", "cpu", "--only", "nomatch", "--list"]) == 0
    assert "no run matches --only nomatch" in capsys.readouterr().out


def test_only_patterns_select_by_run_name():
    specs = ex.expand("fig3ab", "cpu", 2)
    assert [s.run_name for s in specs if ex.selected(s, ["*-r4-*"])] == [
        s.run_name for s in specs if ex.resolved(s.overrides)["lora-rank"] == 4]
    assert all(ex.selected(s, []) for s in specs)
    assert [s.run_name for s in specs if ex.selected(s, ["soft-*", "dense-r16-s1"])] == [
        "soft-r4-s0", "soft-r4-s1", "soft-r16-s0", "soft-r16-s1", "dense-r16-s1"]


def test_launch_without_the_flwr_cli_names_the_missing_path(tmp_path, monkeypatch):
    from fedsoft.experiments import launch
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(FileNotFoundError, match="flwr CLI not found"):
        launch.flwr_run(tmp_path / "home", 'seed=0', timeout=5)


def test_wire_figures_plot_accuracy_against_bytes_in_both_directions(tmp_path):
    """wire-*: a second panel against cumulative uplink + downlink MB; the summary counts
    both directions to the target."""
    down = [0, 1_000_000, 200_000, 200_000]
    exp = _write_exp(tmp_path, "wire-90", [
        ("soft-s0", "soft", "rho = 0.9", 0,
         _rows([0.1, 0.5, 0.6, 0.7], up=50_000, downlink_bytes=down)),
        ("dense-s0", "dense", "rho = 0.9", 0,
         _rows([0.1, 0.4, 0.6, 0.7], up=400_000, downlink_bytes=[0, 10**6, 10**6, 10**6])),
    ])
    data = plots.figure_series(exp)
    assert set(data["panels"]) == {"accuracy", "accuracy@cum_mb"}
    soft = data["panels"]["accuracy@cum_mb"]["rho = 0.9"]["soft"]
    expected = [0.0]
    for u, d in zip([50_000] * 3, down[1:], strict=True):
        expected.append(expected[-1] + (u + d) / 1e6)
    assert soft["x"] == pytest.approx(expected) and soft["y"] == [0.1, 0.5, 0.6, 0.7]
    rows = {r["series"]: r for r in plots.summary(exp, target_frac=6 / 7)}  # target 0.6
    assert rows["soft"]["rounds_to_target"] == 2
    assert rows["soft"]["both_bytes_to_target"] == 2 * 50_000 + 1_200_000
    assert rows["soft"]["bytes_to_target"] == 2 * 50_000
    assert rows["dense"]["total_bytes"] == 3 * 400_000 + 3 * 10**6
    assert "up + down MB to target" in plots.markdown(exp)
    assert plots.draw(exp).stat().st_size > 0
