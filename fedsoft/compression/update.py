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

The head (``head.*``) is sent whole (densely federated, today's behaviour) when
``head-sparsity = 0`` and the wire dtype is a float; otherwise its change ``head_l - head_g``
plus its own error memory is top-k sparsified at ``head-sparsity`` (its own ratio, not part of
the LoRA budget rho) and quantised like the LoRA values, and the server rebuilds
``head_g + decoded change``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedsoft.compression import codec, positions, quantize
from fedsoft.compression.error_feedback import ErrorFeedback
from fedsoft.compression.sparsifiers import from_rows, get_sparsifier, keep_count, to_rows
from fedsoft.compression.sparsifiers.base import SparseRows
from fedsoft.compression.spectrum import kept_energy_ratio
from fedsoft.config import ConfigLike, RunConfig, check_sparsity
from fedsoft.layout import (
    A_SUFFIX,
    B_SUFFIX,
    HEAD_PREFIX,
    RowsSpec,
    head_arrays,
    head_specs,
    layer_seed,
    layer_specs,
)

TARGETS = ("update", "factors")
HEAD_MEMORY = "head/"  # error-memory names of the head tensors


@dataclass(frozen=True)
class SparseSettings:
    """How a client compresses its upload (run-config keys in brackets)."""

    sparsifier: str  # [sparsifier]
    sparsity: float  # [sparsity] or the per-round ratio rho_t chosen by TSFA
    target: str = "update"  # [sparsify-target]
    dtype: str = "float32"  # [wire-dtype]
    split: str = "joint"  # [soft-split], SOFT's A/B split option (A.5 item 2)
    seed: int = 0  # [seed]
    head_sparsity: float = 0.0  # [head-sparsity]

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"sparsify-target = {self.target!r}: must be one of {TARGETS}")
        quantize.check_dtype(self.dtype)
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        object.__setattr__(self, "head_sparsity",
                           check_sparsity(self.head_sparsity, "head-sparsity"))

    @property
    def sparse_head(self) -> bool:
        """The head goes as a sparsified / quantised change with error feedback (else whole)."""
        return self.head_sparsity > 0 or quantize.scaled(self.dtype)

    @classmethod
    def from_config(cls, cfg: ConfigLike, sparsity: float | None = None) -> SparseSettings:
        """The ``compression`` section (and ``seed``); ``sparsity`` overrides the fixed ratio
        (e.g. TSFA's rho_t of the round)."""
        cfg = RunConfig.coerce(cfg)
        c = cfg.compression
        return cls(sparsifier=c.sparsifier, sparsity=c.sparsity if sparsity is None else sparsity,
                   target=c.sparsify_target, dtype=c.wire_dtype, split=c.soft_split,
                   seed=cfg.run.seed, head_sparsity=c.head_sparsity)

    def make(self):
        """The configured sparsifier instance."""
        options = {"split": self.split} if self.sparsifier == "soft" else {}
        return get_sparsifier(self.sparsifier, **options)

    @property
    def signature(self) -> str:
        """Error memory is only valid for one sparsifier/target layout (reset otherwise)."""
        return f"{self.sparsifier}|{self.target}"


def head_keep(spec: RowsSpec, head_sparsity: float) -> int:
    """Head entries sent per round: ``round((1 - head-sparsity) * size)``, at least one (a
    tensor that never sends would only grow its error memory)."""
    keep = int(round((1.0 - check_sparsity(head_sparsity, "head-sparsity")) * spec.size))
    return max(keep, 1)


def topk_mask(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the ``keep`` largest ``|x|`` over the whole tensor (ties by index)."""
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    if keep > 0:
        order = torch.argsort(x.detach().abs().reshape(-1).cpu(), descending=True, stable=True)
        mask[order[:keep]] = True
    return mask.reshape(x.shape)


def transmit_fn(dtype: str):
    """``ErrorFeedback.step``'s ``transmit`` for ``dtype``: None for float32 (exact), else the
    receiver's reconstruction from the codec's quantisation (same rows, same rounding)."""
    if dtype == "float32":
        return None

    def transmit(sel: SparseRows) -> torch.Tensor:
        values = sel.values.detach().cpu().numpy()
        mask = sel.mask.cpu().numpy()
        out = np.zeros(values.shape, dtype=np.float32)
        out[mask] = quantize.roundtrip(values[mask].astype(np.float32), mask.sum(axis=1), dtype)
        return torch.from_numpy(out)

    return transmit


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
    transmit = transmit_fn(settings.dtype)
    rows_only = bool(getattr(sparsifier, "memory_sent_rows_only", False))
    probe = set(np.linspace(0, len(specs) - 1, min(energy_layers, len(specs))).round().astype(int))
    layers, energy = [], []
    for i, spec in enumerate(specs):
        local = _rows(local_arrays, spec)
        x = local - _rows(global_arrays, spec) if settings.target == "update" else local
        ref = local if settings.target == "update" else None
        keep = keep_count(spec.r, spec.d, spec.k, settings.sparsity)
        seed = layer_seed(settings.seed, server_round, node_id, i)
        probing = i in probe and settings.sparsifier != "dense"
        u = ef.compensated(spec.name, x) if probing else None  # x + e_t, as sparsified
        sel = ef.step(spec.name, x, lambda u, s=seed, kp=keep, rf=ref, d=spec.d:
                      sparsifier(u, d, kp, ref=rf, seed=s), transmit=transmit,
                      sent_rows_only=rows_only)
        layers.append((spec, sel.values, sel.mask))
        if u is not None:
            sent = sel.values if transmit is None else transmit(sel)
            energy.append(kept_energy_ratio(u, spec.d, keep, sparsifier, seed=seed, ref=ref,
                                            sent=sent))
    implicit = [bool(sparsifier.positions_from_seed)] * len(layers)
    dense = head_arrays(local_arrays)
    if settings.sparse_head:
        heads_g = head_arrays(global_arrays)
        for hs in head_specs(global_arrays):
            x = torch.from_numpy((np.asarray(dense[hs.name], np.float32)
                                  - np.asarray(heads_g[hs.name], np.float32)).reshape(hs.shape))
            kp = head_keep(hs, settings.head_sparsity)
            sel = ef.step(HEAD_MEMORY + hs.name, x,
                          lambda u, kp=kp: SparseRows(*_topk(u, kp)), transmit=transmit)
            layers.append((hs, sel.values, sel.mask))
            implicit.append(False)
        dense = {}
    payload = codec.encode(layers, dense, dtype=settings.dtype, implicit_positions=implicit)
    info = {"ef_sq_norm": ef.sq_norm()}
    if energy:
        info["kept_energy_ratio"] = float(np.mean(energy))
    return payload, info


def _topk(u: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = topk_mask(u, keep)
    return torch.where(mask, u, torch.zeros((), dtype=u.dtype)), mask


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
    ``keep_count(r, d, k, sparsity)`` (and every sparse head tensor ``head_keep``): a client
    that sends more is rejected.
    """
    sparsifier = settings.make()
    specs = layer_specs(global_arrays)
    heads = head_arrays(global_arrays)
    hspecs = head_specs(global_arrays) if settings.sparse_head else []
    masks = None
    if sparsifier.positions_from_seed:
        masks = [
            sparsifier.mask_from_seed(
                s.r, s.d, s.k, keep_count(s.r, s.d, s.k, settings.sparsity),
                layer_seed(settings.seed, server_round, node_id, i),
            ).numpy()
            for i, s in enumerate(specs)
        ] + [None] * len(hspecs)
    rows, dense = codec.decode(
        payload, [*specs, *hspecs], {} if hspecs else {k: v.shape for k, v in heads.items()},
        dtype=settings.dtype, masks=masks, max_bytes=max_bytes,
    )
    out: dict[str, np.ndarray] = {}
    for spec, (values, mask) in zip(specs, rows, strict=False):
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
    for hs, (values, mask) in zip(hspecs, rows[len(specs):], strict=True):
        keep = head_keep(hs, settings.head_sparsity)
        if int(mask.sum()) != keep:
            raise codec.CodecError(
                f"head {hs.name!r}: {int(mask.sum())} entries sent, budget is {keep} at "
                f"head-sparsity {settings.head_sparsity}")
        base = np.asarray(heads[hs.name], np.float32)
        dense[hs.name] = base + values.reshape(base.shape)
    for name, value in dense.items():
        out[HEAD_PREFIX + name] = value.astype(np.float32)
    return {k: out[k] for k in global_arrays}


def _position_bytes(size: int, rows: int, row_len: int, kept: int, rice: bool
                    ) -> tuple[float, int | None]:
    """Planned position bytes of one layer as :func:`codec.encode` chooses them, plus its
    counts (one per row, or one for a Rice layer), and the position mode (None: no positions
    array is needed)."""
    if kept == size:
        return 2 * rows, None
    if kept == 0 and row_len <= 1 << 16:
        return 2 * rows, None  # index mode with nothing to index: no idx array
    options: dict[int, float] = {codec.MODE_BITMAP: -(-size // 8) + 2 * rows}
    if row_len <= 1 << 16:
        options[codec.MODE_INDEX] = 2 * kept + 2 * rows
    if rice:  # the segment carries its count: no row counts
        options[codec.MODE_RICE] = positions.rice_expected_bytes(size, kept)
    mode = min(options, key=options.__getitem__)
    return options[mode], mode


def estimate_payload_bytes(
    specs: list[codec.LayerSpec], heads: list[int | RowsSpec], sparsity: float, *,
    dtype: str = "float32", seeded_positions: bool = False, head_sparsity: float = 0.0,
    per_array_overhead: int = 130,
) -> int:
    """Bytes one client's payload will take at ``sparsity`` (before it is encoded).

    Mirrors :func:`fedsoft.compression.codec.encode`: kept values in ``dtype`` (eq. (6)'s q,
    plus one float32 scale per row for int8 / int4), per-layer positions as the smallest of
    uint16 indices, a bitmap and the expected Rice code (none when seeded), the counts, one mode
    byte per layer, the head (whole, or sparse at ``head_sparsity`` / quantised as the codec
    sends it; ``heads`` are RowsSpecs, or sizes for one-row tensors), plus Flower's per-array
    framing (~130 bytes measured with ``ArrayRecord.count_bytes``). Used by TSFA to turn rho
    into the eq. (6) payload in bits.
    """
    quantize.check_dtype(dtype)
    hspecs = [h if isinstance(h, RowsSpec) else RowsSpec(f"h{i}", 1, int(h))
              for i, h in enumerate(heads)]
    sparse_head = head_sparsity > 0 or quantize.scaled(dtype)
    blocks = [(s.size, s.r, s.row_len, keep_count(s.r, s.d, s.k, sparsity), seeded_positions)
              for s in specs]
    if sparse_head:
        blocks += [(h.size, h.r, h.row_len, head_keep(h, head_sparsity), False) for h in hspecs]
    kept = sum(b[3] for b in blocks)
    total = quantize.values_nbytes(kept, dtype)
    rows = sum(b[1] for b in blocks)
    if quantize.scaled(dtype):
        total += 4 * rows
    modes: set[int] = set()
    for size, r, row_len, n, seeded in blocks:
        if seeded:
            total += 2 * r
            continue
        nbytes, mode = _position_bytes(size, r, row_len, n, True)
        total += nbytes
        if mode is not None:
            modes.add(mode)
    total += len(blocks)  # pos_mode
    n_arrays = 3 + (1 if quantize.scaled(dtype) else 0) + len(modes)
    if not sparse_head:
        total += quantize.values_nbytes(sum(h.size for h in hspecs), dtype)
        n_arrays += len(hspecs)
    return int(round(total + per_array_overhead * n_arrays))
