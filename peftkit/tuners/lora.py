"""LoRA is peft's: this module only turns peftkit options into a LoraConfig,
filling per-architecture defaults and checking targets before peft runs."""
import re

from peft import LoraConfig, TaskType

from ..anatomy import model_task
from ..architectures import candidate_modules, layout_of
from ..errors import PeftkitError
from .options import config_options, refuse_unknown_options

OPTIONS = config_options(LoraConfig)


def build_config(method: str, options: dict, model, heads: list[str]) -> LoraConfig:
    """peft's LoraConfig for `model`: default targets per architecture, task heads saved with it."""
    check_options(method, options)
    options = dict(options)
    if options.get("target_modules") is None:
        options["target_modules"] = list(layout_of(model).lora_targets)
    check_targets(model, options["target_modules"])
    options["modules_to_save"] = sorted(set(options.get("modules_to_save") or []) | set(heads)) or None
    try:
        return LoraConfig(task_type=task_type(model), **options)
    except (ValueError, TypeError) as err:
        raise PeftkitError(f"invalid LoRA options: {err}") from None


def check_options(method: str, options: dict) -> None:
    """What can be checked without a model: every option is LoraConfig's, and the rank is usable."""
    refuse_unknown_options("LoRA", options, OPTIONS, "LoraConfig")
    r = options.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise PeftkitError(f"LoRA rank r must be a positive integer, got {r!r}")


def task_type(model) -> TaskType | None:
    found = model_task(type(model).__name__)
    return TaskType(found[1]) if found else None


def check_targets(model, targets) -> None:
    if targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules()]
    if isinstance(targets, str):
        try:
            matched = any(re.fullmatch(targets, name) for name in names)
        except re.error as err:
            raise PeftkitError(f"target_modules regex {targets!r} is invalid: {err}") from None
    else:
        matched = any(name == t or name.endswith("." + t) for name in names for t in targets)
    if not matched:
        raise PeftkitError(
            f"target_modules {targets!r} match no module of {type(model).__name__}; "
            f"candidates: {', '.join(candidate_modules(model))} (a list matches name suffixes, "
            "a string is a regex matched against full names)"
        )


def describe(model) -> str:
    """Rank and targets, for `bench params`."""
    from peft.tuners.lora import LoraLayer

    config = next(iter(model.peft_config.values()))
    layers = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    extra = " dora" if config.use_dora else ""
    return f"r={config.r}{extra} on {len(layers)} x {','.join(targets)}"
