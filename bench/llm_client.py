"""Causal-LM client cost: peak memory and step time per local step, and the share of a round
spent in SOFT's selection + encoding (target: under 1% of local training).

Layouts are random-initialised configs of real models (no download): ``tiny`` (the shipped
tiny-llama's shape), ``qwen2.5-0.5b`` and ``llama-3.2-3b``. On CPU the base is float32; on CUDA
bf16 and, with bitsandbytes, 4-bit (QLoRA). One client round = ``--local-steps`` AdamW steps on
``--batch`` x ``--tokens`` tokens with LoRA(q, v) at ``--rank``, then ``encode_update`` (SOFT at
``--sparsity`` with error feedback; the server's ``decode_update`` is timed too).
Usage: python bench/llm_client.py [--layouts tiny qwen2.5-0.5b] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from fedsoft import lora  # noqa: E402
from fedsoft.compression.error_feedback import ErrorFeedback  # noqa: E402
from fedsoft.compression.update import SparseSettings, decode_update, encode_update  # noqa: E402
from fedsoft.task.models import get_spec, lora_config, memory_estimate_gb  # noqa: E402

LAYOUTS = {  # (config class, model class, kwargs) of the real models' configs
    "tiny": (LlamaConfig, LlamaForCausalLM, dict(
        vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), "tiny-llama"),
    "qwen2.5-0.5b": (Qwen2Config, Qwen2ForCausalLM, dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
        "qwen2.5-0.5b-instruct"),
    "llama-3.2-3b": (LlamaConfig, LlamaForCausalLM, dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
        "llama-3.2-3b"),
}


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def build(layout: str, device: str, quant: str):
    cfg_cls, model_cls, kw, spec_name = LAYOUTS[layout]
    cfg = cfg_cls(**kw, use_cache=False)
    torch.manual_seed(0)
    if quant == "4bit":
        import tempfile

        from transformers import AutoModelForCausalLM

        from fedsoft.task.models import quantization_config

        with tempfile.TemporaryDirectory() as tmp:  # bitsandbytes quantises while loading
            model_cls(cfg).to(torch.bfloat16).save_pretrained(tmp)
            base = AutoModelForCausalLM.from_pretrained(
                tmp, quantization_config=quantization_config("4bit"), device_map={"": 0})
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        base = model_cls(cfg)
        if device == "cuda":
            base = base.to(torch.bfloat16)
        base = base.to(device)
    spec = get_spec(spec_name)
    return get_peft_model(base, lora_config(spec, RANK, 2.0 * RANK)), cfg, spec


RANK = 16


def run(layout: str, device: str, quant: str, args) -> dict:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_gb()
    model, cfg, spec = build(layout, device, quant)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens), device=device)
    start = lora.to_arrays(model)
    times = []
    for step in range(args.local_steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step > 0 or args.local_steps == 1:  # the first step warms up kernels / allocator
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
            else _rss_gb() - rss0)
    local = lora.to_arrays(model.cpu() if device == "cpu" else model)
    settings = SparseSettings("soft", args.sparsity, dtype=args.wire_dtype)
    ef = ErrorFeedback("bench")
    enc, dec = [], []
    for rnd in range(3):
        t0 = time.perf_counter()
        payload, _ = encode_update(start, local, settings, ef, server_round=rnd, node_id=1)
        enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decode_update(payload, start, settings, server_round=rnd, node_id=1)
        dec.append(time.perf_counter() - t0)
    lora_entries = sum(a.size for a in local.values())
    out = {
        "layout": layout, "device": device, "base": quant if quant != "none" else (
            "bf16" if device == "cuda" else "fp32"),
        "tokens/step": args.batch * args.tokens, "step_s": step_s,
        "peak_gb": peak, "estimate_gb": memory_estimate_gb(
            spec, quant, batch_tokens=args.batch * args.tokens, hidden=cfg.hidden_size,
            layers=cfg.num_hidden_layers) if device == "cuda" else float("nan"),
        "lora_M": lora_entries / 1e6, "encode_s": min(enc), "decode_s": min(dec),
    }
    out["encode_share"] = out["encode_s"] / (args.local_steps * step_s)
    del model, opt
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["tiny", "qwen2.5-0.5b"],
                    choices=sorted(LAYOUTS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cpu", "cuda"])
    ap.add_argument("--quant", nargs="+", default=None,
                    help="base precisions to try (default: none; on CUDA also 4bit)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--wire-dtype", default="float32")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    quants = args.quant or (["none", "4bit"] if args.device == "cuda" else ["none"])
    print(f"[bench] LoRA(q, v) r={RANK}, SOFT rho={args.sparsity} {args.wire_dtype}, "
          f"{args.local_steps} local steps of {args.batch}x{args.tokens} tokens, "
          f"device {args.device}", flush=True)
    header = ("layout", "device", "base", "step_s", "peak_gb", "estimate_gb", "lora_M",
              "encode_s", "decode_s", "encode_share")
    print(" | ".join(header))
    for layout in args.layouts:
        for quant in quants:
            try:
                row = run(layout, args.device, quant, args)
            except (ValueError, ImportError, RuntimeError) as exc:
                print(f"{layout} | {args.device} | {quant} | skipped: {exc}", flush=True)
                continue
            print(" | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k])
                             for k in header), flush=True)
            print(f"  SOFT selection + encoding / local training = {row['encode_share']:.4%}"
                  f" (target < 1%); peak memory {row['peak_gb']:.3f} GB", flush=True)


if __name__ == "__main__":
    main()
