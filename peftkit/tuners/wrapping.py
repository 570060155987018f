"""Modules that stand in for one of a model's layers and keep it as `base_layer` (the bottleneck
tuner's wrappers, UniPELT's gated-LoRA wrappers), and swapping them in and out by dotted path.

    class MyWrapper(LayerWrapper): ...
    wrapper = wrap(model, "encoder.layer.0.output.dense", MyWrapper)   # the one there, or a new one
    model.set_submodule(path, wrapper.base_layer)                      # the layer back (torch's own)
    unwrapped(module, MyWrapper)                                       # the layer inside, if wrapped
    device_of(layer, model)                                            # where an adapter beside it goes
"""
from torch import nn


class LayerWrapper(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def __getattr__(self, name):
        # Model code sometimes reads the wrapped layer's attributes (e.g. `c_proj.weight`).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


def wrap(model: nn.Module, path: str, wrapper_class) -> LayerWrapper:
    module = model.get_submodule(path)
    if isinstance(module, wrapper_class):
        return module
    wrapper = wrapper_class(module)
    model.set_submodule(path, wrapper)
    return wrapper


def unwrapped(module: nn.Module, wrapper_class) -> nn.Module:
    return module.base_layer if isinstance(module, wrapper_class) else module


def device_of(layer: nn.Module, model: nn.Module):
    param = next(layer.parameters(), None)  # model.device only when needed: a plain nn.Module has none
    return param.device if param is not None else model.device
