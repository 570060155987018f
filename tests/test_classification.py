"""Classification batches: padded to a multiple of 8 tokens, and the padding changes no prediction."""
import torch
from datasets import Dataset, DatasetDict

from peftkit.loading import load_tokenizer
from peftkit.recipe import Data, Recipe, Train
from peftkit.tasks import classification

from conftest import make_tiny

MULTIPLE = classification.PAD_MULTIPLE


def _prepared() -> dict:
    rows = {"text": ["good", "a long and winding review of a film that was, on the whole, fine", "bad film"],
            "label": ["pos", "neg", "neg"]}
    splits = DatasetDict({name: Dataset.from_dict(rows) for name in ("train", "validation", "test")})
    recipe = Recipe(name="t", task="classification", model="minilm-l6", method="lora",
                    data=Data(dataset="inline", text="text", label="label"), train=Train(max_length=64))
    return classification.prepare(recipe, splits, load_tokenizer("minilm-l6"))


def test_batches_are_padded_to_a_multiple_of_8():
    prepared = _prepared()
    rows = [prepared["train"][i] for i in range(3)]
    assert max(len(row["input_ids"]) for row in rows) % MULTIPLE != 0  # so padding is added at all
    for batch_rows in (rows, rows[::2]):
        width = prepared["collator"](batch_rows)["input_ids"].shape[1]
        needed = max(len(row["input_ids"]) for row in batch_rows)
        assert width % MULTIPLE == 0 and needed <= width < needed + MULTIPLE


def test_the_added_padding_changes_no_logits():
    model = make_tiny("bert", "cls")  # ids below its vocabulary of 128
    rows = [{"input_ids": [2, 5, 6, 7, 3], "labels": 0}, {"input_ids": [2] + [9] * 9 + [3], "labels": 1}]
    batch = _prepared()["collator"](rows)
    assert batch["input_ids"].shape[1] == 16
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = torch.cat([model(input_ids=torch.tensor([row["input_ids"]])).logits for row in rows])
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
