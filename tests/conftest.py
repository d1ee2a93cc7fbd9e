"""Shared test setup: offline hub, quiet logs, small tiny-model builders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

torch.set_num_threads(2)


def tiny_backbone(arch: str, num_labels: int = 4):
    """A randomly initialised model of ``arch`` small enough for unit tests."""
    torch.manual_seed(0)
    if arch == "bert":
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
        return BertForSequenceClassification(cfg)
    if arch == "distilbert":
        cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                               num_labels=num_labels)
        return DistilBertForSequenceClassification(cfg)
    if arch == "vit":
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=10, num_attention_heads=2,
                        intermediate_size=64, image_size=32, patch_size=8, num_labels=num_labels)
        return ViTForImageClassification(cfg)
    raise ValueError(arch)


@pytest.fixture
def tiny_dir(tmp_path_factory):
    """Save a tiny backbone to a local directory, as the hub would serve it."""

    def make(arch: str, num_labels: int = 4):
        path = tmp_path_factory.mktemp(arch)
        tiny_backbone(arch, num_labels).save_pretrained(path)
        return path

    return make
