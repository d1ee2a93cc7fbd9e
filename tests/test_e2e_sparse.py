"""End to end through `flwr run`: every sparsifier and TSFA on the ci preset."""

import json

import pytest

from fedsoft import lora
from fedsoft.config import resolve
from fedsoft.experiments.launch import ROOT, flwr_run
from fedsoft.runlog import read_metrics
from fedsoft.task import workload

SPARSE_KEYS = {"dense_uplink_bytes", "sparsity", "orth_offdiag", "cov_fro", "svd_proxy_rel_err"}
TSFA_KEYS = {"rank", "queue", "latency_s", "latency_avg_s", "bandwidth_shares"}
SMALL = 'preset="ci" num-server-rounds=1 local-steps=2 max-test-examples=100'


@pytest.mark.slow
@pytest.mark.parametrize("name", ["soft", "flasc", "rlora", "hetlora", "fedlodrop"])
def test_sparsifier_round_sends_about_one_minus_rho_of_dense(tmp_path, name):
    rho = 0.5
    run_dir = tmp_path / "run"
    proc = flwr_run(tmp_path / "home",
                    f'{SMALL} sparsifier="{name}" sparsity={rho} zeta=0.01 run-dir="{run_dir}"')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    last = rows[-1]
    assert SPARSE_KEYS <= set(last) and last["num_clients"] == 2 and last["dropped"] == 0
    ratio = last["uplink_bytes"] / last["dense_uplink_bytes"]
    # lower bound: the payload holds at least the fp32 values, (1 - rho) F of the F LoRA entries
    # plus the H head entries (sent densely); upper bound adds the positions, at most a bitmap of
    # F bits (0 when regenerated from the seed), and 1 % for counts and framing. Both are taken
    # relative to the measured dense record (values + Flower's per-array framing).
    cfg = resolve(json.loads((run_dir / "config.json").read_text()), ROOT / "conf")
    model = workload.build_workload(cfg).model
    f = sum(s.r * (s.d + s.k) for s in lora.factor_shapes(model))
    h = sum(v.size for k, v in lora.to_arrays(model).items() if k.startswith(lora.HEAD_PREFIX))
    dense_per_client = last["dense_uplink_bytes"] / last["num_clients"]
    values = 4 * ((1 - rho) * f + h) / dense_per_client
    positions = 0 if name in ("rlora", "fedlodrop") else f / 8 / dense_per_client
    assert values < ratio < values + positions + 0.01, (ratio, values, positions)


@pytest.mark.slow
def test_tsfa_run_logs_queue_and_keeps_the_latency_budget(tmp_path):
    run_dir = tmp_path / "run"
    proc = flwr_run(
        tmp_path / "home",
        f'preset="ci" num-server-rounds=3 local-steps=3 strategy="tsfa" sparsifier="soft" '
        f'latency-budget-fraction=0.3 lyapunov-v=0.001 run-dir="{run_dir}"',
        num_supernodes=3,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TSFA offline stage" in proc.stdout
    snr = json.loads((run_dir / "channel.json").read_text())
    assert (f"SNR (dB): min {snr['snr_db_min']:.1f} median {snr['snr_db_median']:.1f} max "
            f"{snr['snr_db_max']:.1f}") in proc.stdout
    rows = read_metrics(run_dir / "metrics.jsonl")[1:]
    offline = json.loads((run_dir / "offline.json").read_text())
    chosen = [r for r in offline if r["chosen"]]
    assert len(chosen) == 1 and all(r["rank"] == chosen[0]["rank"] for r in rows)
    assert json.loads((run_dir / "config.json").read_text())["lora-rank"] == chosen[0]["rank"]
    budget = rows[0]["latency_budget_s"]
    for r in rows:
        assert TSFA_KEYS <= set(r) and abs(sum(r["bandwidth_shares"]) - 1) < 1e-9
        assert 0 <= r["sparsity"] < 1 and r["queue"] >= 0
    # eq. (30) summed over rounds: sum_t T_t <= T * T_bar + Q_T, i.e. the running average
    # latency exceeds the budget by at most the backlog per round
    t = len(rows)
    assert rows[-1]["latency_avg_s"] <= budget + rows[-1]["queue"] / t + 1e-12
    # the round-1 ratio is the offline rho*(r*), which meets the budget on the mean channel
    assert rows[0]["sparsity"] == pytest.approx(chosen[0]["rho_star"])
