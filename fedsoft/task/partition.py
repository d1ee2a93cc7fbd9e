"""Non-IID partitions of a training split (flwr-datasets partitioners): iid, Dirichlet over
labels, label shards (paper A Sec. III, Figs. 5-6), cached per process."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset

if TYPE_CHECKING:  # flwr_datasets pulls in matplotlib/seaborn (~4 s): imported when first used
    from flwr_datasets.partitioner import Partitioner

PARTITIONERS = ("iid", "dirichlet", "shard")


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)

_PARTITIONER_CACHE: dict[tuple[Any, ...], Partitioner] = {}
# (partitioner key, partition id) -> that partition: a node reuses it every round
_PARTITION_CACHE: dict[tuple[Any, ...], Dataset] = {}


def clear_caches() -> None:
    """Forget cached partitioners and partitions."""
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
