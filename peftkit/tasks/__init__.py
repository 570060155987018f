"""One module per task type, each with the same surface (the Task protocol below), so train.py,
runs.py and the benchmarks call every task alike."""
import importlib
from dataclasses import dataclass
from typing import Callable, Protocol

from ..recipe import TASKS


@dataclass
class Prepared:
    """What a task's prepare() gives the trainer, after every data check has passed."""
    train: object  # the tokenized training rows (a datasets.Dataset)
    collator: Callable  # rows -> a padded batch of tensors
    model_kwargs: dict  # what the model is built with, found from the data and tokenizer (labels, pad id)
    loss: Callable | None = None  # a task loss in place of the model's own (generation: answer tokens only)


class Task(Protocol):
    MODEL_TASK: str  # what load_model builds: causal-lm, classification or qa

    def columns(self, data) -> dict: ...  # {recipe column: kind} each row must carry

    def prepare(self, recipe, splits, tokenizer) -> Prepared: ...

    def evaluate(self, model, tokenizer, dataset, recipe, desc: str = "") -> dict: ...  # the test metrics

    def predict(self, model, tokenizer, rows, recipe) -> list: ...

    def baseline_scores(self, dataset, recipe) -> dict | None: ...  # model-free scores to beat, if the task has any


def task_module(task: str) -> Task:
    assert task in TASKS, task  # recipes are validated on load
    return importlib.import_module(f"peftkit.tasks.{task}")
