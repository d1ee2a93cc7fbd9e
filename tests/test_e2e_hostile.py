"""End to end through `flwr run`: one ClientApp sends a hostile reply every round, cycling through
every attack class; the run completes, each hostile reply is dropped with its reason, and the
final model equals, bit for bit, the run in which that client only ever fails."""

import numpy as np
import pytest

from fedsoft.attacks import CLASSES
from fedsoft.experiments.launch import flwr_run
from fedsoft.runlog import read_metrics

ROUNDS = len(CLASSES)
BASE = (f'preset="ci" num-server-rounds={ROUNDS} clients-per-round=3 local-steps=2 '
        f'max-train-examples=480 max-test-examples=100 sparsifier="soft" sparsity=0.5 '
        f'zeta=0.01 attack-partition=1 checkpoint-every={ROUNDS}')
# what the drop reason of each class names (from the server's checks, in cycle order)
REASON = {
    "empty-data": "malformed npy header",
    "huge-header": "header declares",
    "float64": "dtype",
    "huge-values": "update norm",
    "garbage": "update norm",
    "num-examples": "num-examples",
    "stale-round": "answers round",
    "bad-metric": "train-loss",
    "nan": "non-finite",
}


def _run(tmp_path, name: str, mode: str):
    run_dir = tmp_path / name
    proc = flwr_run(tmp_path / f"home-{name}",
                    f'{BASE} attack-mode="{mode}" run-dir="{run_dir}" '
                    f'client-state-dir="{tmp_path / ("cs-" + name)}"', num_supernodes=3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    # flwr run exits 0 even when the ServerApp raised: the run's own outputs must be complete
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1)), proc.stdout[-3000:]
    with np.load(run_dir / "checkpoints" / f"round-{ROUNDS:05d}" / "arrays.npz") as data:
        final = {k: data[k] for k in data.files}
    return rows, final, proc


@pytest.mark.slow
def test_hostile_client_every_round_changes_nothing(tmp_path):
    hostile, final_h, proc = _run(tmp_path, "hostile", "cycle")
    honest, final_ref, _ = _run(tmp_path, "honest", "crash")
    for kind, row in zip(CLASSES, hostile[1:], strict=True):
        assert row["num_clients"] == 2 and row["dropped"] == 1 and not row.get("skipped"), row
        (reason,) = row["dropped_reasons"]
        assert REASON[kind] in reason, (kind, reason)
    for row in honest[1:]:
        assert row["num_clients"] == 2 and row["dropped"] == 1
        assert "attack-mode = 'crash'" in row["dropped_reasons"][0]
    assert set(final_h) == set(final_ref)
    for key in final_ref:
        assert final_h[key].dtype == final_ref[key].dtype
        assert np.array_equal(final_h[key], final_ref[key]), key  # bit for bit
    assert [r["accuracy"] for r in hostile] == [r["accuracy"] for r in honest]
    assert hostile[-1]["loss"] < hostile[0]["loss"]  # the honest clients' learning went on
    assert f"done: {ROUNDS}/{ROUNDS} rounds" in proc.stdout
