"""LoRA factors of a peft model: ordered (A, B) pairs and the dense head, by stable names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from fedsoft.aggregate import check_like
from fedsoft.layout import A_SUFFIX, B_SUFFIX, HEAD_PREFIX

ADAPTER = "default"


class ArraysError(ValueError):
    """The model's LoRA structure does not match what was given (names, order, shapes)."""


@dataclass(frozen=True)
class FactorShape:
    """Shape of one adapted layer: A is (r, k), B is (d, r) (eq. 1)."""

    name: str
    r: int
    d: int
    k: int


def _strip(name: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def lora_modules(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    """Adapted layers in module order, named by their path inside the backbone."""
    out = [(_strip(n), m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not out:
        raise ArraysError("the model has no LoRA layers")
    return out


def head_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Densely trained head modules (peft ``modules_to_save``), in module order."""
    return [
        (_strip(n), m.modules_to_save[ADAPTER])
        for n, m in model.named_modules()
        if isinstance(m, ModulesToSaveWrapper)
    ]


def factor_shapes(model: torch.nn.Module) -> list[FactorShape]:
    """(name, r, d, k) of every adapted layer, in the same order as :func:`get_factors`."""
    shapes = []
    for name, m in lora_modules(model):
        a = m.lora_A[ADAPTER].weight
        b = m.lora_B[ADAPTER].weight
        shapes.append(FactorShape(name, a.shape[0], b.shape[0], a.shape[1]))
    return shapes


def get_factors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Ordered ``(name, A, B)`` with A (r x k) and B (d x r), detached copies on CPU."""
    return [
        (
            name,
            m.lora_A[ADAPTER].weight.detach().cpu().clone(),
            m.lora_B[ADAPTER].weight.detach().cpu().clone(),
        )
        for name, m in lora_modules(model)
    ]


def trainable_factors(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The live (A, B) parameters, for losses on the factors (eq. 7)."""
    return [(m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight) for _, m in lora_modules(model)]


@torch.no_grad()
def set_factors(
    model: torch.nn.Module, factors: list[tuple[str, torch.Tensor, torch.Tensor]]
) -> None:
    """Write ``(name, A, B)`` back; names, order and shapes must match the model."""
    layers = lora_modules(model)
    if [n for n, _ in layers] != [n for n, _, _ in factors]:
        raise ArraysError("LoRA layer names/order do not match the model")
    for (name, m), (_, a, b) in zip(layers, factors, strict=True):
        for label, param, value in (("A", m.lora_A[ADAPTER].weight, a),
                                    ("B", m.lora_B[ADAPTER].weight, b)):
            if tuple(value.shape) != tuple(param.shape):
                raise ArraysError(
                    f"{name}.lora_{label}: shape {tuple(value.shape)} != {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))


def get_head(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Head parameters by name (e.g. ``classifier.weight``), detached CPU copies."""
    return {
        f"{mod_name}.{p_name}": p.detach().cpu().clone()
        for mod_name, mod in head_modules(model)
        for p_name, p in mod.named_parameters()
    }


def to_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """All federated parameters as float32 arrays: ``<layer>.lora_A/B`` then ``head.<param>``."""
    out: dict[str, np.ndarray] = {}
    for name, a, b in get_factors(model):
        out[name + A_SUFFIX] = a.float().numpy()
        out[name + B_SUFFIX] = b.float().numpy()
    for name, t in get_head(model).items():
        out[HEAD_PREFIX + name] = t.float().numpy()
    return out


def check_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Raise ReplyError unless ``arrays`` has exactly the model's keys, shapes, finite floats."""
    check_like(to_arrays(model), arrays)


@torch.no_grad()
def from_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load arrays from :func:`to_arrays`; validated first, the model is untouched on error."""
    check_arrays(model, arrays)
    factors = [
        (name, torch.from_numpy(np.asarray(arrays[name + A_SUFFIX], dtype=np.float32)),
         torch.from_numpy(np.asarray(arrays[name + B_SUFFIX], dtype=np.float32)))
        for name, _ in lora_modules(model)
    ]
    set_factors(model, factors)
    for mod_name, mod in head_modules(model):
        for p_name, p in mod.named_parameters():
            value = np.asarray(arrays[f"{HEAD_PREFIX}{mod_name}.{p_name}"], dtype=np.float32)
            p.copy_(torch.from_numpy(value).to(p.dtype))


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of parameters that require gradients (LoRA factors and head only)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
