"""Encoder task batches (classification, QA): padded to a multiple of 8 tokens, and the padding
changes no prediction and no label."""
import torch
from datasets import Dataset, DatasetDict

from peftkit.batching import PAD_MULTIPLE as MULTIPLE
from peftkit.loading import load_tokenizer
from peftkit.recipe import Data, Recipe, Train
from peftkit.tasks import classification, qa

from conftest import make_tiny


def _prepare(task, rows: dict, data: Data, **train) -> dict:
    """`task.prepare` on `rows` as every split, for minilm-l6."""
    splits = DatasetDict({name: Dataset.from_dict(rows) for name in ("train", "validation", "test")})
    recipe = Recipe(name="t", task=task.MODEL_TASK, model="minilm-l6", method="lora", data=data,
                    train=Train(**train))
    return task.prepare(recipe, splits, load_tokenizer("minilm-l6"))


def _prepared():
    rows = {"text": ["good", "a long and winding review of a film that was, on the whole, fine", "bad film"],
            "label": ["pos", "neg", "neg"]}
    return _prepare(classification, rows, Data(dataset="inline", text="text", label="label"), max_length=64)


def test_batches_are_padded_to_a_multiple_of_8():
    prepared = _prepared()
    rows = [prepared.train[i] for i in range(3)]
    assert max(len(row["input_ids"]) for row in rows) % MULTIPLE != 0  # so padding is added at all
    for batch_rows in (rows, rows[::2]):
        width = prepared.collator(batch_rows)["input_ids"].shape[1]
        needed = max(len(row["input_ids"]) for row in batch_rows)
        assert width % MULTIPLE == 0 and needed <= width < needed + MULTIPLE


def test_the_added_padding_changes_no_logits():
    model = make_tiny("bert", "cls")  # ids below its vocabulary of 128
    rows = [{"input_ids": [2, 5, 6, 7, 3], "labels": 0}, {"input_ids": [2] + [9] * 9 + [3], "labels": 1}]
    batch = _prepared().collator(rows)
    assert batch["input_ids"].shape[1] == 16
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = torch.cat([model(input_ids=torch.tensor([row["input_ids"]])).logits for row in rows])
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_qa_batches_are_padded_to_a_multiple_of_8_and_keep_their_labels():
    contexts = ["Profits rose by 12% in 2004, the firm said.", "John Smith, who runs the firm, said so on Monday."]
    answers = [{"text": ["12%"], "answer_start": [contexts[0].index("12%")]},
               {"text": ["Monday"], "answer_start": [contexts[1].index("Monday")]}]
    rows = {"question": ["By how much did profits rise?", "On which day did John Smith say so?"],
            "context": contexts, "answers": answers}
    prepared = _prepare(qa, rows, Data(dataset="inline"), max_length=64, doc_stride=16)
    features = [prepared.train[i] for i in range(2)]
    needed = max(len(f["input_ids"]) for f in features)
    assert needed % MULTIPLE != 0  # so padding is added at all
    batch = prepared.collator(features)
    assert batch["input_ids"].shape[1] % MULTIPLE == 0 and needed <= batch["input_ids"].shape[1] < needed + MULTIPLE
    for i, f in enumerate(features):
        assert batch["input_ids"][i, :len(f["input_ids"])].tolist() == f["input_ids"]
        assert batch["attention_mask"][i].sum().item() == len(f["input_ids"])
        assert (batch["start_positions"][i].item(), batch["end_positions"][i].item()) == (f["start_positions"],
                                                                                          f["end_positions"])
