"""UniPELT's gates and its gated LoRA.

    GatedBottleneck(...)      a bottleneck adapter whose output is scaled by sigmoid(gate(x)) per token
    GatedLoRA(in, out, r, scaling, dropout)
        sigmoid(gate(x)) * scaling * B(A(dropout(x))): one adapter's addition to a linear layer
    LoRAWrapper(base_layer)   base_layer(x) + the active GatedLoRA's addition
    PrefixGates(hidden, layers)
        per layer, one gate per sample: the mean over the sample's tokens of sigmoid(gate(h)), h the
        attention's input; it scales that layer's prefix keys and values (as AdapterHub does)

Every gate is a Linear(width, 1) with weight ~ N(0, 0.02) and bias 0, so it starts near 0.5.
The LoRA and adapter gates are per token (AdapterHub averages them over the sequence); per
token, a position's output depends on no later token and no padding. The prefix sits in the
KV cache, shared by every query of a sample, so its gate is one number per sample and layer.
"""
import torch
from torch import nn

from ..bottleneck.layer import Bottleneck
from ..wrapping import LayerWrapper


def gate(width: int) -> nn.Linear:
    layer = nn.Linear(width, 1, dtype=torch.float32)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


class GatedBottleneck(Bottleneck):
    def __init__(self, in_dim, out_dim, size, non_linearity="relu", dropout=0.0):
        super().__init__(in_dim, out_dim, size, non_linearity, dropout)
        self.gate = gate(in_dim)

    def forward(self, x):
        return super().forward(x) * torch.sigmoid(self.gate(x))


class GatedLoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float):
        super().__init__()
        self.A = nn.Linear(in_features, r, bias=False, dtype=torch.float32)  # nn.Linear's kaiming-uniform init
        self.B = nn.Linear(r, out_features, bias=False, dtype=torch.float32)
        nn.init.zeros_(self.B.weight)  # adds exactly 0 at step 0, as LoRA does
        self.gate = gate(in_features)
        self.drop = nn.Dropout(dropout)
        self.scaling = scaling

    def forward(self, x):
        return torch.sigmoid(self.gate(x)) * self.scaling * self.B(self.A(self.drop(x)))


class LoRAWrapper(LayerWrapper):
    """Stands in for a linear layer (nn.Linear, a 4/8-bit one, GPT-2's Conv1D); adapters by name."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.adapters = nn.ModuleDict()
        self.active = None  # adapter name or None

    def forward(self, x, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        if self.active is None or self.active not in self.adapters:
            return out
        # fp32 adapter on a possibly half-precision or 4/8-bit base: compute in fp32, add in the output's dtype
        return out + self.adapters[self.active](x.float()).to(out.dtype)


class PrefixGates(nn.Module):
    """All UniPELT adapters' prefix gates on one model (a submodule of it) and the active one.

    A pre-hook on the model body runs after the prefix tuner's: when that forward put the prefix
    into a fresh cache, pre-hooks on the attention layers scale each layer's prefix slots in the
    cache by the layer's gate before the layer adds its tokens to them. Later cached steps
    (generate) find the prefix gated already.
    """

    def __init__(self):
        super().__init__()
        self.gates = nn.ModuleDict()  # name -> one gate per layer
        self.configs = {}  # name -> unipelt Config
        self.active = None
        self.hooks = []
        self._pending = None  # (cache, token mask) of the forward in progress, while its prefix needs gating

    def add(self, name: str, hidden: int, layers: int, device) -> None:
        self.gates[name] = nn.ModuleList(gate(hidden) for _ in range(layers)).to(device)

    def hook(self, body: nn.Module, attentions: list[nn.Module]) -> None:
        self.hooks = [body.register_forward_pre_hook(self.before_body, with_kwargs=True),
                      body.register_forward_hook(self.after_body, always_call=True)]
        for layer, attention in enumerate(attentions):
            self.hooks.append(attention.register_forward_pre_hook(
                lambda module, args, kwargs, layer=layer: self.before_attention(layer, args, kwargs),
                with_kwargs=True))

    def unhook(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    def before_body(self, body, args, kwargs):
        self._pending = None
        if self.active is None:
            return None
        cache = next((kwargs[k] for k in ("past_key_values", "cache") if kwargs.get(k) is not None), None)
        prefix = getattr(cache, "peftkit_prefix", None)
        if prefix is None or getattr(cache, "peftkit_gated", False):
            return None  # no prefix this call, or a later step whose cache holds the gated prefix
        cache.peftkit_gated = True
        # the prefix tuner's hook made the mask 2D with the prefix's slots first; the gate averages real tokens
        self._pending = (cache, kwargs["attention_mask"][:, prefix.mask.shape[1]:].float())
        return None

    def after_body(self, body, args, output):
        self._pending = None  # don't keep the cache alive past the forward

    def before_attention(self, layer: int, args, kwargs):
        if self._pending is None:
            return None
        cache, mask = self._pending
        hidden = args[0] if args else kwargs["hidden_states"]
        per_token = torch.sigmoid(self.gates[self.active][layer](hidden.float()))[..., 0]
        per_sample = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        slots = cache.layers[layer]  # only the prefix so far: this layer adds its tokens after the hook
        g = per_sample.view(-1, 1, 1, 1).to(slots.keys.dtype)
        slots.keys, slots.values = slots.keys * g, slots.values * g
        return None
