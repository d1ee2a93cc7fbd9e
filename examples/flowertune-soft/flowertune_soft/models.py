"""flowertune-soft: the model (tiny offline Llama or a hub model), its tokenizer, LoRA, training."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

TINY = "tiny-llama"  # built in code: no download, same weights on every node
PAD, EOS = "<|pad|>", "<|endoftext|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges: 256 byte tokens + pad / eos (no training,
    deterministic, lossless on any UTF-8 text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD, EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   padding_side="right")


def get_tokenizer(model_name: str):
    """The byte tokenizer for the tiny model, else the hub model's (pad = eos if it has none)."""
    if model_name == TINY:
        return byte_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(model_name, use_fast=True, padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_model(model_cfg: dict, tokenizer):
    """The frozen base: a seeded 2-layer Llama (hidden 64) for ``tiny-llama``, else the hub
    model (4/8-bit with bitsandbytes on a GPU when ``quantization`` asks for it)."""
    if model_cfg["name"] == TINY:
        torch.manual_seed(int(model_cfg.get("seed", 0)))
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id, use_cache=False)
        return LlamaForCausalLM(config)
    bits = int(model_cfg.get("quantization", 0))
    kwargs = {}
    if bits in (4, 8) and torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=bits == 4, load_in_8bit=bits == 8,
            bnb_4bit_compute_dtype=torch.bfloat16)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_cfg["name"], dtype=dtype, **kwargs)
    if kwargs:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(model_cfg.get("gradient_checkpointing")))
    elif model_cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def get_model(model_cfg: dict, tokenizer):
    """The base model with a LoRA adapter (FlowerTune's ``model.lora.*`` keys); the adapter's
    initial values are seeded too, so the server's initial arrays are reproducible."""
    model = base_model(model_cfg, tokenizer)
    lora = model_cfg["lora"]
    targets = [t.strip() for t in str(lora.get("target_modules", "q_proj,v_proj")).split(",")]
    peft_config = LoraConfig(
        r=int(lora["peft_lora_r"]), lora_alpha=int(lora["peft_lora_alpha"]),
        lora_dropout=float(lora.get("peft_lora_dropout", 0.0)),
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM")
    torch.manual_seed(int(model_cfg.get("seed", 0)) + 1)
    return get_peft_model(model, peft_config)


def cosine_annealing(current_round: int, total_round: int, lrate_max: float = 0.001,
                     lrate_min: float = 0.0) -> float:
    """FlowerTune's learning-rate schedule over the server rounds."""
    cos_inner = math.pi * current_round / total_round
    return lrate_min + 0.5 * (lrate_max - lrate_min) * (1 + math.cos(cos_inner))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_steps(model, batches: Iterable[dict], lr: float, steps: int) -> float:
    """A plain AdamW loop of ``steps`` batches (what SFTTrainer does for FlowerTune, without
    trl); returns the mean training loss."""
    dev = device()
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    it = iter(batches)
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(batches)
            batch = next(it)
        out = model(**{k: v.to(dev) for k, v in batch.items()})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    model.cpu()
    return float(sum(losses) / max(len(losses), 1))


@torch.no_grad()
def heldout_loss(model, batches: Iterable[dict]) -> float:
    """Mean negative log-likelihood per response token (labels != -100) on the held-out set."""
    dev = device()
    model.to(dev).eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(dev) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((labels != -100).sum())
    model.cpu()
    return total / count if count else float("nan")
