"""The files peftkit ships beside its code: method presets (adapters/), task recipes (recipes/)
and the benchmark tables and reference scripts (benchmarks/).

    shipped("recipes") / "sentiment-lora.yaml"

In a source checkout they are the repository's top-level folders, where users read and edit
them. A wheel carries the same files under peftkit/share/ (pyproject.toml maps each folder
there as package data, so there is one copy in the repository), and an installed peftkit reads
them from there, from any folder.
"""
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
PACKAGED = Path(__file__).resolve().parent / "share"


def shipped_root() -> Path:
    """The folder the shipped files' paths are relative to (benchmark files name `recipes/...`)."""
    return CHECKOUT if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "adapters").is_dir() else PACKAGED


def shipped(folder: str) -> Path:
    return shipped_root() / folder
