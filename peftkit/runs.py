"""A finished run folder (or a bare adapter folder with its recipe) reopened
for evaluation, prediction and merging."""
from dataclasses import dataclass
from pathlib import Path

from .anatomy import task_heads
from .attention import choose_attention
from .datasource import load_splits
from .errors import PeftkitError
from .loading import load_model, load_tokenizer
from .merge import merge
from .precision import compute, resolve_precision, store_frozen_in_bf16
from .recipe import Recipe, run_recipe
from .presets import resolve_spec
from .saving import load_adapter, read_adapter_config
from .tasks import task_module


@dataclass
class Run:
    """A reopened run. Its model computes as training did (in a bf16 run: a bf16 base under autocast),
    so call it inside `with run.computing():`, as evaluate and predict do."""
    path: Path
    recipe: Recipe
    model: object
    tokenizer: object

    @property
    def task(self):
        return task_module(self.recipe.task)

    def evaluate(self, split: str = "test") -> dict:
        splits = load_splits(self.recipe)
        with self.computing():
            return self.task.evaluate(self.model, self.tokenizer, splits[split], self.recipe)

    def predict(self, rows: list[dict]) -> list[dict]:
        """One prediction per input row. A row gives the recipe's input columns (a single one may
        also come as "text"); its other fields (an id, ...) are kept in the output row."""
        columns = [column for column, kind in self.task.columns(self.recipe.data).items() if kind == "text"]
        inputs = [_inputs(row, n, columns) for n, row in enumerate(rows, 1)]
        with self.computing():
            predictions = self.task.predict(self.model, self.tokenizer, inputs, self.recipe)
        return [{**{k: v for k, v in row.items() if k not in (*columns, "text")}, **prediction}
                for row, prediction in zip(rows, predictions)]

    def computing(self):
        """As the run computed in training and in its own test (bf16 autocast where that was native)."""
        return compute(resolve_precision(self.recipe.train.precision), self.model)

    def merge(self, out: Path) -> None:
        merged = merge(self.model, inplace=True)  # the run's own copy of the base
        merged.save_pretrained(out)
        self.tokenizer.save_pretrained(out)


def _inputs(row: dict, number: int, columns: list[str]) -> dict:
    if len(columns) == 1 and columns[0] not in row and "text" in row:
        row = {columns[0]: row["text"]}
    for column in columns:
        if not isinstance(row.get(column), str):
            also = ' (or "text")' if len(columns) == 1 else ""
            raise PeftkitError(f"input row {number} needs a string {column!r}{also}, the recipe's input "
                               f"column{'s' if len(columns) > 1 else ''} {', '.join(map(repr, columns))}; "
                               f"it has {', '.join(map(repr, sorted(row))) or 'no fields'}")
    return {column: row[column] for column in columns}


def open_run(path, as_trained: bool = True) -> Run:
    """The run folder at `path` reopened: its recipe, its base with its adapter, its tokenizer. The
    base computes as the run did (compute_as_trained); as_trained=False leaves it as loaded, in full
    precision, for merging."""
    path = Path(path)
    config = read_adapter_config(path)
    recipe = run_recipe(path)
    task = (config.get("peftkit") or {}).get("task", {})
    spec = resolve_spec(recipe.method, recipe.quantize)
    tokenizer = load_tokenizer(recipe.model)
    base = load_model(recipe.model, task=task.get("class", task_module(recipe.task).MODEL_TASK),
                      quantize=spec.quantize, pad_token_id=tokenizer.pad_token_id, **_labels(task),
                      **recipe.model_config)
    if as_trained:
        compute_as_trained(base, recipe)
    return Run(path, recipe, load_adapter(base, path), tokenizer)


def compute_as_trained(base, recipe: Recipe) -> None:
    """Set the bare `base` to compute as the run's training and its own test did, so that a reopened
    run scores what the run reported: the same attention kernel and, in a bf16 run, the frozen base
    stored in bf16 (its task heads, which trained, stay fp32). Greedy generation turns the small
    differences into other tokens: the headline recipe's run read 0.232 ROUGE-L reopened with the
    base as loaded, against the 0.239 it reported."""
    precision = resolve_precision(recipe.train.precision)
    choose_attention(base, precision, recipe.train.batch_size, recipe.train.max_length, recipe.train.attention)
    base.requires_grad_(False)
    for head in task_heads(base):
        base.get_submodule(head).requires_grad_(True)
    store_frozen_in_bf16(base, precision)


def adapter_base(path):
    """The full-precision base the adapter folder at `path` was trained on, bare: its run's model
    (recipe.yaml) or else the base its record names."""
    path = Path(path)
    record = read_adapter_config(path).get("peftkit") or {}
    task = record.get("task", {})
    if (path / "recipe.yaml").is_file():
        recipe = run_recipe(path)
        return load_model(recipe.model, task=task.get("class", task_module(recipe.task).MODEL_TASK),
                          **_labels(task), **recipe.model_config)
    return load_model(record.get("base_name", "unknown"), task=task.get("class", "causal-lm"), **_labels(task))


def _labels(task: dict) -> dict:
    """The label settings a classification head was trained with, for its base's config."""
    if "num_labels" not in task:
        return {}
    return {"num_labels": task["num_labels"], "id2label": {int(k): v for k, v in task["id2label"].items()}}
