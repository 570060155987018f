"""Method presets: YAML files in adapters/, a YAML path, or a plain dict.

Every spec resolves once into an AdapterSpec (method, options, quantize, and the
preset it came from); that object travels through training, attach, the model card
and a reopened run. `quantize` says how to load the base, not how to build the adapter.
"""
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import PeftkitError
from .methods import METHODS, Method, method
from .shipped import shipped

PRESETS_DIR = shipped("adapters")
QUANTIZE = ("nf4", "fp4", "4bit", "8bit")  # bitsandbytes bases: 4-bit NF4 or FP4 (4bit = nf4), 8-bit LLM.int8


@dataclass
class AdapterSpec:
    method: str
    options: dict
    quantize: str | None = None
    preset: str | None = None  # the preset name or YAML path it came from; None for an inline mapping

    @property
    def about(self) -> Method:
        """The method's registry entry: what it can do, its tuner."""
        return method(self.method)


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


def resolve_spec(spec, quantize: str | None = None) -> AdapterSpec:
    """The AdapterSpec of a preset name, a YAML path, a dict or an AdapterSpec; `quantize`
    (a recipe's own key) overrides the preset's."""
    if isinstance(spec, AdapterSpec) and quantize in (None, spec.quantize):
        return spec  # already resolved and checked
    if isinstance(spec, AdapterSpec):
        options, preset = {"method": spec.method, **spec.options, "quantize": spec.quantize}, spec.preset
    elif isinstance(spec, (str, Path)):
        options, preset = preset_mapping(spec), str(spec)
    elif isinstance(spec, dict):
        options, preset = dict(spec), None
    else:
        raise PeftkitError(f"an adapter spec is a preset name, a YAML path or a dict, got {type(spec).__name__}")
    name = options.pop("method", None)
    if name not in METHODS:
        raise PeftkitError(
            f"unknown method {name!r}; methods: {', '.join(METHODS)}; presets: {', '.join(preset_names())}"
        )
    preset_quantize = options.pop("quantize", None)
    quantize = quantize or preset_quantize
    check_quantize(quantize)
    return AdapterSpec(name, options, quantize, preset)


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE:
        raise PeftkitError(f"quantize must be one of {', '.join(QUANTIZE)} or null, got {quantize!r}")


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
