"""bbc_topic: 5-way topic classification of BBC News articles.

text = headline + blank line + body: the headline is part of the real article and
a strong topic cue, as in other news-topic sets (AG News uses title + description).
Recipes truncate long articles to their max length, so the headline comes first.
"""
from datasets import ClassLabel, Features, Value

from .bbc import TOPICS, articles
from .splits import to_dataset_dict

FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=TOPICS)})


def build():
    rows = [{"text": f"{a['headline']}\n\n{a['body']}", "label": TOPICS.index(a["topic"]),
             "_split": a["split"], "_order": a["order"]} for a in articles()]
    return to_dataset_dict(rows, FEATURES)
