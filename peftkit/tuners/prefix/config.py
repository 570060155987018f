"""Options of prefix tuning (Li & Liang 2021), validated into a dataclass."""
from dataclasses import asdict, dataclass

from peftkit.errors import PeftkitError
from ..options import field_names, refuse_unknown_options


@dataclass
class Config:
    num_virtual_tokens: int = 20  # prefix length P: key/value slots prepended in every layer
    prefix_projection: bool = False  # reparameterize the prefix through a 2-layer MLP (paper §4.3)
    encoder_hidden_size: int | None = None  # MLP width; None = peft's default, the key width of a layer

    @classmethod
    def from_options(cls, options: dict) -> "Config":
        refuse_unknown_options("prefix", options, field_names(cls))
        config = cls(**options)
        config.validate()
        return config

    def to_options(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if not _is_int(self.num_virtual_tokens) or self.num_virtual_tokens <= 0:
            raise PeftkitError(
                f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}"
            )
        if not isinstance(self.prefix_projection, bool):
            raise PeftkitError(f"prefix_projection must be true or false, got {self.prefix_projection!r}")
        size = self.encoder_hidden_size
        if size is not None and (not _is_int(size) or size <= 0):
            raise PeftkitError(f"encoder_hidden_size must be a positive integer or null, got {size!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int subclass; reject True


def check_options(method: str, options: dict) -> None:
    Config.from_options(options)


def build_config(method: str, options: dict, model=None, heads=()) -> Config:
    return Config.from_options(options)
