"""LoRA in the bank: peft's LoRA files read and checked against the base, then applied per batch
row by a forward hook on each target layer that adds B(A x) to the layer's output.

    hooks = LoraHooks(dict(model.named_modules()))
    tensors = hooks.read(config, state)    # {module path: (A^T, (B * scaling)^T)}; changes nothing
    hooks.add(tensors); hooks.remove(tensors)    # one hook per layer, counted over the adapters using it
    hooks.select(chosen, {name: tensors})  # the plan for one call: None, one adapter, or one per row
    lora_delta(x, a, b)                    # B(A x) for every row alike, or per row

The model's modules stay as they are, so LoRA and peftkit's wrapping methods can share one base.
A batch with several LoRA adapters gathers each row's A and B once per call (`select`) and then
runs two batched matmuls per layer and step (peft's `adapter_names` loops over adapters).
"""
import math
import re

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..errors import PeftkitError

LORA_PREFIX = "base_model.model."  # peft's key prefix in adapter_model.safetensors


class LoraHooks:
    def __init__(self, modules: dict):
        self.modules = modules  # module path -> module, named before any head was switched
        self.hooks = {}  # module path -> [hook handle, number of adapters using it]
        self.now = None  # while a call runs: {module path: (A, B)} for the rows' LoRA adapters

    def read(self, config: dict, state: dict) -> dict:
        """{module path: (A^T, (B * scaling)^T)} from a peft LoRA state dict, checked against the base
        (transposed once here, so that stacking them per row is a plain copy)."""
        if config.get("use_dora"):
            raise PeftkitError("the bank serves plain LoRA; this is a DoRA adapter (use_dora): merge it "
                               "(peftkit merge) or load it on its own with peftkit.load_adapter")
        out = {}
        for path, ab in _pairs(state).items():
            module = self.modules.get(path)
            features = _features(module)
            if features is None or set(ab) != {"A", "B"}:
                raise PeftkitError(f"LoRA weights for {path!r} do not fit this base (no such linear layer, "
                                   "or lora_A / lora_B missing)")
            a, b = ab["A"].float(), ab["B"].float()
            if a.shape[1] != features[0] or b.shape[0] != features[1] or a.shape[0] != b.shape[1]:
                raise PeftkitError(f"LoRA weights for {path!r} have shapes {tuple(a.shape)} / {tuple(b.shape)}; "
                                   f"the layer maps {features[0]} -> {features[1]} features")
            r = a.shape[0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
            scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            device = next(module.parameters()).device
            out[path] = (a.t().contiguous().to(device), (b * scaling).t().contiguous().to(device))
        return out

    def add(self, tensors: dict) -> None:
        for path in tensors:
            if path not in self.hooks:
                handle = self.modules[path].register_forward_hook(self._hook(path), with_kwargs=True)
                self.hooks[path] = [handle, 0]
            self.hooks[path][1] += 1

    def remove(self, tensors: dict) -> None:
        for path in tensors:
            self.hooks[path][1] -= 1
            if self.hooks[path][1] == 0:
                self.hooks.pop(path)[0].remove()

    def select(self, chosen, tensors: dict) -> None:
        """Set the plan to `chosen` (None, an adapter's name, or one name-or-None per row), from
        `tensors` {name: that adapter's read tensors}: one adapter's own tensors, or per-row stacks."""
        if chosen is None or isinstance(chosen, str):
            self.now = None if chosen is None else tensors[chosen]
            return
        used = {n: tensors[n] for n in set(chosen) if n is not None}
        self.now = {path: _stack_rows([used[n].get(path) if n else None for n in chosen])
                    for path in set().union(*used.values())}

    def _hook(self, path: str):
        def hook(module, args, kwargs, output):
            plan = self.now
            if plan is None or path not in plan:
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            return output + lora_delta(x, *plan[path]).to(output.dtype)
        return hook


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B(A x), from A^T and B^T: a [in, r], b [r, out] for every row, or stacked per row:
    a [n, in, r], b [n, r, out]."""
    x = x.to(a.dtype)
    if a.dim() == 2:
        return x @ a @ b
    n = a.shape[0]
    if x.shape[0] != n:  # generate() repeats rows (beams) and some modules flatten tokens into rows
        if x.shape[0] % n:
            raise RuntimeError(f"LoRA got {n} per-row adapters but a layer saw a batch of {x.shape[0]} rows")
        a, b = a.repeat_interleave(x.shape[0] // n, 0), b.repeat_interleave(x.shape[0] // n, 0)
    y = torch.bmm(torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a), b)
    return y.reshape(*x.shape[:-1], b.shape[-1])


def strip(key: str) -> str:
    """A weight's module path in the base, without peft's prefix."""
    return key[len(LORA_PREFIX):] if key.startswith(LORA_PREFIX) else key


def _pairs(state: dict) -> dict:
    """{module path: {"A": lora_A weight, "B": lora_B weight}}; anything else is refused."""
    pairs = {}
    for key, tensor in state.items():
        short = strip(key)
        kind = next((k for k in ("A", "B") if short.endswith(f".lora_{k}.weight")), None)
        if kind is None:
            raise PeftkitError(f"the bank serves plain LoRA (lora_A / lora_B weights); this adapter also "
                               f"holds {key!r} (LoRA bias, embedding LoRA or another variant)")
        pairs.setdefault(short[:-len(".lora_A.weight")], {})[kind] = tensor
    return pairs


def _stack_rows(pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row stacks (A^T [n, in, r], B^T [n, r, out]) for one layer. Rows whose adapter has no
    LoRA here get zeros; smaller ranks are zero-padded to the largest (zeros add nothing)."""
    present = [p for p in pairs if p is not None]
    r = max(a.shape[1] for a, _ in present)
    a0, b0 = present[0]
    zero_a, zero_b = a0.new_zeros(a0.shape[0], r), b0.new_zeros(r, b0.shape[1])
    a = torch.stack([zero_a if p is None else p[0] if p[0].shape[1] == r else F.pad(p[0], (0, r - p[0].shape[1]))
                     for p in pairs])
    b = torch.stack([zero_b if p is None else p[1] if p[1].shape[0] == r else F.pad(p[1], (0, 0, 0, r - p[1].shape[0]))
                     for p in pairs])
    return a, b


def _features(module) -> tuple[int, int] | None:
    if isinstance(module, Conv1D):  # GPT-2: weight is [in, out]
        return tuple(module.weight.shape)
    if isinstance(getattr(module, "in_features", None), int):  # nn.Linear and bitsandbytes' layers
        return module.in_features, module.out_features
    return None


def _pattern_value(patterns: dict, path: str, default):
    """peft's alpha_pattern: the value of the first key that matches the module path's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
