"""Recipes: one YAML file says what to train; dotted overrides change it.

The schema is plain dataclasses. Loading checks every key and type before any
work starts, and names the allowed keys at the level where a key is wrong.
"""
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import PeftkitError
from .presets import preset_mapping, read_yaml
from .shipped import shipped

RECIPES_DIR = shipped("recipes")
# Each task's validation metrics, its main one first: what early stopping and the kept adapter go by.
TASK_METRICS = {"classification": ("accuracy", "macro_f1"), "qa": ("f1", "exact_match"),
                "generation": ("rouge_l", "exact_match")}
TASKS = tuple(TASK_METRICS)
# The trackers `train.report_to` may name, and the package each needs (transformers' integrations).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
            "neptune": "neptune", "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio",
            "swanlab": "swanlab"}


@dataclass
class Data:
    dataset: str  # an embedded name, a local file or folder, or a hub dataset id
    text: str = "text"  # classification: the input column
    label: str = "label"  # classification: the label column
    labels: list[str] | None = None  # classification: label names, in id order (default: from the data)
    question: str = "question"  # qa columns (SQuAD layout)
    context: str = "context"
    answers: str = "answers"
    prompt: str = "prompt"  # generation: the input column ...
    target: str = "target"  # ... and the column the model learns to write
    instruction: str | None = None  # generation: text put before each prompt in the user turn
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class Train:
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    # train only the first N optimizer steps of the planned run, whose learning rate keeps the whole run's
    # warm-up and decay (a learning-rate sweep's short runs see the rates the whole run would); None: all
    stop_after_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    schedule: str = "linear"  # linear | cosine
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_length: int = 128
    doc_stride: int = 64  # qa: overlap between windows of a long context
    max_new_tokens: int = 32  # generation: length of generated answers at evaluation
    eval_batch_size: int = 64
    seed: int = 42
    gradient_checkpointing: bool | None = None  # None: on for 4/8-bit bases
    group_by_length: bool = True  # batches of similar length, in random order (batching.py): less padding
    fast_dropout: bool = True  # dropout with a cheaper random mask on the CPU (dropout.py); same distribution
    precision: str = "auto"  # auto | fp32 | bf16: auto is bf16 where the hardware has it natively (precision.py)
    compile: str | bool = "auto"  # auto | true | false: transformer blocks compiled for training steps (compiling.py)
    attention: str = "auto"  # auto | plain | eager | sdpa: the attention kernel (attention.py)
    logging_steps: int = 10
    save_steps: int = 200  # checkpoints without validation; with it, one at each evaluation
    # Validation while training: every eval_steps optimizer steps the task's metrics on the validation
    # split (at most data.max_eval_samples rows). None: four evaluations per run; 0: none.
    eval_steps: int | None = None
    early_stopping_patience: int | None = None  # stop after this many evaluations without improvement
    early_stopping_threshold: float = 0.0  # an improvement must be larger than this to count
    metric_for_best: str | None = None  # default: the task's main metric (accuracy, f1, rouge_l)
    keep: str = "best"  # best | last: the adapter the run saves and tests
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # trackers, e.g. [tensorboard, wandb]


@dataclass
class Recipe:
    name: str  # the run folder: runs/<name>/
    task: str  # classification | qa | generation
    model: str  # embedded name (minilm-l6, smollm2-135m), local folder or hub id
    method: str | dict  # a preset from adapters/, a preset YAML path, or an inline mapping
    data: Data
    train: Train = field(default_factory=Train)
    quantize: str | None = None  # nf4 | fp4 | 4bit | 8bit (presets may set it)
    # settings of the model's config that this recipe's runs load the base with (train, evaluate,
    # predict), e.g. {attention_probs_dropout_prob: 0.0}
    model_config: dict = field(default_factory=dict)
    output_dir: str = "runs"

    def __post_init__(self):
        if self.task not in TASKS:
            raise PeftkitError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.train.schedule not in ("linear", "cosine"):
            raise PeftkitError(f"train.schedule must be linear or cosine, got {self.train.schedule!r}")
        for key in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "logging_steps", "save_steps"):
            if getattr(self.train, key) <= 0:
                raise PeftkitError(f"train.{key} must be positive, got {getattr(self.train, key)}")
        from .precision import check_precision  # here: `peftkit recipes` lists YAML without importing torch
        check_precision(self.train.precision)
        from .compiling import check_compile
        check_compile(self.train.compile)
        from .attention import check_attention
        check_attention(self.train.attention)
        if self.train.lr <= 0:
            raise PeftkitError(f"train.lr must be positive, got {self.train.lr}")
        self._check_validation()

    def _check_validation(self):
        t = self.train
        if t.keep not in ("best", "last"):
            raise PeftkitError(f"train.keep must be best or last, got {t.keep!r}")
        if t.stop_after_steps is not None and t.stop_after_steps <= 0:
            raise PeftkitError(f"train.stop_after_steps must be a positive number of optimizer steps (or null: the "
                               f"whole run), got {t.stop_after_steps}")
        if t.eval_steps is not None and t.eval_steps < 0:
            raise PeftkitError(f"train.eval_steps must be 0 (no validation) or positive, got {t.eval_steps}")
        if t.early_stopping_patience is not None and t.early_stopping_patience <= 0:
            raise PeftkitError(f"train.early_stopping_patience must be positive (or null: off), "
                               f"got {t.early_stopping_patience}")
        if t.early_stopping_patience and t.eval_steps == 0:
            raise PeftkitError("train.early_stopping_patience needs validation, but train.eval_steps is 0; "
                               "set eval_steps to a positive number or remove early_stopping_patience")
        metrics = TASK_METRICS[self.task]
        if t.metric_for_best is not None and t.metric_for_best not in metrics:
            raise PeftkitError(f"train.metric_for_best {t.metric_for_best!r} is not a {self.task} metric; "
                               f"choose one of {', '.join(metrics)}")

    @property
    def best_metric(self) -> str:
        return self.train.metric_for_best or TASK_METRICS[self.task][0]


def check_trackers(names: list[str]) -> None:
    """Each tracker is one transformers knows, and its package is installed (checked when a run
    starts, not when a finished run's recipe is read back)."""
    import importlib.util
    for name in names:
        if name not in TRACKERS:
            raise PeftkitError(f"train.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} "
                               "(or [] for none)")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise PeftkitError(f"train.report_to names {name}, but its package is not installed: "
                               f"pip install {TRACKERS[name]}")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(path_or_name: str, overrides: list[str] = ()) -> Recipe:
    data = read_recipe(path_or_name)
    for item in overrides:
        apply_override(data, item)
    return build(Recipe, data, "")


def run_recipe(run_dir) -> Recipe:
    """The recipe a run folder was trained from (its recipe.yaml, written by `peftkit train`)."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise PeftkitError(f"{run_dir} has no recipe.yaml; `peftkit train` writes one next to the adapter")
    return build(Recipe, read_yaml(path), "")


def read_recipe(path_or_name: str) -> dict:
    """The recipe's YAML as a mapping, unchecked: a file, or the name of a shipped recipe."""
    path = Path(path_or_name)
    if not path.is_file():
        named = RECIPES_DIR / f"{path_or_name}.yaml"
        if not named.is_file():
            raise PeftkitError(f"recipe {path_or_name} does not exist; shipped recipes: {', '.join(recipe_names())}")
        path = named
    return read_yaml(path)


def apply_override(data: dict, item: str) -> None:
    """`train.epochs=2` sets data["train"]["epochs"] = 2 (values parsed as YAML)."""
    if "=" not in item:
        raise PeftkitError(f"override {item!r} must look like key=value, e.g. train.epochs=2")
    key, value = item.split("=", 1)
    try:
        value = yaml.safe_load(value)
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise PeftkitError(f"override {item!r}: the value is not valid YAML ({problem}); quote it for the "
                           f"shell, e.g. '{key}={{method: lora, r: 16}}'") from None
    set_key(data, key, value)


def set_key(data: dict, key: str, value) -> None:
    """data["train"]["epochs"] = value for key `train.epochs`. A method option (`method.r`) on a
    recipe whose method is a preset name sets it on that preset's options, made inline."""
    *parents, last = key.split(".")
    if parents[:1] == ["method"] and isinstance(data.get("method"), str):
        data["method"] = preset_mapping(data["method"])
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PeftkitError(f"override {key}: {part} is not a section")
    node[last] = value


def build(cls, data, where: str):
    """Instantiate dataclass `cls` from a mapping, checking keys and types."""
    if not isinstance(data, dict):
        raise PeftkitError(f"{where or 'the recipe'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PeftkitError(f"unknown key {where}{unknown[0]}; allowed at this level: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PeftkitError(f"missing required key {where}{name}")
            continue
        values[name] = _typed(data[name], hints[name], f"{where}{name}")
    return cls(**values)


def _typed(value, hint, where: str):
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where + ".")
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # YAML 1.1 reads 5e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        origin = typing.get_origin(option) or option
        if origin is not type(None) and isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise PeftkitError(f"{where} must be {names}, got {value!r} ({type(value).__name__})")
