"""The embedded datasets: counts, labels, split hygiene, QA spans, determinism, SQuAD loader."""
import json
import re

import pytest

from peftkit.data import EMBEDDED_DATASETS, load_embedded, load_squad_json
from peftkit.data import bbc, bbc_qa
from peftkit.data.splits import SPLITS
from peftkit.errors import PeftkitError

# Exact counts pin the sources, the dedup and the hash split: a change here means
# the data every benchmark number was measured on has changed.
COUNTS = {
    "rotten_tomatoes": {"train": 10162, "validation": 1319, "test": 1268},
    "bbc_topic": {"train": 1687, "validation": 215, "test": 187},
    "bbc_headlines": {"train": 1687, "validation": 215, "test": 187},
    "bbc_qa": {"train": 4755, "validation": 560, "test": 490},
}


@pytest.fixture(scope="module")
def built():
    return {name: load_embedded(name) for name in EMBEDDED_DATASETS}


def _no_overlap(ds, column):
    seen = {split: set(ds[split][column]) for split in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not seen[a] & seen[b], f"{column} shared by {a} and {b}"


@pytest.mark.parametrize("name", COUNTS)
def test_counts(built, name):
    assert {s: len(built[name][s]) for s in SPLITS} == COUNTS[name]


def test_rotten_tomatoes(built):
    ds = built["rotten_tomatoes"]
    assert ds["train"].features["label"].names == ["rotten", "fresh"]
    _no_overlap(ds, "text")
    texts = [t for s in SPLITS for t in ds[s]["text"]]
    labels = [y for s in SPLITS for y in ds[s]["label"]]
    # The source has 7,403 fresh and 5,405 rotten rows; dedup drops 59, no plot rows remain.
    assert len(texts) == 12749 and labels.count(1) == 7367 and labels.count(0) == 5382
    keys = [" ".join(re.findall(r"\w+", t.lower())) for t in texts]
    assert len(set(keys)) == len(keys)
    for s in SPLITS:
        assert set(ds[s]["label"]) == {0, 1}


def test_bbc_topic(built):
    ds = built["bbc_topic"]
    assert ds["train"].features["label"].names == ["business", "entertainment", "politics", "sport", "tech"]
    _no_overlap(ds, "text")
    for s in SPLITS:
        assert set(ds[s]["label"]) == set(range(5))
    # 2,225 files hold 136 exact duplicate bodies (some under a reworded headline).
    bodies = [t.split("\n\n", 1)[1] for s in SPLITS for t in ds[s]["text"]]
    assert len(bodies) == len(set(bodies)) == 2089
    assert all("\ufffd" not in b for b in bodies)  # the one cp1252 file decoded, no replacement chars
    assert any("£15.8m signing from Parma" in b for b in bodies)


def test_bbc_headlines_agree_with_topic(built):
    heads, topic = built["bbc_headlines"], built["bbc_topic"]
    for s in SPLITS:
        assert set(heads[s]["article"]) == {t.split("\n\n", 1)[1] for t in topic[s]["text"]}
        assert all(h.strip() and "\n" not in h for h in heads[s]["headline"])
    _no_overlap(heads, "article")


def test_bbc_qa(built):
    ds = built["bbc_qa"]
    assert len(ds["train"]) >= 1500 and len(ds["validation"]) >= 300 and len(ds["test"]) >= 300
    _no_overlap(ds, "context")
    _no_overlap(ds, "question")
    # The same article split as bbc_headlines/bbc_topic: ids name the article, and no
    # real paragraph of a passage (10+ words; short ones are datelines like "2000 GMT")
    # occurs in an article of another split.
    article_split = {a["id"]: a["split"] for a in bbc.articles()}
    splits_of_paragraph = {}
    for s in SPLITS:
        for article in built["bbc_headlines"][s]["article"]:
            for p in article.split("\n\n"):
                splits_of_paragraph.setdefault(p, set()).add(s)
    for s in SPLITS:
        ids = ds[s]["id"]
        assert len(set(ids)) == len(ids)
        for row in ds[s]:
            ctx, q, answers = row["context"], row["question"], row["answers"]
            assert len(answers["text"]) == len(answers["answer_start"]) == 1
            text, start = answers["text"][0], answers["answer_start"][0]
            assert ctx[start:start + len(text)] == text and ctx.count(text) == 1
            assert q.strip() and q.endswith("?") and text not in q
            assert q not in ctx and q[:-1] + "." not in ctx  # not a sentence of its passage
            assert article_split[row["id"].rsplit("/", 2)[0]] == s
            assert all(splits_of_paragraph[p] == {s} for p in ctx.split("\n\n") if len(p.split()) >= 10)


def test_determinism(built):
    bbc.articles.cache_clear()  # really rebuild the article table, not reuse it
    for name in ("rotten_tomatoes", "bbc_qa"):
        again = load_embedded(name)
        for s in SPLITS:
            assert again[s].to_dict() == built[name][s].to_dict(), (name, s)


def test_passages_and_sentences():
    long, short, longer = " ".join(["word"] * 130), "Mr Smith went home. He slept.", " ".join(["word"] * 200)
    # whole paragraphs, 120..300 words a window
    assert bbc_qa.passages("\n\n".join([long, short, longer])) == [long + "\n\n" + short, longer]
    sents = [s for _, s in bbc_qa.sentences('Mr Smith paid $5m. "It was fair," he said. Then J. Doe left.')]
    assert sents == ["Mr Smith paid $5m.", '"It was fair," he said.', "Then J. Doe left."]


def test_unknown_name():
    with pytest.raises(PeftkitError, match="rotten_tomatoes, bbc_topic, bbc_headlines, bbc_qa"):
        load_embedded("squad")


NESTED = {"data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
    {"id": "a", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
    {"id": "b", "question": "Is it big?", "answers": []}]}]}]}


def test_squad_json(tmp_path):
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps(NESTED))
    ds = load_squad_json(nested)
    assert ds.column_names == ["id", "title", "context", "question", "answers"]
    assert ds[0]["answers"] == {"text": ["France"], "answer_start": [12]} and ds[1]["answers"]["text"] == []
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps([{"context": "Paris is in France.", "question": "Where is Paris?",
                                 "answers": {"text": ["France"], "answer_start": [12]}}]))
    row = load_squad_json(flat)[0]
    assert row["id"] == "q0" and row["title"] == "" and row["answers"]["answer_start"] == [12]


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid UTF-8 JSON"),
    ('{"version": 2}', "expected an object"),
    ('{"data": [{"paragraphs": [{"qas": []}]}]}', r'data\[0\]\.paragraphs\[0\]: missing "context"'),
    ('{"data": [{"paragraphs": [{"context": "abc", "qas": [{"question": "q?", "answers": '
     '[{"text": "b", "answer_start": "1"}]}]}]}]}', r"answer_start: expected int, got str"),
    ('{"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "x", "question": "q?", "answers": '
     '[{"text": "c", "answer_start": 1}]}]}]}]}', r"'x': answer 'c' is not at answer_start 1"),
    ('{"data": []}', "holds no questions"),
])
def test_squad_json_malformed(tmp_path, content, problem):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(PeftkitError, match=problem):
        load_squad_json(bad)
    with pytest.raises(PeftkitError, match="no such SQuAD file"):
        load_squad_json(tmp_path / "missing.json")
