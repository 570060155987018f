"""A finished run folder (or a bare adapter folder with its recipe) reopened
for evaluation, prediction and merging."""
from dataclasses import dataclass
from pathlib import Path

from .datasource import load_splits
from .errors import PeftkitError
from .loading import load_model, load_tokenizer
from .merge import merge
from .precision import compute, resolve_precision
from .recipe import Recipe, run_recipe
from .presets import resolve_spec
from .saving import load_adapter, read_adapter_config
from .tasks import task_module


@dataclass
class Run:
    path: Path
    recipe: Recipe
    model: object
    tokenizer: object

    @property
    def task(self):
        return task_module(self.recipe.task)

    def evaluate(self, split: str = "test") -> dict:
        splits = load_splits(self.recipe)
        with self._computing():
            return self.task.evaluate(self.model, self.tokenizer, splits[split], self.recipe)

    def predict(self, rows: list[dict]) -> list[dict]:
        """One prediction per input row. A row gives the recipe's input columns (a single one may
        also come as "text"); its other fields (an id, ...) are kept in the output row."""
        columns = [column for column, kind in self.task.columns(self.recipe.data).items() if kind == "text"]
        inputs = [_inputs(row, n, columns) for n, row in enumerate(rows, 1)]
        with self._computing():
            predictions = self.task.predict(self.model, self.tokenizer, inputs, self.recipe)
        return [{**{k: v for k, v in row.items() if k not in (*columns, "text")}, **prediction}
                for row, prediction in zip(rows, predictions)]

    def _computing(self):
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


def open_run(path) -> Run:
    path = Path(path)
    config = read_adapter_config(path)
    recipe = run_recipe(path)
    task = (config.get("peftkit") or {}).get("task", {})
    spec = resolve_spec(recipe.method, recipe.quantize)
    tokenizer = load_tokenizer(recipe.model)
    base = load_model(recipe.model, task=task.get("class", task_module(recipe.task).MODEL_TASK),
                      quantize=spec.quantize, pad_token_id=tokenizer.pad_token_id, **_labels(task),
                      **recipe.model_config)
    return Run(path, recipe, load_adapter(base, path), tokenizer)


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
