"""LoRA sketching (paper B, B.1-B.2): train and send k_n of the r rank components per layer.

Each round a client draws, per adapted layer, a uniformly random set of ``k`` of the ``r`` rank
indices from a seed both sides know (so the indices cost 0 bits on the wire). The sketch
S = diag(r/k on the chosen indices, 0 elsewhere) has E[S] = I, so the sketched product B S A is
unbiased (B.2). Training runs on B S A: B's chosen columns are scaled by r/k and the others
zeroed, and gradients outside the chosen columns of B / rows of A are masked; afterwards the
chosen columns are divided by r/k again. The client uploads only the deltas of the chosen
columns of B (d x k) and rows of A (k x k_in), i.e. k (d + k_in) values per layer, plus the
dense head delta.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch

from fedsoft import lora
from fedsoft.layout import layer_seed, layer_specs

__all__ = [
    "SketchError",
    "expand_reply",
    "sketch_indices",
    "sketch_reply",
    "sketched_training",
]


class SketchError(ValueError):
    """A sketched reply that does not match what the server asked for."""


def sketch_indices(rank: int, k: int, seed: int) -> np.ndarray:
    """Sorted ``k`` distinct indices in [0, rank), a pure function of the arguments (B.2)."""
    if not 1 <= k <= rank:
        raise ValueError(f"sketch size k = {k}: must be in [1, rank = {rank}]")
    gen = torch.Generator().manual_seed(int(seed))
    return np.sort(torch.randperm(rank, generator=gen)[:k].numpy()).astype(np.int64)


def layer_indices(arrays: Mapping[str, np.ndarray], k: int, seed: int, server_round: int,
                  node_id: int) -> dict[str, np.ndarray]:
    """Per adapted layer (by name), the sketch indices of ``node_id`` in ``server_round``."""
    return {
        spec.name: sketch_indices(spec.r, min(k, spec.r),
                                  layer_seed(seed, server_round, node_id, i))
        for i, spec in enumerate(layer_specs(arrays))
    }


@contextmanager
def sketched_training(model: torch.nn.Module,
                      indices: Mapping[str, np.ndarray]) -> Iterator[None]:
    """Within the block the model computes W0 + B S A (B.2) and only the sketched parts learn.

    On exit, B's chosen columns are divided by r/k again; parts outside the sketch are restored
    to their values on entry (weight decay cannot move them).
    """
    saved, hooks, scales = {}, [], {}
    for name, m in lora.lora_modules(model):
        if name not in indices:
            raise SketchError(f"no sketch indices for layer {name!r}")
        a = m.lora_A[lora.ADAPTER].weight
        b = m.lora_B[lora.ADAPTER].weight
        r = a.shape[0]
        idx = torch.as_tensor(indices[name], dtype=torch.long, device=a.device)
        mask = torch.zeros(r, dtype=torch.bool, device=a.device)
        mask[idx] = True
        scale = r / int(mask.sum())
        saved[name] = (a.detach().clone(), b.detach().clone(), mask)
        scales[name] = scale
        with torch.no_grad():
            b.mul_(mask.to(b.dtype) * scale)  # B <- B S
        hooks.append(a.register_hook(lambda g, m_=mask: g * m_.unsqueeze(1).to(g.dtype)))
        hooks.append(b.register_hook(lambda g, m_=mask: g * m_.unsqueeze(0).to(g.dtype)))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for name, m in lora.lora_modules(model):
                a0, b0, mask = saved[name]
                a = m.lora_A[lora.ADAPTER].weight
                b = m.lora_B[lora.ADAPTER].weight
                b.copy_(torch.where(mask.unsqueeze(0), b / scales[name], b0.to(b.device)))
                a.copy_(torch.where(mask.unsqueeze(1), a, a0.to(a.device)))


def sketch_reply(global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray],
                 indices: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Deltas to send: chosen rows of A (k x k_in), chosen columns of B (d x k), dense head."""
    out: dict[str, np.ndarray] = {}
    for spec in layer_specs(global_arrays):
        idx = indices[spec.name]
        ka, kb = spec.name + ".lora_A", spec.name + ".lora_B"
        out[ka] = np.ascontiguousarray(local_arrays[ka][idx] - global_arrays[ka][idx],
                                       dtype=np.float32)
        out[kb] = np.ascontiguousarray(local_arrays[kb][:, idx] - global_arrays[kb][:, idx],
                                       dtype=np.float32)
    for key, value in global_arrays.items():
        if key.startswith(lora.HEAD_PREFIX):
            out[key] = np.asarray(local_arrays[key] - value, dtype=np.float32)
    return out


def expand_reply(global_arrays: Mapping[str, np.ndarray], reply: Mapping[str, np.ndarray],
                 indices: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Full-shape delta (zeros outside the sketch) from a validated sketched reply.

    Raises :class:`SketchError` naming the array for a wrong key set, shape, dtype or a
    non-finite value; nothing is written to ``global_arrays``.
    """
    expected = set(global_arrays)
    if set(reply) != expected:
        missing, extra = sorted(expected - set(reply)), sorted(set(reply) - expected)
        raise SketchError(f"sketched reply keys differ: missing {missing[:3]}, extra {extra[:3]}")
    delta: dict[str, np.ndarray] = {}
    for spec in layer_specs(global_arrays):
        idx = indices[spec.name]
        ka, kb = spec.name + ".lora_A", spec.name + ".lora_B"
        want = {ka: (len(idx), spec.k), kb: (spec.d, len(idx))}
        for key, shape in want.items():
            _check(key, reply[key], shape)
        da = np.zeros_like(global_arrays[ka], dtype=np.float32)
        db = np.zeros_like(global_arrays[kb], dtype=np.float32)
        da[idx] = reply[ka]
        db[:, idx] = reply[kb]
        delta[ka], delta[kb] = da, db
    for key, value in global_arrays.items():
        if key.startswith(lora.HEAD_PREFIX):
            _check(key, reply[key], value.shape)
            delta[key] = np.asarray(reply[key], dtype=np.float32)
    return delta


def _check(key: str, value: np.ndarray, shape: tuple[int, ...]) -> None:
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        raise SketchError(f"{key}: expected a float array, got {getattr(value, 'dtype', value)!r}")
    if tuple(value.shape) != tuple(shape):
        raise SketchError(f"{key}: shape {tuple(value.shape)}, expected {tuple(shape)}")
    if not np.all(np.isfinite(value)):
        raise SketchError(f"{key}: non-finite values")
