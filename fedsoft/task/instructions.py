"""Instruction data for causal LMs: hub sets, classification sets recast, prompt templates."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

from fedsoft.task import data

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.")
TEMPLATES = ("alpaca", "short")
COLUMNS = ("prefix", "input", "suffix", "response", "label")
_MAX_OPTIONS = 20  # alpaca: the answer options are listed up to this many classes


@dataclass(frozen=True)
class InstructionSpec:
    """A hub instruction set: its loader and which columns hold instruction, input, response.

    ``held_out`` rows of the train split (seeded) are the test split when the source has none.
    """

    name: str
    hub_id: str
    instruction: str
    response: str
    input: str | None = None
    test_split: str | None = None
    held_out: int = 1000
    notes: str = ""

    def loader(self) -> Callable[[str, Path], Dataset]:
        return functools.partial(data._load_hub_split, self.hub_id)


INSTRUCTION_SETS: dict[str, InstructionSpec] = {
    "alpaca-gpt4": InstructionSpec(
        "alpaca-gpt4", "flwrlabs/alpaca-gpt4", "instruction", "output", "input",
        notes="FlowerTune-LLM general NLP (52k GPT-4 Alpaca answers)"),
    "commonsense-170k": InstructionSpec(
        "commonsense-170k", "zwhe99/commonsense_170k", "instruction", "output", "input",
        notes="paper B's setting (FSLoRA / LLM-Adapters commonsense reasoning mix: BoolQ, "
              "PIQA, SIQA, HellaSwag, WinoGrande, ARC-e/c, OBQA)"),
}


def is_instruction_set(name: str) -> bool:
    """``name`` is a hub instruction set (not a classification set to recast)."""
    return isinstance(name, str) and name.strip().lower() in INSTRUCTION_SETS


def template_parts(instruction: str, template: str) -> tuple[str, str]:
    """(prefix, suffix) around the input text: Alpaca as FlowerTune writes it, or ``short``
    (no preamble, for small context windows). The collate joins ``suffix + " " + response``,
    so the response's first word is tokenised as in running text."""
    if template not in TEMPLATES:
        raise ValueError(f"prompt-template = {template!r}: must be one of {TEMPLATES}")
    head = f"{ALPACA_PREAMBLE}\n" if template == "alpaca" else ""
    return f"{head}### Instruction:\n{instruction}\n### Input:\n", "\n### Response:"


def answer_name(label: str) -> str:
    """A label as the model should write it: ``card_arrival`` -> ``card arrival``."""
    return " ".join(str(label).replace("_", " ").split())


def recast(ds: Dataset, names: list[str], template: str = "short") -> Dataset:
    """A standardized classification split (``text``, ``label``) as instructions: the answer is
    the class name; ``label`` is kept, so partitioners and stratified caps still apply."""
    answers = [answer_name(n) for n in names]
    listed = template == "alpaca" and len(answers) <= _MAX_OPTIONS  # short: fits small windows
    options = f" Options: {', '.join(answers)}." if listed else ""
    prefix, suffix = template_parts(f"Name the topic of this text.{options}", template)
    labels = np.asarray(ds["label"][:], dtype=np.int64)
    return Dataset.from_dict(
        {"prefix": [prefix] * len(ds), "input": list(ds["text"][:]),
         "suffix": [suffix] * len(ds), "response": [answers[i] for i in labels],
         "label": labels.tolist()},
        features=_features(ClassLabel(names=list(names))))


def _features(label: ClassLabel) -> Features:
    return Features({"prefix": Value("string"), "input": Value("string"),
                     "suffix": Value("string"), "response": Value("string"), "label": label})


def standardize_instructions(ds: Dataset, spec: InstructionSpec, template: str) -> Dataset:
    """A raw hub split in ``spec``'s schema -> the ``COLUMNS`` schema (``label`` is 0: no
    classes, so only the IID partitioner applies)."""
    needed = [c for c in (spec.instruction, spec.response, spec.input) if c]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset {spec.name!r}: columns {missing} missing; columns: "
                         f"{ds.column_names}")
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    inputs = ds[spec.input][:] if spec.input else [""] * len(ds)
    for ins, inp, resp in zip(ds[spec.instruction][:], inputs, ds[spec.response][:],
                              strict=True):
        if not isinstance(ins, str) or not isinstance(resp, str):
            raise TypeError(f"dataset {spec.name!r}: instruction and response must be text")
        inp = inp if isinstance(inp, str) else ""
        prefix, suffix = template_parts(ins.strip(), template)
        if not inp.strip():  # no input: the instruction runs straight into the response
            prefix = prefix[: -len("\n### Input:\n")] + "\n"
        rows["prefix"].append(prefix)
        rows["input"].append(inp)
        rows["suffix"].append(suffix.lstrip("\n") if not inp.strip() else suffix)
        rows["response"].append(resp.strip())
        rows["label"].append(0)
    return Dataset.from_dict(rows, features=_features(ClassLabel(names=["any"])))


_CACHE: dict[tuple, tuple[Dataset, Dataset]] = {}


def load_instruction_splits(name: str, *, template: str = "short", max_train: int | None = None,
                            max_test: int | None = None, seed: int = 0,
                            cache_dir: str | None = None) -> tuple[Dataset, Dataset]:
    """``(train, test)`` in the ``COLUMNS`` schema: a hub instruction set (test = its test
    split, else ``held_out`` seeded rows of train), or a classification set recast."""
    key = (name, template, max_train, max_test, seed, cache_dir)
    if key in _CACHE:
        return _CACHE[key]
    if is_instruction_set(name):
        spec = INSTRUCTION_SETS[name.strip().lower()]
        cdir = data.resolve_cache_dir(cache_dir)
        raw = spec.loader()("train", cdir)
        if spec.test_split:
            raw_test = spec.loader()(spec.test_split, cdir)
        else:
            order = np.random.default_rng(seed).permutation(len(raw))
            held = min(spec.held_out, max(1, len(raw) // 10))
            raw_test = raw.select(np.sort(order[:held]).tolist())
            raw = raw.select(np.sort(order[held:]).tolist())
        train = standardize_instructions(raw, spec, template)
        test = standardize_instructions(raw_test, spec, template)
        train = data.subsample(train, max_train, seed)
        test = data.subsample(test, max_test, seed)
    else:
        train, test = data.load_splits(name, max_train=max_train, max_test=max_test, seed=seed,
                                       cache_dir=cache_dir)
        names = list(train.features["label"].names)
        train, test = recast(train, names, template), recast(test, names, template)
    _CACHE[key] = (train, test)
    return train, test


def clear_cache() -> None:
    """Forget the recast splits (tests)."""
    _CACHE.clear()
