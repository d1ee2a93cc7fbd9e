"""Model registry: real loading code on tiny local models; only LoRA + head train."""

import pytest
import torch

from fedsoft import lora
from fedsoft.task.models import MODELS, build_model, get_spec

HUB_ARCH = {"distilbert-base-uncased": "distilbert", "vit-base-patch16-224-in21k": "vit"}


@pytest.mark.parametrize("name", sorted(HUB_ARCH))
def test_hub_spec_builds_tiny_local_model(name, tiny_dir):
    spec = get_spec(name)
    src = tiny_dir(HUB_ARCH[name], num_labels=5)
    model = build_model(spec, 5, rank=4, alpha=8.0, source=src, seed=1)
    names = [n for n, _ in lora.lora_modules(model)]
    assert names, "no LoRA layers"
    assert all(n.rsplit(".", 1)[-1] in spec.target_modules for n in names)
    if spec.layers_to_transform:
        blocks = sorted({int(n.split(".")[2]) for n in names})
        assert blocks == sorted(spec.layers_to_transform)
        assert len(names) == 2 * len(spec.layers_to_transform)  # q and v per block
    trainable = lora.trainable_names(model)
    assert all(("lora_" in n) or ("modules_to_save" in n) for n in trainable)
    heads = {h for h, _ in lora.head_modules(model)}
    assert heads == set(spec.head_modules)
    for n, p in model.named_parameters():
        if "lora_" not in n and "modules_to_save" not in n:
            assert not p.requires_grad, n


def test_offline_default_counts_trainable_parameters():
    spec = get_spec("minilm-l6")
    model = build_model(spec, 10, rank=8, alpha=16.0)
    shapes = lora.factor_shapes(model)
    expected = sum(s.r * (s.d + s.k) for s in shapes)
    head = model.base_model.model.classifier.modules_to_save["default"]
    expected += sum(p.numel() for p in head.parameters())
    got = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert got == expected
    assert len(shapes) == 12 and all(s.r == 8 for s in shapes)  # 6 layers x (query, value)


def test_same_seed_same_initial_weights(tiny_dir):
    src = tiny_dir("bert")
    spec = get_spec("minilm-l6")
    a = lora.to_arrays(build_model(spec, 4, 4, 8.0, source=src, seed=3))
    b = lora.to_arrays(build_model(spec, 4, 4, 8.0, source=src, seed=3))
    c = lora.to_arrays(build_model(spec, 4, 4, 8.0, source=src, seed=4))
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)
    # LoRA starts at the pretrained model: B = 0 (eq. 1)
    assert all(not a[k].any() for k in a if k.endswith(".lora_B"))


def test_unknown_model_and_offline_hub_errors():
    with pytest.raises(ValueError, match="model = 'nope'"):
        get_spec("nope")
    with pytest.raises(OSError, match="hub"):
        build_model(MODELS["distilbert-base-uncased"], 4, 4, 8.0)


def test_bad_targets_name_the_field(tiny_dir):
    with pytest.raises(ValueError, match="lora-target-modules"):
        build_model(get_spec("minilm-l6"), 4, 4, 8.0, source=tiny_dir("bert"),
                    target_modules=["nonexistent"])
    with pytest.raises(ValueError, match="lora-rank"):
        build_model(get_spec("minilm-l6"), 4, 0, 8.0, source=tiny_dir("bert"))


def test_forward_changes_only_after_lora_update(tiny_dir):
    model = build_model(get_spec("minilm-l6"), 4, 4, 8.0, source=tiny_dir("bert"))
    x = {"input_ids": torch.randint(0, 100, (2, 7)),
         "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    before = model(**x).logits.detach()
    with torch.no_grad():
        model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight.add_(1.0)
    after = model(**x).logits.detach()
    assert not torch.allclose(before, after)
