"""peftkit: parameter-efficient fine-tuning for one GPU or a laptop.

    model = peftkit.attach(model, "lora")          # or "houlsby", "pfeiffer", "parallel", "prefix", a YAML, a dict
    peftkit.param_report(model)
    peftkit.save_adapter(model, "out/dir")
    model = peftkit.load_adapter(base_model, "out/dir")
    merged = peftkit.merge(model)
    model = peftkit.combine(base_model, ["runs/a", "runs/b"], "linear", [0.5, 0.5])  # one adapter of several
    bank = peftkit.AdapterBank("smollm2-135m")     # one base, many adapters, one per batch row
    peftkit.activate(model, peftkit.Stack("lang", "task"))  # or Parallel, Average: adapters composed
    peftkit.fuse(model, ["sentiment", "topic"])    # AdapterFusion over them; only its layers train
"""
__version__ = "0.1.0"

import importlib
import logging
import sys
import types
import warnings

# bitsandbytes logs this on import on every AVX512-BF16 CPU when the optional hub kernel package is
# absent, then computes with its own CPU kernels: nothing a user can act on, on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())

# The Trainer orders checkpoints by file time to rotate them and, when its steps are under a second
# apart (a short run), says it falls back to their step numbers: which is what it should do anyway.
logging.getLogger("transformers.trainer_utils").addFilter(
    lambda record: "mtime may not be reliable" not in record.getMessage())

# peft still reads transformers' old gradient-checkpointing names, which warn on every run: not
# the user's to fix (peftkit itself calls the new names).
warnings.filterwarnings("ignore", message="`(is_)?gradient_checkpointing(_enable)?` is deprecated",
                        category=FutureWarning, module="transformers.modeling_utils")

# The public API, imported on first use: `peftkit --help` and `peftkit recipes` need no torch.
_API = {"attach": "attach", "param_report": "report", "save_adapter": "saving", "load_adapter": "saving",
        "merge": "merge", "combine": "combine", "load_model": "loading", "load_tokenizer": "loading", "PeftkitError": "errors",
        "AdapterBank": "bank", "Stack": "composition", "Parallel": "composition", "Average": "composition",
        "Fuse": "composition", "activate": "composition", "fuse": "composition"}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package: `peftkit.attach` and `peftkit.merge` would turn
    from the functions into their modules once anything imported those. The API names stay functions."""

    def __setattr__(self, name, value):
        if not (name in _API and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
