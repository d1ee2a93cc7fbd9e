"""One node's workload from a resolved run config: the LoRA model and its data loaders."""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING
from typing import Any

import torch

from fedsoft.config import ConfigLike, RunConfig, parse_int_list, parse_list
from fedsoft.logs import log
from fedsoft.task import data, instructions, prefix
from fedsoft.task import partition as partitioning
from fedsoft.task.collate import make_collate, make_loader
from fedsoft.task.models import (
    ModelSpec,
    build_model,
    get_spec,
    load_preprocessor,
    pick_device,
)


@dataclass
class Workload:
    """A LoRA-wrapped model plus the collate function that feeds it; ``runner`` is what the
    loaders' batches are fed to (the model, or its upper blocks with ``frozen-prefix``)."""

    spec: ModelSpec
    model: torch.nn.Module
    collate: Any
    num_classes: int
    runner: torch.nn.Module | None = None
    prefix_start: int = 0
    eval_collate: Any = None  # evaluation's batches (unpacked), when they differ from training's

    def __post_init__(self) -> None:
        if self.runner is None:
            self.runner = self.model
        if self.eval_collate is None:
            self.eval_collate = self.collate


_MODEL_KEYS = ("model", "dataset", "lora-rank", "lora-alpha", "lora-target-modules",
               "lora-layers", "seed", "max-length", "image-size", "frozen-prefix",
               "modules-to-save", "quantization", "gradient-checkpointing", "packing",
               "device")
_CACHE: dict[tuple, Workload] = {}


def build_workload(cfg: ConfigLike) -> Workload:
    """Build (once per process) the model and collate function named by the run config.

    The model is cached: callers overwrite its LoRA factors and head every round, so one
    instance per Ray actor / SuperNode process is enough.
    """
    cfg = RunConfig.coerce(cfg)
    key = tuple(cfg[k] for k in _MODEL_KEYS)
    if key in _CACHE:
        return _CACHE[key]
    spec = get_spec(cfg.training.model)
    t = cfg.training
    if spec.causal:
        work = _causal_workload(cfg, spec)
    else:
        dspec = data.get_dataset_spec(t.dataset)
        if dspec.modality != spec.modality:
            raise ValueError(
                f"dataset = {t.dataset!r} is {dspec.modality} data but model = "
                f"{t.model!r} takes {spec.modality} input"
            )
        for name, used in (("quantization", t.quantization != "none"),
                           ("packing", t.packing)):
            if used:
                raise ValueError(f"{name} = {getattr(t, name)!r}: only for causal LMs, not "
                                 f"model = {t.model!r}")
        model = build_model(
            spec,
            dspec.num_classes,
            t.lora_rank,
            t.lora_alpha,
            target_modules=parse_list(t.lora_target_modules) or None,
            layers=parse_int_list(t.lora_layers) or None,
            seed=cfg.run.seed,
            modules_to_save=parse_list(t.modules_to_save) or None,
            gradient_checkpointing=t.gradient_checkpointing,
        )
        pre = load_preprocessor(spec)
        if spec.modality == "text":
            collate = make_collate("text", tokenizer=pre, max_length=t.max_length)
        else:
            collate = make_collate(
                "image", image_size=t.image_size,
                image_mean=tuple(pre.image_mean), image_std=tuple(pre.image_std),
            )
        work = Workload(spec, model, collate, dspec.num_classes)
    if t.frozen_prefix == "cache":
        if spec.causal:
            raise ValueError(f"frozen-prefix = 'cache': BERT-family classifiers only, not the "
                             f"causal LM {t.model!r}")
        start = prefix.first_lora_block(work.model)
        work.runner, work.prefix_start = prefix.PrefixModel(work.model, start), start
    _CACHE.clear()
    prefix.clear_cache()
    _CACHE[key] = work
    return work


def _causal_workload(cfg: RunConfig, spec: ModelSpec) -> Workload:
    """A causal LM under LoRA on instruction data (a hub set, or a classification set recast)."""
    t = cfg.training
    if instructions.is_instruction_set(t.dataset):
        if cfg.partitioning.partitioner != "iid":
            raise ValueError(f"partitioner = {cfg.partitioning.partitioner!r}: the instruction "
                             f"set {t.dataset!r} has no classes to split by; use 'iid'")
    else:
        dspec = data.get_dataset_spec(t.dataset)
        if dspec.modality != "text":
            raise ValueError(f"dataset = {t.dataset!r} is {dspec.modality} data; a causal LM "
                             "needs text (instruction sets, or text classes recast)")
    device = pick_device(cfg.run.device).type
    model = build_model(
        spec, 0, t.lora_rank, t.lora_alpha,
        target_modules=parse_list(t.lora_target_modules) or None,
        layers=parse_int_list(t.lora_layers) or None,
        seed=cfg.run.seed,
        modules_to_save=parse_list(t.modules_to_save) or None,
        quantization=t.quantization,
        gradient_checkpointing=t.gradient_checkpointing,
        device=device,
    )
    limit = next((getattr(model.config, k) for k in ("max_position_embeddings", "n_positions")
                  if isinstance(getattr(model.config, k, None), int)), None)
    if limit is not None and t.max_length > limit:
        raise ValueError(f"max-length = {t.max_length}: {t.model!r} has {limit} positions")
    if t.max_length < 8:
        raise ValueError(f"max-length = {t.max_length}: a causal LM needs room for a prompt "
                         "and a response (>= 8 tokens)")
    tok = load_preprocessor(spec)
    collate = make_collate("causal-lm", tokenizer=tok, max_length=t.max_length,
                           packing=t.packing)
    plain = (make_collate("causal-lm", tokenizer=tok, max_length=t.max_length)
             if t.packing else collate)
    return Workload(spec, model, collate, 0, eval_collate=plain)


def clear_cache() -> None:
    """Forget the cached model, so the next :func:`build_workload` builds a fresh one from the
    seed (e.g. after the calibration pilot trained the cached instance)."""
    _CACHE.clear()
    prefix.clear_cache()


def splits(cfg: ConfigLike):
    """Train and held-out test splits (capped as configured)."""
    cfg = RunConfig.coerce(cfg)
    if get_spec(cfg.training.model).causal:
        return instructions.load_instruction_splits(
            cfg.training.dataset, template=cfg.training.prompt_template,
            max_train=cfg.training.max_train_examples or None,
            max_test=cfg.training.max_test_examples or None, seed=cfg.run.seed)
    return data.load_splits(
        cfg.training.dataset,
        max_train=cfg.training.max_train_examples or None,
        max_test=cfg.training.max_test_examples or None,
        seed=cfg.run.seed,
    )


def train_loader(cfg: ConfigLike, work: Workload, partition_id: int, num_partitions: int,
                 round_seed: int = 0):
    """Loader over this node's partition (flwr-datasets partitioner), shuffled per round."""
    cfg = RunConfig.coerce(cfg)
    train, _ = splits(cfg)
    part = partitioning.partition(
        train,
        cfg.partitioning.partitioner,
        num_partitions,
        partition_id,
        seed=cfg.run.seed,
        dirichlet_alpha=cfg.partitioning.dirichlet_alpha,
        shards_per_client=cfg.partitioning.shards_per_client,
    )
    seed = cfg.run.seed * 100_003 + round_seed
    if work.prefix_start:
        key = ("train", cfg.training.dataset, cfg.training.max_train_examples,
               cfg.partitioning.partitioner, cfg.partitioning.dirichlet_alpha,
               cfg.partitioning.shards_per_client, cfg.run.seed, num_partitions, partition_id)
        return prefix.cached_loader(key, work.model, work.prefix_start, part, work.collate,
                                    cfg.training.max_length, cfg.training.batch_size,
                                    shuffle=True, seed=seed), len(part)
    return make_loader(part, work.collate, cfg.training.batch_size, shuffle=True,
                       seed=seed), len(part)


def test_loader(cfg: ConfigLike, work: Workload):
    """Loader over the held-out test split, for server-side evaluation."""
    cfg = RunConfig.coerce(cfg)
    _, test = splits(cfg)
    if work.prefix_start:
        key = ("test", cfg.training.dataset, cfg.training.max_test_examples, cfg.run.seed)
        return prefix.cached_loader(key, work.model, work.prefix_start, test, work.collate,
                                    cfg.training.max_length, cfg.training.eval_batch_size,
                                    shuffle=False, seed=0)
    return make_loader(test, work.eval_collate, cfg.training.eval_batch_size, shuffle=False,
                       seed=0)


def server_partition_sizes(cfg: ConfigLike, num_partitions: int | None) -> dict[int, int]:
    """Examples per partition as the clients' partitioner makes them: the server-known weights
    of eq. (5). Empty (weights then come from the replies, capped) when the nodes did not agree
    on a partition count or the split cannot be made (e.g. more partitions than examples),
    with a logged warning: a partition count is what the nodes said, so it may be hostile."""
    cfg = RunConfig.coerce(cfg)
    if not num_partitions:
        return {}
    try:
        train, _ = splits(cfg)
        if not 1 <= int(num_partitions) <= len(train):
            raise ValueError(f"{num_partitions} partitions of {len(train)} examples")
        sizes = partitioning.partition_sizes(
            train, cfg.partitioning.partitioner, int(num_partitions), seed=cfg.run.seed,
            dirichlet_alpha=cfg.partitioning.dirichlet_alpha,
            shards_per_client=cfg.partitioning.shards_per_client,
        )
    except Exception as exc:  # noqa: BLE001 - an unusable count only costs the known weights
        log(WARNING,
            "server-known data shares unavailable (%s: %s): weights come from the replies, "
            "capped at max-num-examples", type(exc).__name__, exc)
        return {}
    return dict(enumerate(int(n) for n in sizes))
