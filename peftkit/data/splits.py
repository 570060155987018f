"""Deterministic train/validation/test assignment shared by every embedded dataset.

An item's split comes from a sha256 of its own (normalized) text, so it never
depends on the other items, on file order, on Python's hash seed or on the
machine: adding or removing one item moves no other item between splits.
"""
import hashlib

from datasets import Dataset, DatasetDict, Features

SPLITS = ("train", "validation", "test")


def normalize(text: str) -> str:
    """Collapse all whitespace runs to one space: the key used for dedup and hashing."""
    return " ".join(text.split())


def stable_hash(key: str) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16)


def split_of(key: str) -> str:
    """80/10/10 by hash bucket."""
    bucket = stable_hash(key) % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


def to_dataset_dict(rows: list[dict], features: Features, split_key: str = "_split",
                    order_key: str = "_order") -> DatasetDict:
    """Group rows by row[split_key]; order each split by row[order_key] (a hash), so the
    order is shuffled (no class or topic runs) yet fixed. Helper keys are dropped."""
    out = {}
    for split in SPLITS:
        chosen = sorted((r for r in rows if r[split_key] == split), key=lambda r: r[order_key])
        columns = {name: [r[name] for r in chosen] for name in features}
        out[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(out)
