"""The options check every own tuner's Config.from_options makes first.

    refuse_unknown_options("bottleneck", options, Config)   PeftkitError naming the allowed ones
"""
from dataclasses import fields

from ..errors import PeftkitError


def refuse_unknown_options(label: str, options, config_class) -> None:
    """Refuse `options` that are not a dict, or that name no field of the dataclass `config_class`."""
    if not isinstance(options, dict):
        raise PeftkitError(f"{label} options must be a dict, got {type(options).__name__}")
    allowed = [f.name for f in fields(config_class)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise PeftkitError(f"unknown {label} option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
