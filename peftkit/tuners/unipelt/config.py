"""Options of UniPELT, validated into a dataclass; defaults are AdapterHub's UniPELTConfig where
they fit small models (see each field).

    Config.from_options({"num_virtual_tokens": 10, "r": 8})
    config.prefix_config(), config.adapter_config()   the parts' own configs
"""
from dataclasses import asdict, dataclass

from ...errors import PeftkitError
from .. import bottleneck, prefix
from ..options import field_names, refuse_unknown_options


@dataclass
class Config:
    num_virtual_tokens: int = 10  # AdapterHub: PrefixTuningConfig(prefix_length=10)
    prefix_projection: bool = True  # AdapterHub reparameterizes the prefix through an MLP (flat=False)
    encoder_hidden_size: int | None = None  # that MLP's width; None = a layer's key width (AdapterHub: 512)
    bottleneck_size: int | None = None  # the adapter (Pfeiffer's, after the feed-forward block): at most one
    reduction_factor: int | None = None  # of these two; neither: reduction_factor 16, as AdapterHub's SeqBnConfig
    non_linearity: str = "relu"
    dropout: float = 0.0  # the adapter's
    r: int = 8  # LoRA's rank, on the attention's query and value (AdapterHub's LoRAConfig: r=8, q and v)
    lora_alpha: float = 8.0  # scaling = lora_alpha / r: 1, what AdapterHub's gated LoRA computes (it sets
    # alpha=2 but leaves alpha/r out once a gate is on)
    lora_dropout: float = 0.0

    @classmethod
    def from_options(cls, options: dict) -> "Config":
        refuse_unknown_options("unipelt", options, field_names(cls))
        config = cls(**options)
        config.validate()
        return config

    def to_options(self) -> dict:
        return asdict(self)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def validate(self) -> None:
        self.prefix_config(), self.adapter_config()  # each part checks its own options
        if not _is_int(self.r) or self.r < 1:
            raise PeftkitError(f"unipelt r must be a positive integer, got {self.r!r}")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise PeftkitError(f"unipelt lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise PeftkitError(f"unipelt lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")

    def prefix_config(self) -> prefix.Config:
        return prefix.Config.from_options({"num_virtual_tokens": self.num_virtual_tokens,
                                           "prefix_projection": self.prefix_projection,
                                           "encoder_hidden_size": self.encoder_hidden_size})

    def adapter_config(self) -> bottleneck.Config:
        return bottleneck.Config.from_options({
            "method": "pfeiffer", "bottleneck_size": self.bottleneck_size, "reduction_factor": self.reduction_factor,
            "non_linearity": self.non_linearity, "dropout": self.dropout})


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_options(method: str, options: dict) -> None:
    Config.from_options(options)


def build_config(method: str, options: dict, model=None, heads=()) -> Config:
    return Config.from_options(options)
