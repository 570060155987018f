"""bbc_headlines: write the headline of a BBC News article from its body.

Same articles and same split per article as bbc_topic and bbc_qa.
"""
from datasets import Features, Value

from .bbc import articles
from .splits import to_dataset_dict

FEATURES = Features({"article": Value("string"), "headline": Value("string")})


def build():
    rows = [{"article": a["body"], "headline": a["headline"], "_split": a["split"], "_order": a["order"]}
            for a in articles()]
    return to_dataset_dict(rows, FEATURES)
