"""Sparse LoRA update exchange: client-side sparsify + error feedback + encode, server-side decode.

Array naming follows :mod:`fedsoft.lora` (``<layer>.lora_A``, ``<layer>.lora_B``, ``head.*``).
What is sparsified (A.5 item 4 of EQUATIONS.md, a PROPOSED-L choice, run-config
``sparsify-target``):

* ``update`` (default): ``x = [B_l - B_g ; A_l - A_g]`` rank rows, i.e. the local change w.r.t.
  the received global factors, plus the error memory; SOFT's per-rank scores (eq. 8) come from
  the local factors. The server rebuilds ``A_i = A_g + dA_i`` so that eq. (5) averages give
  ``A_g + sum p_i dA_i``.
* ``factors`` (the paper's text read literally): the local factors themselves plus memory are
  sparsified (eqs. 10-14) and eq. (5) averages the sparse factors.

The dense head is sent whole (densely federated) in the same value dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedsoft.compression import codec
from fedsoft.compression.error_feedback import ErrorFeedback
from fedsoft.compression.sparsifiers import from_rows, get_sparsifier, keep_count, to_rows
from fedsoft.compression.spectrum import kept_energy_ratio
from fedsoft.config import ConfigLike, RunConfig, check_sparsity
from fedsoft.layout import A_SUFFIX, B_SUFFIX, HEAD_PREFIX, head_arrays, layer_seed, layer_specs

TARGETS = ("update", "factors")


@dataclass(frozen=True)
class SparseSettings:
    """How a client compresses its upload (run-config keys in brackets)."""

    sparsifier: str  # [sparsifier]
    sparsity: float  # [sparsity] or the per-round ratio rho_t chosen by TSFA
    target: str = "update"  # [sparsify-target]
    dtype: str = "float32"  # [wire-dtype]
    split: str = "joint"  # [soft-split], SOFT's A/B split option (A.5 item 2)
    seed: int = 0  # [seed]

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"sparsify-target = {self.target!r}: must be one of {TARGETS}")
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))

    @classmethod
    def from_config(cls, cfg: ConfigLike, sparsity: float | None = None) -> SparseSettings:
        """The ``compression`` section (and ``seed``); ``sparsity`` overrides the fixed ratio
        (e.g. TSFA's rho_t of the round)."""
        cfg = RunConfig.coerce(cfg)
        c = cfg.compression
        return cls(sparsifier=c.sparsifier, sparsity=c.sparsity if sparsity is None else sparsity,
                   target=c.sparsify_target, dtype=c.wire_dtype, split=c.soft_split,
                   seed=cfg.run.seed)

    def make(self):
        """The configured sparsifier instance."""
        options = {"split": self.split} if self.sparsifier == "soft" else {}
        return get_sparsifier(self.sparsifier, **options)

    @property
    def signature(self) -> str:
        """Error memory is only valid for one sparsifier/target layout (reset otherwise)."""
        return f"{self.sparsifier}|{self.target}"


def _rows(arrays: Mapping[str, np.ndarray], spec: codec.LayerSpec) -> torch.Tensor:
    a = torch.from_numpy(np.asarray(arrays[spec.name + A_SUFFIX], dtype=np.float32))
    b = torch.from_numpy(np.asarray(arrays[spec.name + B_SUFFIX], dtype=np.float32))
    return to_rows(a, b)


def encode_update(
    global_arrays: Mapping[str, np.ndarray],
    local_arrays: Mapping[str, np.ndarray],
    settings: SparseSettings,
    ef: ErrorFeedback,
    *,
    server_round: int,
    node_id: int,
    energy_layers: int = 3,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Sparsify every LoRA layer with error feedback (eqs. 10-14) and pack the wire payload.

    Returns the payload and client-side diagnostics: ``kept_energy_ratio`` (product energy kept
    by this sparsifier / the SVD oracle's at the same budget, mean over ``energy_layers`` evenly
    spaced layers) and ``ef_sq_norm`` (||e||^2, the quantity bounded by Lemma 1, eq. 15).
    """
    sparsifier = settings.make()
    specs = layer_specs(global_arrays)
    probe = set(np.linspace(0, len(specs) - 1, min(energy_layers, len(specs))).round().astype(int))
    layers, energy = [], []
    for i, spec in enumerate(specs):
        local = _rows(local_arrays, spec)
        x = local - _rows(global_arrays, spec) if settings.target == "update" else local
        ref = local if settings.target == "update" else None
        keep = keep_count(spec.r, spec.d, spec.k, settings.sparsity)
        seed = layer_seed(settings.seed, server_round, node_id, i)
        sel = ef.step(spec.name, x, lambda u, s=seed, kp=keep, rf=ref, d=spec.d:
                      sparsifier(u, d, kp, ref=rf, seed=s))
        layers.append((spec, sel.values, sel.mask))
        if i in probe and settings.sparsifier != "dense":
            u = sel.values + ef.memory[spec.name]  # x + e_t, as sparsified
            energy.append(kept_energy_ratio(u, spec.d, keep, sparsifier, seed=seed))
    payload = codec.encode(
        layers,
        head_arrays(local_arrays),
        dtype=settings.dtype,
        implicit_positions=bool(sparsifier.positions_from_seed),
    )
    info = {"ef_sq_norm": ef.sq_norm()}
    if energy:
        info["kept_energy_ratio"] = float(np.mean(energy))
    return payload, info


def decode_update(
    payload: Mapping[str, np.ndarray],
    global_arrays: Mapping[str, np.ndarray],
    settings: SparseSettings,
    *,
    server_round: int,
    node_id: int,
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Validate a client's payload and rebuild its full arrays (same keys as the global ones).

    Beyond the codec's checks, every layer must carry exactly the budgeted number of entries
    ``keep_count(r, d, k, sparsity)``: a client that sends more is rejected.
    """
    sparsifier = settings.make()
    specs = layer_specs(global_arrays)
    heads = head_arrays(global_arrays)
    masks = None
    if sparsifier.positions_from_seed:
        masks = [
            sparsifier.mask_from_seed(
                s.r, s.d, s.k, keep_count(s.r, s.d, s.k, settings.sparsity),
                layer_seed(settings.seed, server_round, node_id, i),
            ).numpy()
            for i, s in enumerate(specs)
        ]
    rows, dense = codec.decode(
        payload, specs, {k: v.shape for k, v in heads.items()},
        dtype=settings.dtype, masks=masks, max_bytes=max_bytes,
    )
    out: dict[str, np.ndarray] = {}
    for spec, (values, mask) in zip(specs, rows, strict=True):
        keep = keep_count(spec.r, spec.d, spec.k, settings.sparsity)
        if int(mask.sum()) != keep:
            raise codec.CodecError(
                f"layer {spec.name!r}: {int(mask.sum())} entries sent, budget is {keep} "
                f"at sparsity {settings.sparsity}"
            )
        vals = torch.from_numpy(values)
        if settings.target == "update":
            vals = vals + _rows(global_arrays, spec)
        a, b = from_rows(vals, spec.d)
        out[spec.name + A_SUFFIX] = a.numpy().astype(np.float32)
        out[spec.name + B_SUFFIX] = b.numpy().astype(np.float32)
    for name, value in dense.items():
        out[HEAD_PREFIX + name] = value.astype(np.float32)
    return {k: out[k] for k in global_arrays}


def estimate_payload_bytes(
    specs: list[codec.LayerSpec], head_sizes: list[int], sparsity: float, *,
    dtype: str = "float32", seeded_positions: bool = False, per_array_overhead: int = 130,
) -> int:
    """Bytes one client's payload will take at ``sparsity`` (before it is encoded).

    Mirrors :func:`fedsoft.compression.codec.encode`: kept values in ``dtype``, per-layer positions
    as the
    smaller of uint16 indices and a bitmap (none when seeded), one count per rank row, one mode
    byte per layer, the dense head, plus Flower's per-array framing (~130 bytes measured with
    ``ArrayRecord.count_bytes``). Used by TSFA to turn rho into the eq. (6) payload in bits.
    """
    item = 2 if dtype == "float16" else 4
    kept = [keep_count(s.r, s.d, s.k, sparsity) for s in specs]
    values = item * sum(kept)
    positions = 0 if seeded_positions else sum(
        0 if n == s.r * (s.d + s.k) else min(2 * n, -(-s.r * (s.d + s.k) // 8))
        for s, n in zip(specs, kept, strict=True))
    counts = 2 * sum(s.r for s in specs) + len(specs)
    n_arrays = 3 + (1 if positions else 0) + len(head_sizes)
    return values + positions + counts + item * sum(head_sizes) + per_array_overhead * n_arrays
