"""Causal-LM task: instruction data, response-only collation, packing, exact match, presets."""

import math

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fedsoft import lora
from fedsoft.config import ConfigError, RunConfig, resolve
from fedsoft.task import instructions, workload
from fedsoft.task.collate import causal_collate, make_loader
from fedsoft.task.models import (
    LAYOUTS,
    build_model,
    get_spec,
    layout_model,
    load_preprocessor,
    memory_estimate_gb,
    resolve_source,
    tiny_llama_dir,
)
from fedsoft.task.train import evaluate, task_loss, train_local

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_preprocessor(get_spec("tiny-llama"))


@pytest.fixture(scope="module")
def yahoo():
    return instructions.load_instruction_splits("yahoo", max_train=200, max_test=60)


def _row(prefix="### Instruction:\nName it.\n### Input:\n", inp="some text here",
         suffix="\n### Response:", response="Sports"):
    return {"prefix": prefix, "input": inp, "suffix": suffix, "response": response}


def test_recast_keeps_labels_and_writes_class_names(yahoo):
    train, test = yahoo
    assert set(instructions.COLUMNS) <= set(train.column_names)
    names = train.features["label"].names
    for ex in train.select(range(20)):
        assert ex["response"] == instructions.answer_name(names[ex["label"]])
        assert ex["prefix"].startswith("### Instruction:") and "Options:" not in ex["prefix"]
    raw = instructions.data.load_splits("yahoo", max_train=200, max_test=60)[0]
    alpaca = instructions.recast(raw.select(range(2)), names, "alpaca")[0]["prefix"]
    assert alpaca.startswith(instructions.ALPACA_PREAMBLE)
    assert all(instructions.answer_name(n) in alpaca for n in names)  # options listed
    assert instructions.answer_name("card_arrival") == "card arrival"
    assert len(test) == 60 and isinstance(train.features["label"], ClassLabel)


def test_alpaca_template_has_flowertune_preamble():
    prefix, suffix = instructions.template_parts("Do it.", "alpaca")
    assert prefix.startswith(instructions.ALPACA_PREAMBLE) and suffix == "\n### Response:"
    with pytest.raises(ValueError, match="prompt-template"):
        instructions.template_parts("x", "chatml")


def test_hub_instruction_set_standardises_with_and_without_input():
    spec = instructions.INSTRUCTION_SETS["alpaca-gpt4"]
    raw = Dataset.from_dict({"instruction": ["Add.", "Say hi."], "input": ["1 + 2", ""],
                             "output": ["3", "hi"]})
    out = instructions.standardize_instructions(raw, spec, "short")
    assert out["response"] == ["3", "hi"]
    assert "### Input:" in out[0]["prefix"] and "### Input:" not in out[1]["prefix"]
    whole = out[1]["prefix"] + out[1]["input"] + out[1]["suffix"]
    assert whole == "### Instruction:\nSay hi.\n### Response:"
    with pytest.raises(ValueError, match="output"):
        instructions.standardize_instructions(raw.remove_columns("output"), spec, "short")


def test_hub_instruction_split_is_held_out_and_seeded(monkeypatch):
    rows = {"instruction": [f"q{i}" for i in range(50)], "input": [""] * 50,
            "output": [f"a{i}" for i in range(50)]}
    monkeypatch.setattr(instructions.InstructionSpec, "loader",
                        lambda self: lambda split, cache: Dataset.from_dict(rows))
    instructions.clear_cache()
    train, test = instructions.load_instruction_splits("alpaca-gpt4", seed=3)
    assert len(train) + len(test) == 50 and len(test) == 5
    assert not set(train["response"]) & set(test["response"])
    instructions.clear_cache()
    again = instructions.load_instruction_splits("alpaca-gpt4", seed=3)[1]
    assert again["response"] == test["response"]
    instructions.clear_cache()


def test_collate_scores_the_response_and_eos_only(tok):
    collate = causal_collate(tok, 64)
    batch = collate([_row(), _row(inp="a much longer input text than the other one")])
    ids, labels = batch["input_ids"], batch["labels"]
    assert int(batch["n_examples"]) == 2
    resp = tok(" Sports", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    whole = tok("### Instruction:\nName it.\n### Input:\nsome text here\n### Response: Sports",
                add_special_tokens=False)["input_ids"]
    assert ids[0][: len(whole)].tolist() == whole  # tokenised as running text
    assert batch["complete"].tolist() == [True, True]
    for i in range(2):
        scored = labels[i][labels[i] != -100].tolist()
        assert scored == resp
        n = int(batch["attention_mask"][i].sum())
        assert ids[i, n - len(resp):n].tolist() == resp  # the response ends the real tokens


def test_collate_cuts_the_input_before_the_response(tok):
    long = " ".join(["word"] * 400)
    ids_len = 40
    batch = causal_collate(tok, ids_len)([_row(inp=long)])
    assert batch["input_ids"].shape[1] <= ids_len and bool(batch["complete"][0])
    resp = tok(" Sports", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert batch["labels"][0][batch["labels"][0] != -100].tolist() == resp
    tail = tok("\n### Response: Sports", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, -len(tail) - 1:-1].tolist() == tail


def test_collate_cuts_a_long_response_and_marks_it_incomplete(tok):
    batch = causal_collate(tok, 40)([_row(inp="", response="word " * 60)])
    assert batch["input_ids"].shape[1] == 40 and not bool(batch["complete"][0])
    assert tok.eos_token_id not in batch["labels"][0].tolist()


def test_a_template_longer_than_max_length_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="max-length = 12: the prompt template alone"):
        causal_collate(tok, 12)([_row(prefix="### Instruction:\n" + "Name it. " * 10)])


def test_every_preset_row_keeps_its_whole_response(tok):
    cfg = resolve({"preset": "llm-offline"}, ROOT / "conf")
    train, _ = instructions.load_instruction_splits(
        cfg.training.dataset, template=cfg.training.prompt_template, max_train=200)
    batch = causal_collate(tok, cfg.training.max_length)([train[i] for i in range(64)])
    assert bool(batch["complete"].all())
    for row, labels, ex in zip(batch["input_ids"], batch["labels"], train.select(range(64)),
                               strict=True):
        scored = labels[labels != -100].tolist()
        want = tok(" " + ex["response"], add_special_tokens=False)["input_ids"]
        assert scored[-1] == tok.eos_token_id and len(scored) >= len(want)
        assert "### Response:" in tok.decode(row[labels == -100].tolist())


def test_a_cut_response_never_counts_as_an_exact_match(tok):
    model = build_model(get_spec("tiny-llama"), 0, 4, 8.0)
    collate = causal_collate(tok, 40)
    batch = collate([_row(inp="", response="word " * 60)])
    # make every teacher-forced argmax "right": the accuracy must still be 0 (no eos scored)
    class Oracle(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            logits = torch.full((*input_ids.shape, len(tok)), -10.0)
            logits[0, :-1].scatter_(1, input_ids[0, 1:, None], 10.0)
            return type("Out", (), {"logits": logits})()
    _, acc, n = evaluate(Oracle(), [batch])
    full = causal_collate(tok, 64)([_row()])
    _, acc_full, _ = evaluate(Oracle(), [full])
    assert (acc, n, acc_full) == (0.0, 1, 1.0)
    del model


def test_packed_batch_gives_the_padded_batch_loss(tok):
    model = build_model(get_spec("tiny-llama"), 0, 4, 8.0)
    rows = [_row(), _row(inp="short"), _row(inp="another input", response="Health")]
    padded = causal_collate(tok, 64)(rows)
    packed = causal_collate(tok, 64, packing=True)(rows)
    assert packed["input_ids"].shape[0] == 1 and "position_ids" in packed
    assert int(packed["n_examples"]) == 3
    with torch.no_grad():
        lp = task_loss(model(input_ids=padded["input_ids"],
                             attention_mask=padded["attention_mask"]).logits, padded["labels"])
        lk = task_loss(model(input_ids=packed["input_ids"],
                             position_ids=packed["position_ids"]).logits, packed["labels"])
    assert float(lk) == pytest.approx(float(lp), rel=1e-5)


def test_exact_match_equals_greedy_generation(tok, yahoo):
    train, test = yahoo
    model = build_model(get_spec("tiny-llama"), 0, 8, 16.0)
    collate = causal_collate(tok, 96)
    train_local(model, make_loader(train, collate, 16, seed=0), steps=15, lr=5e-3)
    rows = [test[i] for i in range(24)]
    _, acc, n = evaluate(model, make_loader(rows, collate, 8, shuffle=False))
    hits = 0
    for ex in rows:
        batch = collate([ex])
        keep = batch["labels"][0] == -100
        keep &= batch["attention_mask"][0].bool()
        prompt = batch["input_ids"][0][keep].unsqueeze(0)
        want = batch["labels"][0][~keep & batch["attention_mask"][0].bool()].tolist()
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=len(want), do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        hits += out[0, prompt.shape[1]:].tolist() == want
    assert n == 24 and acc == pytest.approx(hits / 24)


def _tiny_causal(arch: str, vocab: int):
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                                      n_positions=128, bos_token_id=vocab - 1,
                                      eos_token_id=vocab - 1))


@pytest.mark.parametrize("name,arch,targets", [
    ("qwen2.5-0.5b-instruct", "qwen2", {"q_proj", "v_proj"}),
    ("smollm2-135m-instruct", "llama", {"q_proj", "v_proj"}),
    ("llama-3.2-3b", "llama", {"q_proj", "v_proj"}),
    ("mistral-7b-v0.3", "llama", {"q_proj", "v_proj"}),
    ("gpt2", "gpt2", {"c_attn"}),
])
def test_hub_presets_load_with_their_real_code(tmp_path, tok, name, arch, targets):
    """The hub loading path on a locally saved model of the same architecture."""
    spec = get_spec(name)
    _tiny_causal(arch, len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = build_model(spec, 0, 4, 8.0, source=tmp_path)
    arrays = lora.to_arrays(model)
    assert arrays and not any(k.startswith("head.") for k in arrays)  # nothing dense
    assert {n.rsplit(".", 1)[-1] for n, _ in lora.lora_modules(model)} == targets
    assert load_preprocessor(spec, tmp_path).pad_token is not None
    batch = causal_collate(load_preprocessor(spec, tmp_path), 32)([_row()])
    batch.pop("n_examples")
    labels = batch.pop("labels")
    loss = task_loss(model(**batch).logits, labels)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert resolve_source(spec) == spec.source  # the hub id when no override is given


def test_modules_to_save_federates_them_densely():
    model = build_model(get_spec("tiny-llama"), 0, 4, 8.0,
                        modules_to_save=["lm_head"], target_modules=["all-linear"])
    arrays = lora.to_arrays(model)
    assert any(k.startswith("head.lm_head") for k in arrays)
    names = {n.rsplit(".", 1)[-1] for n, _ in lora.lora_modules(model)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"} <= names
    with pytest.raises(ValueError, match="modules-to-save"):
        build_model(get_spec("tiny-llama"), 0, 4, 8.0, modules_to_save=["nonexistent"])


def test_gradient_checkpointing_gives_the_same_gradients(tok):
    rows = [_row(), _row(inp="other")]
    grads = []
    for ckpt in (False, True):
        model = build_model(get_spec("tiny-llama"), 0, 4, 8.0, gradient_checkpointing=ckpt)
        model.train()
        batch = causal_collate(tok, 48)(rows)
        batch.pop("n_examples")
        labels = batch.pop("labels")
        task_loss(model(**batch).logits, labels).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.requires_grad and p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error path")
def test_kbit_base_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="quantization = '4bit' needs a CUDA GPU"):
        build_model(get_spec("tiny-llama"), 0, 4, 8.0, quantization="4bit")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_spec_sizes_are_the_real_configs_parameter_counts(name):
    spec, model = get_spec(name), layout_model(name, meta=True)
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    embed = emb.numel() + (0 if out is emb else out.numel()) + sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("wpe.weight"))
    assert spec.params_m == pytest.approx(total / 1e6, rel=2e-3)
    assert spec.embed_m == pytest.approx(embed / 1e6, rel=2e-3)
    assert spec.vocab == model.config.vocab_size


def test_memory_estimate_keeps_unquantised_embeddings_in_float32():
    spec = get_spec("qwen2.5-0.5b-instruct")
    bf16, q4 = memory_estimate_gb(spec, "none"), memory_estimate_gb(spec, "4bit")
    linear = (spec.params_m - spec.embed_m) * 1e6
    assert q4 == pytest.approx((linear * 0.5 + spec.embed_m * 1e6 * 4) / 2**30)
    assert bf16 == pytest.approx(spec.params_m * 1e6 * 2 / 2**30)
    busy = memory_estimate_gb(spec, "4bit", batch_tokens=1024)
    ckpt = memory_estimate_gb(spec, "4bit", batch_tokens=1024, gradient_checkpointing=True)
    assert q4 < ckpt < busy
    with pytest.raises(ValueError, match="quantization"):
        memory_estimate_gb(spec, "2bit")


def test_tiny_llama_ships_pretrained(tok):
    folder = tiny_llama_dir()
    base = AutoModelForCausalLM.from_pretrained(folder)
    texts = instructions.load_instruction_splits("yahoo", max_test=32)[1]["input"]
    ids = [tok(t, add_special_tokens=False)["input_ids"][:64] for t in texts]
    ids = torch.tensor([x for x in ids if len(x) == 64])
    with torch.no_grad():
        loss = float(base(input_ids=ids, labels=ids).loss)
    # held-out text: far below the uniform vocabulary's perplexity (pretraining happened)
    assert math.exp(loss) < len(tok) / 10
    assert AutoTokenizer.from_pretrained(folder).eos_token == tok.eos_token


def test_tiny_llama_weights_must_match_their_checksum(tmp_path, monkeypatch):
    import shutil

    from fedsoft.task import models

    fake = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir(), fake)
    (fake / "model.safetensors").write_bytes(b"other weights")
    monkeypatch.setattr(models, "TINY_LLAMA_DIR", fake)
    monkeypatch.setattr(models.sys, "path", [])
    with pytest.raises(OSError, match="sha256"):
        models.tiny_llama_dir()


def test_llm_offline_preset_resolves_and_learns(tmp_path):
    cfg = resolve({"preset": "llm-offline", "max-train-examples": 300, "max-test-examples": 40,
                   "local-steps": 10}, ROOT / "conf")
    assert cfg.training.model == "tiny-llama"
    workload.clear_cache()
    work = workload.build_workload(cfg)
    assert work.spec.causal and work.num_classes == 0
    test = workload.test_loader(cfg, work)
    before, _, _ = evaluate(work.runner, test)
    loader, n = workload.train_loader(cfg, work, 0, 2)
    result = train_local(work.runner, loader, steps=10, lr=cfg.training.lr)
    after, _, _ = evaluate(work.runner, test)
    assert n == 150 and result.examples == n  # 10 steps of 16 = one pass over 150
    assert after < before and math.isfinite(after)
    workload.clear_cache()


@pytest.mark.parametrize("values,match", [
    ({"model": "minilm-l6", "packing": True}, "packing"),
    ({"model": "minilm-l6", "quantization": "4bit"}, "quantization"),
    ({"model": "tiny-llama", "frozen-prefix": "cache"}, "frozen-prefix"),
    ({"model": "tiny-llama", "dataset": "cifar100"}, "cifar100"),
    ({"model": "tiny-llama", "max-length": 4}, "max-length = 4"),
    ({"model": "tiny-llama", "max-length": 600}, "512 positions"),
])
def test_causal_only_keys_are_refused_elsewhere(values, match):
    workload.clear_cache()
    with pytest.raises(ValueError, match=match):
        workload.build_workload(RunConfig.from_flat({"max-train-examples": 50, **values}))


def test_new_keys_are_checked():
    for key, bad in (("quantization", "3bit"), ("packing", "yes"), ("prompt-template", "x"),
                     ("gradient-checkpointing", 1)):
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_flat({key: bad})


@pytest.mark.parametrize("kw,match", [
    ({"target_modules": ["all-linear", "q_proj"]}, "stands alone"),
    ({"modules_to_save": ["q_proj"]}, "also in lora-target-modules"),
])
def test_conflicting_lora_layouts_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        build_model(get_spec("tiny-llama"), 0, 4, 8.0, **kw)


def test_hub_checkpoint_in_bf16_loads_in_float32_on_cpu(tmp_path, tok):
    _tiny_causal("qwen2", len(tok)).to(torch.bfloat16).save_pretrained(tmp_path)
    model = build_model(get_spec("qwen2.5-0.5b-instruct"), 0, 4, 8.0, source=tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("preset", ["llm-flowertune", "llm-commonsense"])
def test_hub_llm_presets_resolve_to_causal_lms_on_instruction_sets(preset):
    cfg = resolve({"preset": preset}, ROOT / "conf")
    assert get_spec(cfg.training.model).causal
    assert instructions.is_instruction_set(cfg.training.dataset)
    config = layout_model(cfg.training.model, meta=True).config
    assert cfg.training.max_length <= config.max_position_embeddings


@pytest.mark.parametrize("sparsifier", ["soft", "flasc", "rlora", "hetlora", "fedlodrop"])
def test_every_sparsifier_round_trips_on_the_causal_lm(sparsifier):
    """A client's round on tiny-llama with each sparsifier: the server decodes exactly the
    budget, and the decoded update is the sent one (error feedback keeps the rest)."""
    from fedsoft.client_update import local_round
    from fedsoft.compression.sparsifiers import keep_count
    from fedsoft.compression.update import SparseSettings, decode_update
    from fedsoft.layout import layer_specs

    cfg = resolve({"preset": "llm-offline", "max-train-examples": 100, "max-test-examples": 20,
                   "local-steps": 2, "sparsifier": sparsifier, "sparsity": 0.9, "zeta": 0.01},
                  ROOT / "conf")
    workload.clear_cache()
    global_arrays = lora.to_arrays(workload.build_workload(cfg).model)
    payload, metrics, ef = local_round(cfg, global_arrays, 0, 2, 1, node_id=5)
    full = decode_update(payload, global_arrays, SparseSettings.from_config(cfg),
                         server_round=1, node_id=5)
    assert set(full) == set(global_arrays) and ef
    for spec in layer_specs(global_arrays):
        moved = np.count_nonzero(np.concatenate([
            (full[spec.name + ".lora_A"] - global_arrays[spec.name + ".lora_A"]).ravel(),
            (full[spec.name + ".lora_B"] - global_arrays[spec.name + ".lora_B"]).ravel()]))
        assert moved <= keep_count(spec.r, spec.d, spec.k, 0.9)
    assert metrics["orth-loss"] > 0 and metrics["steps"] == 2
    workload.clear_cache()
