"""Extractive question answering, SQuAD style: a question and a context in,
a span of the context out; exact match and F1 with SQuAD's normalisation.

A long context is cut into overlapping windows of train.max_length tokens
(question + context, the windows overlapping by train.doc_stride tokens). In
training, a window that does not hold the whole answer is labelled with the CLS
token; at evaluation the best span over all windows of a question wins.
"""
import collections
import re
import string

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding

from ..batching import PAD_MULTIPLE
from ..errors import PeftkitError
from . import Prepared

MODEL_TASK = "qa"
MIN_CONTEXT_TOKENS = 32  # a window must hold at least this much context next to the longest question
MAX_ANSWER_TOKENS = 30  # longest span considered at evaluation
N_BEST = 20  # start and end candidates per window


# ---------------------------------------------------------------------------------------------
# training data

def columns(data) -> dict:
    """What each row must carry (datasource checks it on load)."""
    return {data.question: "text", data.context: "text", data.answers: "answers"}


def prepare(recipe, splits, tokenizer) -> Prepared:
    data = recipe.data
    if not getattr(tokenizer, "is_fast", False):
        raise PeftkitError(f"qa needs a fast tokenizer (offset mappings); {recipe.model} has {type(tokenizer).__name__}")
    check_lengths(splits, tokenizer, recipe)

    def encode(batch):
        return encode_train(tokenizer, batch[data.question], batch[data.context], batch[data.answers],
                            recipe.train.max_length, recipe.train.doc_stride)

    train = splits["train"].map(encode, batched=True, remove_columns=splits["train"].column_names,
                                desc="tokenizing (question + context windows)")
    return Prepared(train, DataCollatorWithPadding(tokenizer, pad_to_multiple_of=PAD_MULTIPLE),
                    model_kwargs={"pad_token_id": tokenizer.pad_token_id})


def check_lengths(splits, tokenizer, recipe) -> None:
    """Fail before training when a window cannot hold the longest question plus some context,
    or when doc_stride leaves no room for a window to move on."""
    data, t = recipe.data, recipe.train
    longest, where = 0, None
    for name in splits:
        lengths = [len(ids) for ids in tokenizer(_questions(splits[name][data.question]),
                                                 add_special_tokens=False)["input_ids"]]
        if lengths and max(lengths) > longest:
            longest, where = max(lengths), name
    special = tokenizer.num_special_tokens_to_add(pair=True)
    room = t.max_length - longest - special
    if room < MIN_CONTEXT_TOKENS:
        raise PeftkitError(
            f"train.max_length {t.max_length} is too short for {data.dataset}: its longest question "
            f"({where} split) has {longest} tokens, plus {special} special tokens and at least "
            f"{MIN_CONTEXT_TOKENS} context tokens per window; use train.max_length >= "
            f"{longest + special + MIN_CONTEXT_TOKENS}")
    if t.doc_stride >= room:
        raise PeftkitError(
            f"train.doc_stride {t.doc_stride} must be smaller than the context room of a window next to the "
            f"longest question: max_length {t.max_length} - question {longest} - {special} special tokens = "
            f"{room}; lower train.doc_stride (e.g. {room // 2}) or raise train.max_length")


def _questions(questions) -> list[str]:
    return [q.lstrip() for q in questions]  # leading spaces only waste window room


def question_windows(tokenizer, questions, contexts, max_length, stride):
    return tokenizer(_questions(questions), list(contexts), truncation="only_second", max_length=max_length,
                     stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)


def _context_range(sequence_ids) -> tuple[int, int]:
    first = sequence_ids.index(1)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    return first, last


def encode_train(tokenizer, questions, contexts, answers, max_length, stride) -> dict:
    """Windows with start_positions/end_positions: the first gold answer's tokens, or the CLS
    index when the answer is not wholly inside the window (or the question has no answer)."""
    enc = question_windows(tokenizer, questions, contexts, max_length, stride)
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ids = enc["input_ids"][i]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        gold = answers[enc["overflow_to_sample_mapping"][i]]
        if not gold["text"]:
            starts.append(cls), ends.append(cls)
            continue
        start_char = gold["answer_start"][0]
        end_char = start_char + len(gold["text"][0])
        sequence_ids = enc.sequence_ids(i)
        if 1 not in sequence_ids:  # an empty context
            starts.append(cls), ends.append(cls)
            continue
        first, last = _context_range(sequence_ids)
        if offsets[first][0] > start_char or offsets[last][1] < end_char:
            starts.append(cls), ends.append(cls)
            continue
        start = first
        while start <= last and offsets[start][0] <= start_char:
            start += 1
        end = last
        while end >= first and offsets[end][1] >= end_char:
            end -= 1
        starts.append(start - 1), ends.append(end + 1)
    enc.pop("offset_mapping")
    enc.pop("overflow_to_sample_mapping")
    enc["start_positions"] = starts
    enc["end_positions"] = ends
    return enc


# ---------------------------------------------------------------------------------------------
# evaluation and prediction

@torch.no_grad()
def evaluate(model, tokenizer, dataset, recipe, desc="evaluating") -> dict:
    data = recipe.data
    found = answer(model, tokenizer, dataset[data.question], dataset[data.context], recipe, desc)
    return squad_scores([a["answer"] for a in found], [g["text"] for g in dataset[data.answers]])


@torch.no_grad()
def predict(model, tokenizer, rows, recipe, desc="predicting") -> list[dict]:
    data = recipe.data
    for n, row in enumerate(rows, 1):
        for key in (data.question, data.context):
            if not isinstance(row.get(key), str):
                raise PeftkitError(f"row {n} needs a string {key!r} (qa rows hold {data.question!r} and "
                                   f"{data.context!r}); it has {sorted(row)}")
    return answer(model, tokenizer, [r[data.question] for r in rows], [r[data.context] for r in rows], recipe, desc)


@torch.no_grad()
def answer(model, tokenizer, questions, contexts, recipe, desc="answering") -> list[dict]:
    """One {"answer", "score", "start"} per question: the best span over the question's windows.
    score is p(start) * p(end) within the window the span came from; start is a character index."""
    questions, contexts = list(questions), list(contexts)
    t = recipe.train
    enc = question_windows(tokenizer, questions, contexts, t.max_length, t.doc_stride)
    names = [k for k in tokenizer.model_input_names if k in enc]
    n_windows = len(enc["input_ids"])
    order = sorted(range(n_windows), key=lambda i: len(enc["input_ids"][i]))  # similar lengths pad less
    best = [None] * len(questions)  # (logit sum, text, prob, start char)
    was_training = model.training
    model.eval()
    try:
        for chunk in tqdm(range(0, n_windows, t.eval_batch_size), desc=desc, leave=False, disable=None):
            index = order[chunk:chunk + t.eval_batch_size]
            batch = tokenizer.pad({k: [enc[k][i] for i in index] for k in names}, return_tensors="pt")
            out = model(**batch.to(model.device))
            start_logits = out.start_logits.float().cpu().numpy()
            end_logits = out.end_logits.float().cpu().numpy()
            width = start_logits.shape[1]
            for row, i in enumerate(index):
                q = enc["overflow_to_sample_mapping"][i]
                n = len(enc["input_ids"][i])
                cut = slice(width - n, width) if tokenizer.padding_side == "left" else slice(0, n)  # drop padding
                span = best_span(start_logits[row, cut], end_logits[row, cut], enc["offset_mapping"][i],
                                 enc.sequence_ids(i))
                if span is not None and (best[q] is None or span[0] > best[q][0]):
                    score, s_char, e_char, prob = span
                    best[q] = (score, contexts[q][s_char:e_char], prob, s_char)
    finally:
        model.train(was_training)
    return [{"answer": b[1], "score": round(float(b[2]), 4), "start": int(b[3])} if b else
            {"answer": "", "score": 0.0, "start": -1} for b in best]


def best_span(start_logits, end_logits, offsets, sequence_ids, n_best=N_BEST, max_tokens=MAX_ANSWER_TOKENS):
    """(start+end logit, start char, end char, p(start)*p(end)) of the best valid context span of
    one window (logits without padding), or None. Valid: both ends in the context, end >= start,
    at most max_tokens long."""
    context = np.array([s == 1 for s in sequence_ids])
    if not context.any():
        return None
    masked_start = np.where(context, start_logits, -np.inf)
    masked_end = np.where(context, end_logits, -np.inf)
    starts = np.argsort(masked_start)[::-1][:n_best]
    ends = np.argsort(masked_end)[::-1][:n_best]
    found = None
    for s in starts:
        if not context[s]:
            break
        for e in ends:
            if not context[e]:
                break
            if e < s or e - s + 1 > max_tokens:
                continue
            score = start_logits[s] + end_logits[e]
            if found is None or score > found[0]:
                found = (float(score), int(s), int(e))
    if found is None:
        return None
    score, s, e = found
    p_start = _softmax(start_logits)[s]
    p_end = _softmax(end_logits)[e]
    return score, offsets[s][0], offsets[e][1], float(p_start * p_end)


def _softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


# ---------------------------------------------------------------------------------------------
# metrics (SQuAD v1.1 evaluation script semantics; empty answers scored as in v2.0)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict:
    """Mean over questions of the best exact match and F1 against any gold answer (0..1)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    if not golds:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for pred, gold in zip(predictions, golds):
        gold = list(gold) or [""]  # no answer: only an empty prediction is right
        em += max(exact_match(pred, g) for g in gold)
        f1 += max(f1_score(pred, g) for g in gold)
    return {"exact_match": em / len(golds), "f1": f1 / len(golds)}


# ---------------------------------------------------------------------------------------------
# a model-free baseline, for the record

_WORD = re.compile(r"\S+")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+|\n+")


def baseline_answers(question: str, context: str, k: int = 3) -> dict:
    """Two model-free guesses, both from the context sentence sharing the most (normalised) words
    with the question: "sentence_start" = its first k words; "unshared" = its longest run of
    consecutive words that do not occur in the question. The second is strong on bbc_qa, whose
    questions are near-copies of their sentence with the answer replaced by a wh-phrase."""
    q_words = set(normalize_answer(question).split())
    sentences = [s for s in _SENTENCE_END.split(context) if s and s.strip()]
    if not sentences:
        return {"sentence_start": "", "unshared": ""}
    best = max(sentences, key=lambda s: len(q_words & set(normalize_answer(s).split())))
    words = _WORD.findall(best)
    run, longest = [], []
    for w in words:
        norm = normalize_answer(w)
        if norm and norm not in q_words:
            run.append(w)
            if len(run) > len(longest):
                longest = list(run)
        elif norm:  # punctuation-only tokens neither extend nor break a run
            run = []
    return {"sentence_start": " ".join(words[:k]), "unshared": " ".join(longest).strip(string.punctuation + " ")}


def baseline_scores(dataset, recipe=None, k: int = 3) -> dict:
    """EM/F1 of the model-free baselines of baseline_answers on `dataset` (SQuAD columns, or the
    recipe's data columns): {"sentence_start": {...}, "unshared": {...}}."""
    q = recipe.data.question if recipe else "question"
    c = recipe.data.context if recipe else "context"
    a = recipe.data.answers if recipe else "answers"
    guesses = [baseline_answers(qq, cc, k) for qq, cc in zip(dataset[q], dataset[c])]
    golds = [g["text"] for g in dataset[a]]
    return {name: squad_scores([g[name] for g in guesses], golds) for name in ("sentence_start", "unshared")}
