"""load_squad_json: a user's own SQuAD-format file as a Dataset in bbc_qa's columns.

Accepts the official nested layout

    {"data": [{"title": ..., "paragraphs": [{"context": ..., "qas": [
        {"id": ..., "question": ..., "answers": [{"text": ..., "answer_start": ...}]}]}]}]}

and the flat layout of the Hugging Face squad dataset: a JSON list of records
with id, title, context, question and answers {"text": [...], "answer_start": [...]}.
id and title are optional (defaults "q<n>" and ""). Every answer must be a span of
its context at answer_start; SQuAD 2.0 unanswerable questions keep empty answers.
"""
import json
from pathlib import Path

from datasets import Dataset, Features, List, Value

from peftkit.errors import PeftkitError

# The columns of Hugging Face's squad dataset, shared with bbc_qa.
FEATURES = Features({
    "id": Value("string"), "title": Value("string"), "context": Value("string"),
    "question": Value("string"),
    "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
})


def load_squad_json(path) -> Dataset:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PeftkitError(f"{path}: no such SQuAD file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftkitError(f"{path}: not valid UTF-8 JSON ({e})") from None
    if isinstance(raw, dict) and "data" in raw:
        records = list(_flatten(raw["data"], path))
    elif isinstance(raw, list):
        records = [_flat_record(r, f"[{i}]", path) for i, r in enumerate(raw)]
    else:
        raise PeftkitError(f"{path}: expected an object with a \"data\" list (SQuAD layout) "
                           f"or a list of question records, got {type(raw).__name__}")
    if not records:
        raise PeftkitError(f"{path}: holds no questions")
    for i, r in enumerate(records):
        r["id"] = r["id"] or f"q{i}"
        if not r["question"].strip() or not r["context"].strip():
            raise PeftkitError(f"{path}: question {r['id']!r}: empty question or context")
        for text, start in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            if r["context"][start:start + len(text)] != text:
                found = r["context"][start:start + len(text)]
                raise PeftkitError(f"{path}: question {r['id']!r}: answer {text!r} is not at answer_start "
                                   f"{start} of its context (found {found!r} there)")
    return Dataset.from_list(records, features=FEATURES)


def _flatten(data, path):
    _expect(data, list, "data", path)
    for i, article in enumerate(data):
        where = f"data[{i}]"
        _expect(article, dict, where, path)
        for j, par in enumerate(_get(article, "paragraphs", list, where, path)):
            pwhere = f"{where}.paragraphs[{j}]"
            _expect(par, dict, pwhere, path)
            context = _get(par, "context", str, pwhere, path)
            for k, qa in enumerate(_get(par, "qas", list, pwhere, path)):
                qwhere = f"{pwhere}.qas[{k}]"
                _expect(qa, dict, qwhere, path)
                answers = _get(qa, "answers", list, qwhere, path)
                for n, a in enumerate(answers):
                    _expect(a, dict, f"{qwhere}.answers[{n}]", path)
                    _get(a, "text", str, f"{qwhere}.answers[{n}]", path)
                    _get(a, "answer_start", int, f"{qwhere}.answers[{n}]", path)
                yield {"id": str(qa.get("id", "")), "title": str(article.get("title", "")), "context": context,
                       "question": _get(qa, "question", str, qwhere, path),
                       "answers": {"text": [a["text"] for a in answers],
                                   "answer_start": [a["answer_start"] for a in answers]}}


def _flat_record(r, where, path):
    _expect(r, dict, where, path)
    answers = _get(r, "answers", dict, where, path)
    texts = _get(answers, "text", list, f"{where}.answers", path)
    starts = _get(answers, "answer_start", list, f"{where}.answers", path)
    if len(texts) != len(starts) or not all(isinstance(t, str) for t in texts) \
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in starts):
        raise PeftkitError(f"{path}: {where}.answers: \"text\" (strings) and \"answer_start\" (integers) "
                           f"must be lists of the same length")
    return {"id": str(r.get("id", "")), "title": str(r.get("title", "")),
            "context": _get(r, "context", str, where, path), "question": _get(r, "question", str, where, path),
            "answers": {"text": texts, "answer_start": starts}}


def _get(obj, key, kind, where, path):
    if key not in obj:
        raise PeftkitError(f"{path}: {where}: missing \"{key}\"")
    _expect(obj[key], kind, f"{where}.{key}", path)
    return obj[key]


def _expect(value, kind, where, path):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PeftkitError(f"{path}: {where}: expected {kind.__name__}, got {type(value).__name__}")
