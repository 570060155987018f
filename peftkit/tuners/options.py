"""The unknown-option check every tuner's config makes first, peft's and peftkit's own alike.

    refuse_unknown_options("bottleneck", options, allowed)   PeftkitError naming the nearest allowed ones
    field_names(Config)                                       a config dataclass's options
    config_options(LoraConfig)                                 what a peft config takes from a user
"""
import difflib
from dataclasses import fields

from ..errors import PeftkitError

# A peft config's fields that peftkit (or peft) fills in, never the user
SET_BY_PEFTKIT = ("peft_type", "task_type", "base_model_name_or_path", "revision", "peft_version",
                  "inference_mode", "auto_mapping")


def refuse_unknown_options(method: str, options, allowed, accepted_by: str | None = None) -> None:
    """Refuse `options` that are not a dict, or that hold a name not in `allowed`: the first unknown
    one is named with the nearest allowed ones (a misspelt option is the usual mistake), then the list."""
    if not isinstance(options, dict):
        raise PeftkitError(f"{method} options must be a dict, got {type(options).__name__}")
    allowed = list(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        near = difflib.get_close_matches(unknown[0], allowed, n=3)
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        also = f" (also unknown: {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""  # one fix, not one per run
        raise PeftkitError(f"unknown {method} option {unknown[0]!r}{also}; {hint}"
                           f"{accepted_by or method} accepts: {', '.join(allowed)}")


def field_names(config_class) -> list[str]:
    return [f.name for f in fields(config_class)]


def config_options(config_class, set_elsewhere: tuple[str, ...] = ()) -> list[str]:
    """The options a peft config takes from a user: its fields but those peftkit (or peft) sets."""
    return sorted(f.name for f in fields(config_class)
                  if f.init and f.name not in SET_BY_PEFTKIT + set_elsewhere)
