"""A seeded cpu-scale run reproduces the metrics exported to docs/data/ (behaviour unchanged).

Reruns the first rounds of one exported configuration (fig. 3(a) at r = 4: SOFT at rho = 0.5,
Yahoo, Dirichlet(0.5), 6 SuperNodes, K = 3) through ``flwr run`` and compares row by row:
accuracy, client counts and the dense byte count exactly, losses to float noise. Uplink bytes
may only shrink: position coding is lossless, and since the wire format of issue 16 a layer's
positions take the smallest of index, bitmap and Rice code, so the same selection costs at most
what it cost when the data was exported.
"""

from __future__ import annotations

import json
import shlex
import tomllib

import pytest

from fedsoft.experiments.catalogue import render
from fedsoft.experiments.launch import ROOT, flwr_run
from fedsoft.runlog import read_metrics

EXPORTED = ROOT / "docs" / "data" / "fig3ab" / "cpu"
RUN = "soft-r4-s0"
ROUNDS = 3  # of the exported 8: rounds are seeded by their number, so a prefix reproduces
EXACT = ("round", "accuracy", "num_clients", "dense_uplink_bytes", "sparsity", "dropped")
CLOSE = ("loss", "train_loss")


def _exported_command(run: str) -> tuple[dict, dict]:
    """(run config, federation config) of ``run`` as the runner launched it (runs.jsonl)."""
    for line in (EXPORTED / "runs.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["run"] == run:
            argv = shlex.split(entry["command"])
            pairs = [argv[argv.index(flag) + 1] for flag in ("--run-config",
                                                             "--federation-config")]
            run_cfg, fed = ({k: tomllib.loads(f"v = {v}")["v"]
                             for k, v in (item.split("=", 1) for item in p.split())}
                            for p in pairs)
            return run_cfg, fed
    raise AssertionError(f"{run} not in {EXPORTED / 'runs.jsonl'}")


@pytest.mark.slow
def test_seeded_rerun_reproduces_the_exported_metrics_row_by_row(tmp_path):
    run_cfg, fed = _exported_command(RUN)
    expected = read_metrics(EXPORTED / RUN / "metrics.jsonl")[: ROUNDS + 1]
    run_dir = tmp_path / "run"
    proc = flwr_run(tmp_path / "home",
                    render({**run_cfg, "num-server-rounds": ROUNDS, "run-dir": str(run_dir)}),
                    num_supernodes=int(fed["num-supernodes"]),
                    cpus_per_client=int(fed["client-resources-num-cpus"]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = read_metrics(run_dir / "metrics.jsonl")
    assert len(got) == len(expected) == ROUNDS + 1
    for new, old in zip(got, expected, strict=True):
        for key in EXACT:
            assert new.get(key) == old.get(key), (old["round"], key, new.get(key), old.get(key))
        assert new["uplink_bytes"] <= old["uplink_bytes"], (old["round"], new["uplink_bytes"])
        assert new["uplink_bytes"] >= 0.9 * old["uplink_bytes"]  # the same values were sent
        for key in CLOSE:
            if key in old:
                assert new[key] == pytest.approx(old[key], rel=1e-4), (old["round"], key)
    # learning happened in the exported run and in the rerun alike
    assert got[-1]["loss"] < got[0]["loss"]
