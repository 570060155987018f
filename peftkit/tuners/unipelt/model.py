"""Add, select, save, load and remove UniPELT adapters.

    inject(model, config, name)       prefix (prefix tuner) + gated Pfeiffer adapter (bottleneck tuner)
                                      + gated LoRA on the attention's query and value + prefix gates
    adapter_state_dict(model, name)   keys "prefix." / "adapter." + the parts' tuners' keys,
                                      "lora." + module path, "prefix_gate." + layer
    set_active(model, name | None)    all four parts together; one adapter for the whole batch

The gated LoRA and the prefix gates live in `model._peftkit_unipelt` (PrefixGates, which also
holds the configs) and in LoRAWrapper modules put in place of the targeted layers.
"""
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...architectures import layout_of
from ...errors import PeftkitError
from .. import bottleneck, prefix
from ..bottleneck.layer import BottleneckWrapper
from ..composite import check_name, inject_parts, load_parts_state_dict, parts_state_dict
from ..wrapping import device_of, unwrapped, wrap
from .config import Config
from .layer import GatedBottleneck, GatedLoRA, LoRAWrapper, PrefixGates

ATTR = "_peftkit_unipelt"


class _LoRAPart:
    """The gated LoRA, as a part with its own state dict (keys: module path + A/B/gate)."""

    @staticmethod
    def adapter_state_dict(model, name):
        return {f"{path}.{key}": value.detach().clone() for path, wrapper in _wrappers(model)
                for key, value in wrapper.adapters[name].state_dict().items()}

    @staticmethod
    def load_adapter_state_dict(model, name, state_dict):
        for path, wrapper in _wrappers(model):
            adapter = wrapper.adapters[name]
            adapter.load_state_dict({key: state_dict[f"{path}.{key}"] for key in adapter.state_dict()})


class _GatePart:
    """The prefix gates, one per layer (keys: layer + weight/bias)."""

    @staticmethod
    def adapter_state_dict(model, name):
        return {key: value.detach().clone() for key, value in getattr(model, ATTR).gates[name].state_dict().items()}

    @staticmethod
    def load_adapter_state_dict(model, name, state_dict):
        getattr(model, ATTR).gates[name].load_state_dict(state_dict)


PARTS = {"prefix.": prefix, "adapter.": bottleneck, "lora.": _LoRAPart, "prefix_gate.": _GatePart}


def inject(model: nn.Module, config: Config, name: str) -> None:
    """Add UniPELT adapter `name` and make it active; everything is checked before the model changes."""
    if not isinstance(config, Config):
        raise PeftkitError(f"config must be a unipelt Config, got {type(config).__name__}")
    if name in _configs(model):
        raise PeftkitError(f"unipelt adapter {name!r} already exists; existing: {', '.join(_configs(model))}")
    targets = _lora_targets(model)
    attentions = _attentions(model)
    inject_parts(model, [(prefix, config.prefix_config()), (bottleneck, config.adapter_config())], name)
    _gate_adapters(model, name, config)
    for path in targets:
        wrapper = wrap(model, path, LoRAWrapper)
        inner = wrapper.base_layer
        lora = GatedLoRA(*_features(inner), config.r, config.scaling, config.lora_dropout)
        wrapper.adapters[name] = lora.to(device_of(inner, model))
    gates = getattr(model, ATTR, None)
    if gates is None:
        gates = PrefixGates()
        gates.hook(model.base_model, attentions)  # after inject_parts: the prefix tuner's hook runs first
        setattr(model, ATTR, gates)
    gates.add(name, model.config.hidden_size, len(attentions), model.get_input_embeddings().weight.device)
    gates.configs[name] = config
    set_active(model, name)


def adapter_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    check_name(_configs(model), name, "unipelt")
    return parts_state_dict(model, name, PARTS)


def load_adapter_state_dict(model, name: str, state_dict: dict) -> None:
    check_name(_configs(model), name, "unipelt")
    load_parts_state_dict(model, name, PARTS, state_dict, "unipelt")


def set_active(model, name) -> None:
    if isinstance(name, (list, tuple)):
        raise PeftkitError("unipelt takes one adapter for the whole batch (its prefix gate averages a sample's "
                           "tokens); give one adapter name or None")
    if name is not None:
        check_name(_configs(model), name, "unipelt")
    prefix.set_active(model, name)
    bottleneck.set_active(model, name)
    for _, wrapper in _wrappers(model):
        wrapper.active = name
    gates = getattr(model, ATTR, None)
    if gates is not None:
        gates.active = name


def remove(model, name: str) -> None:
    check_name(_configs(model), name, "unipelt")
    for path, wrapper in list(_wrappers(model)):
        del wrapper.adapters[name]
        if not wrapper.adapters:  # nothing left: put the original layer back
            model.set_submodule(path, wrapper.base_layer)
        elif wrapper.active == name:
            wrapper.active = None
    gates = getattr(model, ATTR)
    del gates.gates[name], gates.configs[name]
    if gates.active == name:
        gates.active = None
    if not gates.configs:
        gates.unhook()
        delattr(model, ATTR)
    bottleneck.remove(model, name)
    prefix.remove(model, name)


def describe(model) -> str:
    """The parts' sizes, for `bench params`."""
    config = next(iter(_configs(model).values()))
    layers = [w for _, w in _wrappers(model)]
    return (f"prefix {prefix.describe(model)}; adapter {bottleneck.describe(model)}; "
            f"LoRA r={config.r} at {len(layers)} layers; all gated")


# --- where the parts go ---

def _lora_targets(model) -> list[str]:
    """The attention's query and value layers (peft's default LoRA targets for the architecture)."""
    names = layout_of(model).lora_targets
    found = [path for path, module in model.named_modules()
             if path.rsplit(".", 1)[-1] in names and _features(unwrapped(module, LoRAWrapper)) is not None]
    if not found:
        raise PeftkitError(f"unipelt: found no {', '.join(names)} layer in {type(model).__name__} to put LoRA on")
    return found


def _attentions(model) -> list[nn.Module]:
    """The self-attention modules in layer order: their inputs drive the prefix gates."""
    found = {m.layer_idx: m for m in model.modules()
             if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)}
    layers = model.config.num_hidden_layers
    if sorted(found) != list(range(layers)):
        raise PeftkitError(f"unipelt: cannot find the {layers} attention layers of {type(model).__name__} "
                           f"(found layers {sorted(found)})")
    return [found[i] for i in range(layers)]


def _gate_adapters(model, name: str, config: Config) -> None:
    """Swap the bottleneck tuner's plain adapters of `name` for gated ones of the same shape."""
    for module in model.modules():
        if isinstance(module, BottleneckWrapper) and name in module.adapters:
            plain = module.adapters[name]
            gated = GatedBottleneck(plain.down.in_features, plain.up.out_features, plain.down.out_features,
                                    config.non_linearity, config.dropout)
            module.adapters[name] = gated.to(plain.up.weight.device)


def _wrappers(model):
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRAWrapper)]


def _features(layer) -> tuple[int, int] | None:
    """(in, out) of a linear layer: nn.Linear and bitsandbytes' layers, or GPT-2's Conv1D (weight in x out)."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    in_f, out_f = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
    return (in_f, out_f) if isinstance(in_f, int) and isinstance(out_f, int) else None


def _configs(model) -> dict:
    gates = getattr(model, ATTR, None)
    return gates.configs if gates is not None else {}
