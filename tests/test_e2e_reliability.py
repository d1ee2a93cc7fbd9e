"""End to end through `flwr run`: determinism, checkpoint/resume, client failures."""

import pytest

from fedsoft.experiments.launch import flwr_run
from fedsoft.runlog import read_metrics
from fedsoft.wireless.calibration import SCORES_FILE

BASE = ('preset="ci" local-steps=2 max-test-examples=100 sparsifier="soft" sparsity=0.5 '
        'zeta=0.01')
SAME = ("accuracy", "loss", "num_clients", "uplink_bytes")


def _run(tmp_path, name, extra, supernodes=3):
    proc = flwr_run(tmp_path / f"home-{name}", f"{BASE} {extra}", num_supernodes=supernodes)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _same(a: dict, b: dict) -> None:
    for key in SAME:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (key, a, b)


@pytest.mark.slow
def test_same_seed_same_metrics_and_resume_equals_uninterrupted(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _run(tmp_path, "full", f'num-server-rounds=4 checkpoint-every=2 run-dir="{full}" '
                           f'client-state-dir="{tmp_path / "cs-full"}"')
    # the same run stopped after round 2 (its last round is checkpointed) ...
    _run(tmp_path, "part", f'num-server-rounds=2 checkpoint-every=2 run-dir="{part}" '
                           f'client-state-dir="{tmp_path / "cs-part"}"')
    ref = read_metrics(full / "metrics.jsonl")
    first = read_metrics(part / "metrics.jsonl")
    assert [r["round"] for r in ref] == [0, 1, 2, 3, 4] and len(first) == 3
    for a, b in zip(first, ref[:3], strict=True):  # same seed, separate processes: same metrics
        _same(a, b)
    # a resume that changes the model's config is refused and leaves the run as it was
    kept = {f: (part / f).read_bytes() for f in ("metrics.jsonl", "config.json")}
    proc = flwr_run(tmp_path / "home-refused",
                    f'{BASE} num-server-rounds=4 checkpoint-every=2 lr=0.05 '
                    f'resume-from="{part / "checkpoints"}"', num_supernodes=3)
    assert "run config differs from the checkpoint" in proc.stdout + proc.stderr
    assert {f: (part / f).read_bytes() for f in kept} == kept
    # ... then resumed: server state from the checkpoint, error memory from the clients' files
    proc = _run(tmp_path, "resume",
                f'num-server-rounds=4 checkpoint-every=2 client-state-dir="{tmp_path / "cs-part"}" '
                f'resume-from="{part / "checkpoints"}"')
    assert "resumed from" in proc.stdout
    resumed = read_metrics(part / "metrics.jsonl")
    assert [r["round"] for r in resumed] == [0, 1, 2, 3, 4]
    # the calibration log holds each round once, as in the uninterrupted run
    assert [r["round"] for r in read_metrics(part / SCORES_FILE)] == [0, 1, 2, 3, 4]
    for a, b in zip(resumed, ref, strict=True):
        _same(a, b)
    assert (part / "checkpoints" / "round-00004" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_thirty_percent_client_failures_the_run_still_finishes(tmp_path):
    run_dir = tmp_path / "run"
    _run(tmp_path, "fail", f'num-server-rounds=3 clients-per-round=4 fail-fraction=0.3 '
                           f'run-dir="{run_dir}"', supernodes=4)
    first, *rows = read_metrics(run_dir / "metrics.jsonl")
    assert len(rows) == 3
    failed = sum(r["dropped"] for r in rows)
    assert failed > 0, "the knob made no client fail"
    for r in rows:
        assert r["num_clients"] + r["dropped"] == 4  # every sampled client: a reply or a failure
    assert max(r["accuracy"] for r in rows) > first["accuracy"]  # learning went on
