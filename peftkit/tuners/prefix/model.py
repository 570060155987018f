"""Add, select, save, load and remove prefix adapters on a transformers model.

All state lives in `model._peftkit_prefix` (a PrefixBank submodule); the only other change
to the model is one forward pre-hook on its body, removed with the last adapter.
"""
import torch
from torch import nn

from peftkit.errors import PeftkitError

from .config import Config
from .layer import Geometry, PrefixBank

SUPPORTED = ("bert", "roberta", "xlm-roberta", "llama", "mistral", "qwen2", "qwen3", "gpt2")
ABSOLUTE_POSITIONS = ("bert", "roberta", "xlm-roberta", "gpt2")
ATTR = "_peftkit_prefix"
KEY_PREFIX = "prefix_encoder."  # state-dict keys as in peft: prefix_encoder.embedding.weight, ...


def inject(model: nn.Module, config: Config, name: str) -> None:
    """Add a trainable prefix adapter `name` and make it the active one (as peft does)."""
    config.validate()
    if not isinstance(name, str) or not name or "." in name:  # it becomes a submodule name
        raise PeftkitError(f"prefix: adapter name must be a non-empty string without '.', got {name!r}")
    bank = getattr(model, ATTR, None)
    if bank is None:
        bank = _new_bank(model)
    if name in bank.encoders:
        raise PeftkitError(f"prefix: adapter {name!r} already exists on this model")
    bank.add(name, config, model.get_input_embeddings().weight.device)
    bank.active = name


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    encoder = _bank(model, name).encoders[name]
    return {KEY_PREFIX + key: value.detach().clone() for key, value in encoder.state_dict().items()}


def load_adapter_state_dict(model: nn.Module, name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Strict: every key present with its shape, nothing extra; on error nothing is changed."""
    encoder = _bank(model, name).encoders[name]
    expected = {KEY_PREFIX + key: value.shape for key, value in encoder.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = {key: tuple(getattr(state_dict[key], "shape", ())) for key in set(expected) & set(state_dict)}
    wrong = sorted(f"{key} (expected {tuple(expected[key])}, got {shape})"
                   for key, shape in shapes.items() if shape != tuple(expected[key]))
    if missing or unexpected or wrong:
        problems = [f"{label}: {', '.join(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
        raise PeftkitError(f"prefix adapter {name!r} cannot load this state dict; " + "; ".join(problems))
    encoder.load_state_dict({key[len(KEY_PREFIX):]: value for key, value in state_dict.items()})


def set_active(model: nn.Module, name: str | list[str | None] | None) -> None:
    """One adapter for all rows, a list with one name (or None) per batch row, or None = base model."""
    if isinstance(name, (list, tuple)):
        if not name:
            raise PeftkitError("prefix: set_active got an empty list; "
                               "give one adapter name (or None) per batch row")
        for entry in name:
            if entry is not None:
                _bank(model, entry)  # raises for unknown names
        name = list(name)
    elif name is not None:
        _bank(model, name)
    bank = getattr(model, ATTR, None)
    if bank is not None:
        bank.active = name


def remove(model: nn.Module, name: str) -> None:
    bank = _bank(model, name)
    del bank.encoders[name]
    del bank.configs[name]
    if isinstance(bank.active, list):  # rows of the removed adapter fall back to the base model
        bank.active = [None if entry == name else entry for entry in bank.active]
    elif bank.active == name:
        bank.active = None
    if not bank.encoders:  # last one gone: give the model back untouched
        bank.hook.remove()
        delattr(model, ATTR)


def _new_bank(model: nn.Module) -> PrefixBank:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise PeftkitError(
            f"prefix tuning does not support model_type {model_type!r}; supported: {', '.join(SUPPORTED)}"
        )
    bank = PrefixBank(_geometry(config))
    body = model.base_model  # the part that owns the cache, under any task head
    bank.hook = body.register_forward_pre_hook(bank.before_forward, with_kwargs=True)
    setattr(model, ATTR, bank)  # registers it as a submodule
    return bank


def _geometry(config) -> Geometry:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads  # grouped-query attention
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    max_positions = None  # rotary models have no table to run out of
    if config.model_type in ABSOLUTE_POSITIONS:
        max_positions = config.max_position_embeddings
        if "roberta" in config.model_type:  # positions start after padding_idx
            max_positions -= config.pad_token_id + 1
    return Geometry(config.num_hidden_layers, kv_heads, head_dim, max_positions)


def _bank(model: nn.Module, name: str) -> PrefixBank:
    bank = getattr(model, ATTR, None)
    known = sorted(bank.encoders) if bank is not None else []
    if name not in known:
        raise PeftkitError(f"prefix: no adapter named {name!r}; known: {', '.join(known) or 'none'}")
    return bank


def describe(model) -> str:
    """The prefix's shape, for `bench params`."""
    bank = model._peftkit_prefix
    config = next(iter(bank.configs.values()))
    mlp = "" if not config.prefix_projection else f", MLP {config.encoder_hidden_size or bank.geometry.token_dim}"
    return f"{config.num_virtual_tokens} tokens x {bank.geometry.num_layers} layers{mlp}"
