"""One module per task type. Each has MODEL_TASK (what load_model builds), columns(data)
(what each row must carry), prepare(recipe, splits, tokenizer), evaluate(model, tokenizer, dataset, recipe),
predict(model, tokenizer, rows, recipe)."""
import importlib

from ..recipe import TASKS


def task_module(task: str):
    assert task in TASKS, task  # recipes are validated on load
    return importlib.import_module(f"peftkit.tasks.{task}")
