"""Sequence classification: text in, one label out; accuracy and macro-F1."""
import torch
from datasets import ClassLabel
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding

from ..batching import PAD_MULTIPLE
from ..errors import PeftkitError
from . import Prepared

MODEL_TASK = "classification"


def columns(data) -> dict:
    """What each row must carry (datasource checks it on load)."""
    return {data.text: "text", data.label: "label"}


def prepare(recipe, splits, tokenizer) -> Prepared:
    data = recipe.data
    labels = label_names(splits, data)
    for name in splits:
        feature = splits[name].features[data.label]
        splits[name] = splits[name].map(lambda row: {"label_id": _label_id(row[data.label], labels, feature)},
                                        desc=f"labels ({name})")

    def encode(batch):
        encoded = tokenizer(batch[data.text], truncation=True, max_length=recipe.train.max_length)
        encoded["labels"] = batch["label_id"]
        return encoded

    train = splits["train"].map(encode, batched=True, remove_columns=splits["train"].column_names,
                                desc="tokenizing")
    return Prepared(train, DataCollatorWithPadding(tokenizer, pad_to_multiple_of=PAD_MULTIPLE),
                    model_kwargs={"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                                  "label2id": {l: i for i, l in enumerate(labels)},
                                  "pad_token_id": tokenizer.pad_token_id})


def label_names(splits, data) -> list[str]:
    feature = splits["train"].features[data.label]
    found = feature.names if isinstance(feature, ClassLabel) else sorted(
        {str(v) for name in splits for v in splits[name][data.label]})
    if data.labels is None:
        return list(found)
    missing = sorted(set(map(str, found)) - set(data.labels)) if not isinstance(feature, ClassLabel) else []
    if isinstance(feature, ClassLabel) and list(feature.names) != list(data.labels):
        missing = sorted(set(feature.names) - set(data.labels))
    if missing:
        raise PeftkitError(f"labels {missing} occur in {data.dataset} but not in data.labels {data.labels}")
    return list(data.labels)


def _label_id(value, labels, feature) -> int:
    name = feature.int2str(value) if isinstance(feature, ClassLabel) and isinstance(value, int) else str(value)
    return labels.index(name)


@torch.no_grad()
def evaluate(model, tokenizer, dataset, recipe, desc="evaluating") -> dict:
    predicted = [row["label"] for row in predict(model, tokenizer, [{recipe.data.text: t} for t in
                                                                    dataset[recipe.data.text]], recipe, desc)]
    labels = label_names({"train": dataset}, recipe.data) if recipe.data.labels is None else recipe.data.labels
    feature = dataset.features[recipe.data.label]
    gold = [labels[_label_id(v, labels, feature)] for v in dataset[recipe.data.label]]
    return {"accuracy": sum(p == g for p, g in zip(predicted, gold)) / len(gold), "macro_f1": macro_f1(predicted, gold)}


@torch.no_grad()
def predict(model, tokenizer, rows, recipe, desc="predicting") -> list[dict]:
    was_training = model.training
    model.eval()
    id2label = model.config.id2label
    encoded = tokenizer([row[recipe.data.text] for row in rows], truncation=True,
                        max_length=recipe.train.max_length)["input_ids"]
    # Batches of similar length (answers put back in input order): far less padding to compute
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i]))
    out = [None] * len(rows)
    size = recipe.train.eval_batch_size
    for start in tqdm(range(0, len(rows), size), desc=desc, leave=False, disable=None):
        part = order[start:start + size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in part]}, pad_to_multiple_of=PAD_MULTIPLE,
                              return_tensors="pt").to(model.device)
        probs = model(**batch).logits.float().softmax(-1)
        scores, ids = probs.max(-1)
        for i, label, score in zip(part, ids.tolist(), scores.tolist()):
            out[i] = {"label": id2label[label], "score": round(score, 4)}
    model.train(was_training)
    return out


def macro_f1(predicted: list, gold: list) -> float:
    scores = []
    for label in sorted(set(gold)):
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def baseline_scores(dataset, recipe) -> None:
    """None: classification reports no model-free baseline; the base model's test score is the one to beat."""
    return None
