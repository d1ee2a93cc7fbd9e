"""Causal-LM client cost: peak memory and step time per local step, and the share of a round
spent in SOFT's selection + encoding (target: under 1% of local training).

Layouts are random-initialised configs of real models (no download;
``fedsoft.task.models.LAYOUTS``): ``tiny`` (the shipped tiny-llama's shape), ``qwen2.5-0.5b``
and ``llama-3.2-3b``. Peak memory: CUDA's allocator peak, or on CPU the sampled resident-set
peak above the start of the layout (float32 base). On CPU the base is float32; on CUDA
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

from fedsoft import lora  # noqa: E402
from fedsoft.compression.error_feedback import ErrorFeedback  # noqa: E402
from fedsoft.compression.update import SparseSettings, decode_update, encode_update  # noqa: E402
from fedsoft.task.models import (  # noqa: E402
    get_spec,
    layout_model,
    lora_config,
    memory_estimate_gb,
)

LAYOUTS = {"tiny": "tiny-llama", "qwen2.5-0.5b": "qwen2.5-0.5b-instruct",
           "llama-3.2-3b": "llama-3.2-3b"}  # bench name -> preset (fedsoft.task.models.LAYOUTS)


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 10 ms (the
    kernel's high-water mark cannot be reset between layouts)."""

    def __enter__(self) -> PeakRSS:
        import threading

        self.base = self.peak = _rss_gb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_gb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_gb())


def _rss_gb() -> float:
    """Current resident memory (Linux /proc/self/statm, pages)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**30


def build(layout: str, device: str, quant: str):
    spec = get_spec(LAYOUTS[layout])
    torch.manual_seed(0)
    base = layout_model(spec.name)
    base.config.use_cache = False
    if quant != "none":
        import tempfile

        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM

        from fedsoft.task.models import quantization_config

        with tempfile.TemporaryDirectory() as tmp:  # bitsandbytes quantises while loading
            base.to(torch.bfloat16).save_pretrained(tmp)
            base = AutoModelForCausalLM.from_pretrained(
                tmp, quantization_config=quantization_config(quant), device_map={"": 0})
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        base = base.to(torch.bfloat16 if device == "cuda" else torch.float32).to(device)
    return get_peft_model(base, lora_config(spec, RANK, 2.0 * RANK)), base.config, spec


RANK = 16


def run(layout: str, device: str, quant: str, args) -> dict:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss = PeakRSS().__enter__()
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
    rss.__exit__()
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
            else rss.peak - rss.base)
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
            spec, quant, batch_tokens=args.batch * args.tokens) if device == "cuda"
        else float("nan"),
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
