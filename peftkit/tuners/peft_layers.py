"""peft's other layer methods (IA3, LoHa, LoKr), as tuners.lora does LoRA: peft builds,
saves and merges them; this module only turns peftkit options into their configs, with
per-architecture default targets and the task heads saved alongside.

    attach(model, {"method": "ia3"})                  # peft's default targets for the architecture
    attach(model, {"method": "loha", "r": 8, "alpha": 16})
"""
import dataclasses
import difflib
import re

from peft import IA3Config, LoHaConfig, LoKrConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from ..architectures import layout_of
from ..errors import PeftkitError
from .lora import check_targets, task_type

CONFIGS = {"ia3": IA3Config, "loha": LoHaConfig, "lokr": LoKrConfig}
_SET_BY_PEFTKIT = ("peft_type", "task_type", "base_model_name_or_path", "revision", "peft_version",
                   "inference_mode", "auto_mapping")


def options_of(method: str) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(CONFIGS[method]) if f.init and f.name not in _SET_BY_PEFTKIT)


def check_options(method: str, options: dict) -> None:
    """Every option is the config's (an unknown one is named with the nearest valid ones); ranks are usable."""
    valid = options_of(method)
    for option in options:
        if option not in valid:
            near = difflib.get_close_matches(option, valid, n=3)
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            raise PeftkitError(f"unknown {method} option {option!r}{hint} {CONFIGS[method].__name__} accepts: "
                               f"{', '.join(valid)}")
    r = options.get("r", 8)
    if "r" in valid and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
        raise PeftkitError(f"{method} rank r must be a positive integer, got {r!r}")


def build_config(method: str, options: dict, model, heads: list[str]):
    check_options(method, options)
    options = dict(options)
    if options.get("target_modules") is None and method != "ia3":  # IA3: peft's table names attention and MLP
        options["target_modules"] = list(layout_of(model).lora_targets)
    if options.get("target_modules") is not None:
        check_targets(model, options["target_modules"])
        if method in ("loha", "lokr"):
            _refuse_conv1d(method, model, options["target_modules"])
    options["modules_to_save"] = sorted(set(options.get("modules_to_save") or []) | set(heads)) or None
    try:
        return CONFIGS[method](task_type=task_type(model), **options)
    except (ValueError, TypeError) as err:
        raise PeftkitError(f"invalid {method} options: {err}") from None


def _refuse_conv1d(method: str, model, targets) -> None:
    """peft's LoHa and LoKr layers take nn.Linear and convolutions, not GPT-2's Conv1D (it would
    fail inside peft with a TypeError)."""
    def targeted(name: str) -> bool:
        if targets == "all-linear":
            return True
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    hit = next((n for n, m in model.named_modules() if isinstance(m, Conv1D) and targeted(n)), None)
    if hit:
        raise PeftkitError(f"{method} cannot adapt {hit}, a transformers Conv1D (GPT-2 style) layer: peft's "
                           f"{method} takes nn.Linear and convolution layers; use lora or ia3 on this model")


def describe(model) -> str:
    """The method and how many layers it adapts, for `bench params`."""
    config = next(iter(model.peft_config.values()))
    layers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    rank = f"r={config.r} " if hasattr(config, "r") else ""
    return f"{rank}on {len(layers)} x {','.join(targets)}"
