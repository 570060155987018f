"""MAM adapters (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"):
prefix tuning in every attention layer plus a scaled parallel adapter beside every feed-forward block.

    attach(model, {"method": "mam"})                      AdapterHub's MAMConfig, sized for small models
    attach(model, {"method": "mam", "num_virtual_tokens": 10, "reduction_factor": 4})

Composed of peftkit's own tuners under one adapter name: the prefix in the prefix tuner's
bank, the adapter in the bottleneck tuner's wrappers (a "parallel" adapter). Those two tuners
switch it (Method.parts), so the bank mixes it per row with prefix and bottleneck adapters.
State-dict keys: "prefix." + the prefix tuner's keys, "adapter." + the bottleneck tuner's.
The contract is the one in peftkit.tuners.
"""
from dataclasses import asdict, dataclass

from ..errors import PeftkitError
from . import bottleneck, prefix
from .composite import check_name, inject_parts, load_parts_state_dict, parts_state_dict
from .options import field_names, refuse_unknown_options

PARTS = {"prefix.": prefix, "adapter.": bottleneck}
STATE = "_peftkit_mam"  # model.__dict__: {adapter name: Config}
DEFAULT_REDUCTION_FACTOR = 2  # AdapterHub's ParBnConfig; the paper's MAM: bottleneck 512 on BART-large's 1024


@dataclass
class Config:
    num_virtual_tokens: int = 30  # AdapterHub's PrefixTuningConfig and the paper: l = 30
    prefix_projection: bool = True  # AdapterHub reparameterizes MAM's prefix through an MLP (flat=False)
    encoder_hidden_size: int | None = None  # that MLP's width; None = a layer's key width (AdapterHub: 800)
    bottleneck_size: int | None = None  # at most one of these two; neither: reduction_factor 2
    reduction_factor: int | None = None
    non_linearity: str = "relu"
    scaling: float = 4.0  # the parallel adapter's output scale s = 4 (paper and ParBnConfig)
    dropout: float = 0.0

    @classmethod
    def from_options(cls, options: dict) -> "Config":
        refuse_unknown_options("mam", options, field_names(cls))
        config = cls(**options)
        config.prefix_config(), config.adapter_config()  # each part validates its own options
        return config

    def to_options(self) -> dict:
        return asdict(self)

    def prefix_config(self) -> prefix.Config:
        return prefix.Config.from_options({"num_virtual_tokens": self.num_virtual_tokens,
                                           "prefix_projection": self.prefix_projection,
                                           "encoder_hidden_size": self.encoder_hidden_size})

    def adapter_config(self) -> bottleneck.Config:
        reduction = self.reduction_factor
        if reduction is None and self.bottleneck_size is None:
            reduction = DEFAULT_REDUCTION_FACTOR
        return bottleneck.Config.from_options({
            "method": "parallel", "bottleneck_size": self.bottleneck_size, "reduction_factor": reduction,
            "non_linearity": self.non_linearity, "scaling": self.scaling, "dropout": self.dropout})


def check_options(method: str, options: dict) -> None:
    Config.from_options(options)


def build_config(method: str, options: dict, model=None, heads=()) -> Config:
    return Config.from_options(options)


def inject(model, config: Config, name: str) -> None:
    """Add MAM adapter `name` (prefix and parallel adapter) and make it active."""
    if not isinstance(config, Config):
        raise PeftkitError(f"config must be a mam Config, got {type(config).__name__}")
    if name in _state(model):
        raise PeftkitError(f"mam adapter {name!r} already exists; existing: {', '.join(_state(model))}")
    inject_parts(model, [(prefix, config.prefix_config()), (bottleneck, config.adapter_config())], name)
    model.__dict__[STATE] = {**_state(model), name: config}


def adapter_state_dict(model, name: str) -> dict:
    check_name(_state(model), name, "mam")
    return parts_state_dict(model, name, PARTS)


def load_adapter_state_dict(model, name: str, state_dict: dict) -> None:
    check_name(_state(model), name, "mam")
    load_parts_state_dict(model, name, PARTS, state_dict, "mam")


def set_active(model, name) -> None:
    """One adapter (both its parts), one name-or-None per batch row, or None: no MAM adapter."""
    for entry in (name if isinstance(name, (list, tuple)) else [name]):
        if entry is not None:
            check_name(_state(model), entry, "mam")  # before either part changes
    prefix.set_active(model, name)
    bottleneck.set_active(model, name)


def remove(model, name: str) -> None:
    check_name(_state(model), name, "mam")
    bottleneck.remove(model, name)
    prefix.remove(model, name)
    state = {k: v for k, v in _state(model).items() if k != name}
    if state:
        model.__dict__[STATE] = state
    else:
        del model.__dict__[STATE]


def describe(model) -> str:
    """Both parts' sizes, for `bench params`."""
    return f"prefix {prefix.describe(model)}; parallel adapter {bottleneck.describe(model)}"


def _state(model) -> dict:
    # in the model's __dict__, like the bottleneck tuner's: it follows the model, never in its state dict
    return model.__dict__.get(STATE) or {}
