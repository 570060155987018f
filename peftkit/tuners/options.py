"""The unknown-option check every tuner's config makes first, peft's and peftkit's own alike.

    refuse_unknown_options("bottleneck", options, allowed)   PeftkitError naming the nearest allowed ones
    field_names(Config)                                       a config dataclass's options
"""
import difflib
from dataclasses import fields

from ..errors import PeftkitError


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
        raise PeftkitError(f"unknown {method} option {unknown[0]!r}; {hint}"
                           f"{accepted_by or method} accepts: {', '.join(allowed)}")


def field_names(config_class) -> list[str]:
    return [f.name for f in fields(config_class)]
