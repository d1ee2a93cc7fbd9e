"""Benchmark: SOFT (eqs. 8-9) vs product+SVD selection time at ViT-Base shapes, proxy quality."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# passive OpenMP waiting: on a shared, oversubscribed host spinning threads inflate SVD times 10x
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`

from fedsoft.compression.orthogonality import orth_offdiag, orth_penalty
from fedsoft.compression.sparsifiers import SPARSIFIERS, from_rows, keep_count, to_rows
from fedsoft.compression.spectrum import svd_proxy_rel_err
from fedsoft.experiments.timing import median_time  # noqa: E402

D = K = 768  # ViT-Base hidden size
N_LAYERS = 8  # 4 blocks x (q, v)
RANKS = (4, 8, 16, 32, 64)
SPARSITY = 0.5


def random_factors(r: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, K, generator=g) / K**0.5, torch.randn(D, r, generator=g) / r**0.5)
        for _ in range(N_LAYERS)
    ]


def near_orthogonal_factors(
    r: int, seed: int, noise: float = 0.02
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """QR-orthogonal factors with power-law scores s_j ~ j^-1 (shuffled), plus small noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_LAYERS):
        qb, _ = torch.linalg.qr(torch.randn(D, r, generator=g))
        qa, _ = torch.linalg.qr(torch.randn(K, r, generator=g))
        s = (1.0 / torch.arange(1, r + 1, dtype=torch.float32))[torch.randperm(r, generator=g)]
        A = (qa * s.sqrt()).T + noise * torch.randn(r, K, generator=g) / K**0.5
        B = qb * s.sqrt() + noise * torch.randn(D, r, generator=g) / D**0.5
        out.append((A.contiguous(), B.contiguous()))
    return out


def penalty_trained_factors(
    r: int, seed: int, steps: int = 300
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random factors after Adam steps on the eq. (7) penalty alone (proxy for zeta > 0)."""
    out = []
    for A0, B0 in random_factors(r, seed):
        A = A0.clone().requires_grad_(True)
        B = B0.clone().requires_grad_(True)
        opt = torch.optim.Adam([A, B], lr=1e-3)
        for _ in range(steps):
            opt.zero_grad()
            orth_penalty(A, B).backward()
            opt.step()
        out.append((A.detach(), B.detach()))
    return out


def quality(layers: list[tuple[torch.Tensor, torch.Tensor]], r: int) -> dict[str, float]:
    """Proxy-quality metrics averaged over layers (one SVD per layer)."""
    keep = keep_count(r, D, K, SPARSITY)
    res = dict.fromkeys(("proxy", "energy", "err_soft", "err_svd", "err_flasc"), 0.0)
    res["orth"] = orth_offdiag(layers)
    for A, B in layers:
        rows = to_rows(A, B)
        full = (B.double() @ A.double())
        res["proxy"] += svd_proxy_rel_err(A, B) / N_LAYERS
        kept = {name: SPARSIFIERS[name](rows, D, keep).values for name in ("soft", "svd", "flasc")}
        prods = {}
        for name, values in kept.items():
            Ah, Bh = from_rows(values, D)
            prods[name] = Bh.double() @ Ah.double()
            err = torch.linalg.matrix_norm(full - prods[name]) / torch.linalg.matrix_norm(full)
            res[f"err_{name}"] += float(err) / N_LAYERS
        energy = torch.linalg.matrix_norm(prods["soft"]) ** 2 / torch.linalg.matrix_norm(
            prods["svd"]) ** 2
        res["energy"] += float(energy) / N_LAYERS
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats-soft", type=int, default=21)
    parser.add_argument("--repeats-svd", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    soft, svd = SPARSIFIERS["soft"], SPARSIFIERS["svd"]

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# host: {os.cpu_count()} CPUs, 1-min load average {load:.2f} (timings are noisy when "
          f"the load exceeds the cores), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"# selection time, d = k = {D}, {N_LAYERS} layers, sparsity {SPARSITY}, "
          f"{torch.get_num_threads()} threads, float32, median of "
          f"{args.repeats_soft} (SOFT) / {args.repeats_svd} (SVD) repeats")
    print(f"{'r':>4} {'keep/layer':>10} {'SOFT ms':>9} {'SVD ms':>9} {'SVD/SOFT':>9}")
    for r in RANKS:
        rows = [to_rows(A, B) for A, B in random_factors(r, seed=r)]
        keep = keep_count(r, D, K, SPARSITY)
        t_soft = median_time(lambda rows=rows, keep=keep: [soft(x, D, keep) for x in rows],
                             args.repeats_soft)
        t_svd = median_time(lambda rows=rows, keep=keep: [svd(x, D, keep) for x in rows],
                            args.repeats_svd)
        print(f"{r:>4} {keep:>10} {1e3 * t_soft:>9.3f} {1e3 * t_svd:>9.1f} "
              f"{t_svd / t_soft:>8.1f}x")

    if args.skip_quality:
        return
    print()
    print(f"# proxy quality at sparsity {SPARSITY} (mean over {N_LAYERS} layers)")
    print("#  orth = orth_offdiag (eq. 7 Gram off-diagonal energy share);")
    print("#  proxy = ||sorted s_j - sigma_j|| / ||sigma|| (eq. 8);")
    print("#  energy = ||kept product||_F^2 SOFT / SVD oracle (= spectrum.kept_energy_ratio);")
    print("#  err_X = ||BA - kept product||_F / ||BA||_F (= spectrum.kept_product_rel_err)")
    header = (f"{'factors':>16} {'r':>4} {'orth':>8} {'proxy':>8} {'energy':>8} "
              f"{'err_soft':>9} {'err_svd':>8} {'err_flasc':>9}")
    print(header)
    makers = (("random", random_factors), ("near-orthogonal", near_orthogonal_factors),
              ("penalty-trained", penalty_trained_factors))
    for label, make in makers:
        for r in (4, 16, 64):
            q = quality(make(r, seed=100 + r), r)
            print(f"{label:>16} {r:>4} {q['orth']:>8.4f} {q['proxy']:>8.4f} {q['energy']:>8.3f} "
                  f"{q['err_soft']:>9.4f} {q['err_svd']:>8.4f} {q['err_flasc']:>9.4f}")


if __name__ == "__main__":
    main()
