"""peft's other layer methods (IA3, LoHa, LoKr, VeRA, OFT, BOFT, FourierFT, LN tuning, AdaLoRA),
as tuners.lora does LoRA: peft builds, saves and merges them; this module only turns peftkit
options into their configs, with per-architecture default targets, the task heads saved
alongside, and the shape rules peft would otherwise break on deep inside injection.

    attach(model, {"method": "ia3"})                  # peft's default targets for the architecture
    attach(model, {"method": "loha", "r": 8, "alpha": 16})
    attach(model, {"method": "adalora", "total_step": 500})   # peftkit train fills total_step in
"""
import dataclasses
import math
import re

from peft import (AdaLoraConfig, BOFTConfig, FourierFTConfig, IA3Config, LNTuningConfig, LoHaConfig, LoKrConfig,
                  OFTConfig, VeraConfig)
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..architectures import layout_of
from ..errors import PeftkitError
from .lora import check_targets, task_type
from .options import config_options, refuse_unknown_options

CONFIGS = {"ia3": IA3Config, "loha": LoHaConfig, "lokr": LoKrConfig, "vera": VeraConfig, "oft": OFTConfig,
           "boft": BOFTConfig, "fourierft": FourierFTConfig, "ln_tuning": LNTuningConfig, "adalora": AdaLoraConfig}
# The Layout field naming each method's default targets (LoRA's, where not listed); None keeps peft's
# own per-architecture table, which for IA3 names attention and the MLP together.
_DEFAULT_TARGETS = {"ia3": None, "ln_tuning": "norm_targets"}
# peft builds these for nn.Linear and convolutions only; on GPT-2's Conv1D it fails with a TypeError
NO_CONV1D = ("loha", "lokr", "oft", "boft")
# Options that cut each adapted layer's input into equal blocks (as a block size or a block count): peft
# needs them to divide the input width, and otherwise fails mid-injection (BOFT) or quietly picks
# another size (OFT).
_BLOCKS = {"oft": ("oft_block_size", "r"), "boft": ("boft_block_size", "boft_block_num")}
# What sizes each method, for `bench params` (r, where the config has one and it is not listed)
_SIZES = {"oft": ("oft_block_size",), "boft": ("boft_block_size",), "fourierft": ("n_frequency",),
          "adalora": ("init_r", "target_r")}


def options_of(method: str) -> list[str]:
    return config_options(CONFIGS[method])


def check_options(method: str, options: dict) -> None:
    """Every option is the config's (an unknown one is named with the nearest valid ones); ranks are usable."""
    valid = options_of(method)
    refuse_unknown_options(method, options, valid, CONFIGS[method].__name__)
    r = options.get("r", 8)
    # OFT's r is its block count, and 0 (its default) leaves that to oft_block_size
    usable = "0 (blocks of oft_block_size) or a positive integer" if method == "oft" else "a positive integer"
    if "r" in valid and (not isinstance(r, int) or isinstance(r, bool) or r < (method != "oft")):
        raise PeftkitError(f"{method} rank r must be {usable}, got {r!r}")


def build_config(method: str, options: dict, model, heads: list[str]):
    check_options(method, options)
    options = dict(options)
    if method == "adalora" and options.get("total_step") is None:
        raise PeftkitError("adalora needs total_step, the optimizer steps its rank budget schedule runs over; "
                           "pass total_step=N (peftkit train fills it in from the run's steps)")
    if options.get("target_modules") is None:
        options["target_modules"] = default_targets(method, model)
    if options.get("target_modules") is not None:
        check_targets(model, options["target_modules"])
        adapted = _adapted(model, options["target_modules"])
        if method in NO_CONV1D:
            _refuse_conv1d(method, adapted)
        if method in _BLOCKS:
            _check_blocks(method, options, adapted)
        if method == "fourierft":
            _check_frequencies(options, adapted)
    options["modules_to_save"] = sorted(set(options.get("modules_to_save") or []) | set(heads)) or None
    try:
        return CONFIGS[method](task_type=task_type(model), **options)
    except (ValueError, TypeError) as err:
        raise PeftkitError(f"invalid {method} options: {err}") from None


def default_targets(method: str, model) -> list[str] | None:
    """What `method` adapts on `model` when the options name no target_modules (None: peft's own table)."""
    field = _DEFAULT_TARGETS.get(method, "lora_targets")
    return list(getattr(layout_of(model), field)) if field else None


def _adapted(model, targets) -> list[tuple[str, nn.Module]]:
    """The modules `targets` matches, as peft matches them: a list by name suffix, a string as a regex."""
    def targeted(name: str) -> bool:
        if targets == "all-linear":
            return True
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    return [(n, m) for n, m in model.named_modules() if n and targeted(n)]


def _refuse_conv1d(method: str, adapted) -> None:
    hit = next((n for n, m in adapted if isinstance(m, Conv1D)), None)
    if hit:
        raise PeftkitError(f"{method} cannot adapt {hit}, a transformers Conv1D (GPT-2 style) layer: peft's "
                           f"{method} takes nn.Linear and convolution layers; use lora or ia3 on this model")


def _check_blocks(method: str, options: dict, adapted) -> None:
    widths = {n: m.in_features for n, m in adapted if isinstance(getattr(m, "in_features", None), int)}
    if not widths:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(CONFIGS[method])}
    common = math.gcd(*widths.values())
    fitting = ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)
    for option in _BLOCKS[method]:
        value = options.get(option, defaults[option])
        if value == 0:  # 0: set by the other option of the pair
            continue
        bad = next((n for n, w in widths.items() if not isinstance(value, int) or value < 0 or w % value), None)
        if bad:
            raise PeftkitError(f"{method} {option}={value!r} does not divide the input width {widths[bad]} of {bad}: "
                               f"{method} cuts each adapted layer's input into equal blocks; values that divide "
                               f"every adapted layer here: {fitting}")


def _check_frequencies(options: dict, adapted) -> None:
    """FourierFT learns n_frequency entries of each layer's weight spectrum, so a layer needs that many."""
    wanted = options.get("n_frequency", FourierFTConfig.n_frequency)
    for name, module in adapted:
        size = getattr(module, "in_features", 0) * getattr(module, "out_features", 0)
        if size and wanted > size:
            raise PeftkitError(f"fourierft n_frequency={wanted} is more than the {size} weights of {name}; "
                               f"set n_frequency to at most {size} or leave that layer out of target_modules")


def describe(model) -> str:
    """The method's size and how many layers it adapts, for `bench params`."""
    config = next(iter(model.peft_config.values()))
    method = next(m for m, c in CONFIGS.items() if type(config) is c)
    sizes = _SIZES.get(method, ("r",) if hasattr(config, "r") else ())
    layers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    return "".join(f"{s}={getattr(config, s)} " for s in sizes) + f"on {len(layers)} x {','.join(targets)}"
