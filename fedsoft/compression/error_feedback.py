"""Per-layer error-feedback memory for sparsified uploads (eqs. 10-14)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from fedsoft.compression.sparsifiers.base import SparseRows

__all__ = ["SIGNATURE_KEY", "ErrorFeedback", "ErrorFeedbackError"]

SIGNATURE_KEY = "__ef_signature__"


class ErrorFeedbackError(ValueError):
    """Invalid input to, or corrupted state of, the error-feedback memory."""


def _check_finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ErrorFeedbackError(f"{name} contains non-finite values (nan/inf)")


def _encode_signature(signature: str) -> np.ndarray:
    return np.frombuffer(signature.encode("utf-8"), dtype=np.uint8).copy()


def _decode_signature(arr: np.ndarray) -> str:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ErrorFeedbackError(
            f"{SIGNATURE_KEY} must be a 1-D uint8 array, got dtype {arr.dtype} ndim {arr.ndim}"
        )
    return arr.tobytes().decode("utf-8")


class ErrorFeedback:
    """Error memory ``e`` per layer, in rank-rows layout (eqs. 11-14).

    One round for layer ``name`` (eqs. 10, 14): ``u = x + e_t``, ``S(u)`` is transmitted and
    ``e_{t+1} = u - S(u)``. For mask-type sparsifiers (values equal ``u`` on the mask) the memory
    is ``where(mask, 0, u)`` so that ``u == S(u).values + e_{t+1}`` holds bitwise; otherwise (the
    SVD oracle changes values) it is the subtraction ``u - S(u).values``.

    ``signature`` identifies the layout (e.g. model + rank). Memory saved under another
    signature, or a layer whose shape changed, is reset to zero; ``reset_reason`` then says why
    (``None`` if nothing was reset since construction / the last :meth:`clear_reset_reason`).
    """

    def __init__(self, signature: str = "") -> None:
        if not isinstance(signature, str):
            raise TypeError(f"signature must be a str, got {type(signature).__name__}")
        self.signature: str = signature
        self.memory: dict[str, Tensor] = {}
        self.reset_reason: str | None = None

    def reset(self, reason: str) -> None:
        """Drop all memory (E^0 = 0, eq. 11-12) and record ``reason``."""
        self.memory.clear()
        self.reset_reason = reason

    def clear_reset_reason(self) -> None:
        """Forget the last reset reason (e.g. after it has been reported as a metric)."""
        self.reset_reason = None

    def compensated(self, name: str, x: Tensor) -> Tensor:
        """``x + e_t`` for layer ``name`` (the argument of S in eq. 10); resets on shape change."""
        if not isinstance(name, str) or not name:
            raise ErrorFeedbackError(f"name must be a non-empty str, got {name!r}")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ErrorFeedbackError(f"x for layer {name!r} must be a floating-point tensor")
        _check_finite(f"x for layer {name!r}", x)
        e = self.memory.get(name)
        if e is None:
            return x.clone()
        if e.shape != x.shape:
            self.memory.pop(name)
            self.reset_reason = (
                f"shape of layer {name!r} changed from {tuple(e.shape)} to {tuple(x.shape)}"
            )
            return x.clone()
        e = e.to(device=x.device, dtype=x.dtype)
        _check_finite(f"error memory of layer {name!r}", e)
        return x + e

    def step(self, name: str, x: Tensor, sparsify_fn: Callable[[Tensor], SparseRows], *,
             transmit: Callable[[SparseRows], Tensor] | None = None,
             sent_rows_only: bool = False) -> SparseRows:
        """Sparsify ``x + e_t`` with ``sparsify_fn`` and store ``e_{t+1}`` (eqs. 10, 14).

        ``sparsify_fn`` maps the compensated rows to a :class:`SparseRows` of the same shape,
        e.g. ``lambda u: SPARSIFIERS["soft"](u, d, keep, ref=factors, seed=seed)``.
        ``transmit`` maps that selection to what the receiver reconstructs (e.g. the int8 or
        float16 round trip of :func:`fedsoft.compression.quantize.roundtrip`); the memory then
        keeps ``u - transmit(S(u))``, so the rounding error is sent later instead of lost and
        ``sum_t sent_t + e_T = sum_t x_t`` holds for every wire dtype. ``sent_rows_only`` drops
        the memory of rank rows the selection left empty (HetLoRA: rows above a client's rank
        are never sent, so their memory would only grow).
        """
        u = self.compensated(name, x)
        out = sparsify_fn(u)
        if not isinstance(out, SparseRows):
            raise ErrorFeedbackError(
                f"sparsify_fn must return SparseRows, got {type(out).__name__}"
            )
        if out.values.shape != u.shape:
            raise ErrorFeedbackError(
                f"sparsify_fn output shape {tuple(out.values.shape)} != input shape "
                f"{tuple(u.shape)} for layer {name!r}"
            )
        zero = torch.zeros((), dtype=u.dtype, device=u.device)
        mask = out.mask.to(u.device)
        if transmit is not None:
            sent = transmit(out).to(device=u.device, dtype=u.dtype)
            if sent.shape != u.shape:
                raise ErrorFeedbackError(f"transmit output shape {tuple(sent.shape)} != "
                                         f"{tuple(u.shape)} for layer {name!r}")
            e_next = torch.where(mask, u - sent, u)
        elif torch.equal(out.values, torch.where(mask, u, zero)):
            e_next = torch.where(mask, zero, u)
        else:
            e_next = u - out.values.to(dtype=u.dtype)
        if sent_rows_only and e_next.ndim == 2:
            e_next = torch.where(mask.any(dim=1, keepdim=True), e_next, zero)
        _check_finite(f"new error memory of layer {name!r}", e_next)
        self.memory[name] = e_next.detach()
        return out

    def sq_norm(self) -> float:
        """``||e||_2^2`` summed over layers (the quantity bounded by Lemma 1, eq. 15)."""
        return float(sum(float((e.double() ** 2).sum()) for e in self.memory.values()))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Memory as numpy arrays plus the signature under ``SIGNATURE_KEY`` (uint8 bytes)."""
        out: dict[str, np.ndarray] = {SIGNATURE_KEY: _encode_signature(self.signature)}
        for name, e in self.memory.items():
            t = e.detach().cpu()
            if t.dtype in (torch.bfloat16, torch.float16):
                t = t.float()
            out[name] = t.numpy().copy()
        return out

    @classmethod
    def from_arrays(cls, d: Mapping[str, np.ndarray], signature: str) -> ErrorFeedback:
        """Rebuild from :meth:`to_arrays`; memory saved under another signature is reset."""
        if not isinstance(d, Mapping):
            raise ErrorFeedbackError(f"d must be a mapping of arrays, got {type(d).__name__}")
        ef = cls(signature)
        if SIGNATURE_KEY not in d:
            if len(d):
                ef.reset_reason = f"saved memory has no {SIGNATURE_KEY!r} entry"
            return ef
        saved = _decode_signature(d[SIGNATURE_KEY])
        if saved != signature:
            ef.reset_reason = f"signature changed from {saved!r} to {signature!r}"
            return ef
        for name, arr in d.items():
            if name == SIGNATURE_KEY:
                continue
            a = np.asarray(arr)
            if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
                raise ErrorFeedbackError(
                    f"memory {name!r} must be a 2-D float array, got dtype {a.dtype} "
                    f"shape {a.shape}"
                )
            if not np.all(np.isfinite(a)):
                raise ErrorFeedbackError(f"memory {name!r} contains non-finite values")
            ef.memory[name] = torch.from_numpy(a.copy())
        return ef
