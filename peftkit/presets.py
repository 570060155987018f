"""Method presets: YAML files in adapters/, a YAML path, or a plain dict.

Every spec resolves to (method, options); `quantize` is split off because it
says how to load the base, not how to build the adapter.
"""
from pathlib import Path

import yaml

from .errors import PeftkitError
from .shipped import shipped

PRESETS_DIR = shipped("adapters")
METHODS = ("lora", "houlsby", "pfeiffer", "parallel", "prefix")
QUANTIZE = (None, "nf4", "fp4", "4bit", "8bit")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise PeftkitError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise PeftkitError(f"{path} must hold a mapping of options, got {type(data).__name__}")
    return data


def resolve_spec(spec) -> tuple[str, dict, str | None]:
    """(method, options, quantize) from a preset name, a YAML path or a dict."""
    if isinstance(spec, (str, Path)):
        options = preset_mapping(spec)
    elif isinstance(spec, dict):
        options = dict(spec)
    else:
        raise PeftkitError(f"an adapter spec is a preset name, a YAML path or a dict, got {type(spec).__name__}")
    method = options.pop("method", None)
    if method not in METHODS:
        raise PeftkitError(
            f"unknown method {method!r}; methods: {', '.join(METHODS)}; presets: {', '.join(preset_names())}"
        )
    quantize = options.pop("quantize", None)
    if quantize not in QUANTIZE:
        raise PeftkitError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    return method, options, quantize


def preset_mapping(spec) -> dict:
    """A preset name or YAML path as the inline mapping it stands for: method, options, quantize."""
    return read_yaml(_preset_path(str(spec)))


def describe_spec(spec) -> str:
    """One line for listings and summaries: a preset's name, or an inline spec's options."""
    if isinstance(spec, dict):
        return " ".join(f"{k}={v}" for k, v in spec.items())
    return str(spec)


def _preset_path(spec: str) -> Path:
    if spec.endswith((".yaml", ".yml")) or "/" in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise PeftkitError(f"preset file {spec} does not exist")
        return path
    path = PRESETS_DIR / f"{spec}.yaml"
    if not path.is_file():
        raise PeftkitError(
            f"unknown preset {spec!r}; presets: {', '.join(preset_names())}; methods: {', '.join(METHODS)}"
        )
    return path
