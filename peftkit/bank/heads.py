"""Task heads (classifier, score, qa_outputs) differ per adapter: the bank replaces the model's head
with a HeadSwitch holding each adapter's head, and every batch row goes through its own.

    switch = HeadSwitch(model.classifier); setattr(model, "classifier", switch)
    switch.heads[name] = head_like(switch.original, "classifier", adapter_state)
    switch.active = None | name | [name-or-None per row]
"""
import copy

import torch
from torch import nn

from ..errors import PeftkitError
from .lora import strip


class HeadSwitch(nn.Module):
    """Stands in for a task head: one head per adapter, and each batch row goes through its own.
    Heads of different widths (2 vs 5 labels) are padded with -inf: softmax gives those 0."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original  # the base model's own head, used by rows without an adapter
        self.heads = nn.ModuleDict()
        self.active = None  # None | name | list with one name-or-None per row

    def forward(self, x):
        if self.active is None or isinstance(self.active, str):
            return (self.original if self.active is None else self.heads[self.active])(x)
        from ..tuners.bottleneck.layer import rows_per_entry
        names = rows_per_entry(self.active, x.shape[0])
        parts = {}
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            parts[name] = (rows, (self.original if name is None else self.heads[name])(x.index_select(0, rows)))
        first = next(iter(parts.values()))[1]
        width = max(y.shape[-1] for _, y in parts.values())
        out = first.new_full((x.shape[0], *first.shape[1:-1], width), float("-inf"))
        for rows, y in parts.values():
            out[rows, ..., :y.shape[-1]] = y
        return out


def head_like(original: nn.Module, head: str, state: dict) -> nn.Module:
    """A copy of the base's head shaped for (and holding) an adapter's head weights."""
    own = {strip(k)[len(head) + 1:]: v for k, v in state.items() if strip(k).split(".")[0] == head}
    if not own:
        raise PeftkitError(f"the adapter has no weights for the task head {head!r}; it cannot serve this task")
    module = copy.deepcopy(original)
    for name, linear in list(module.named_modules()):
        weight = own.get(f"{name}.weight" if name else "weight")
        if isinstance(linear, nn.Linear) and weight is not None and weight.shape != linear.weight.shape:
            resized = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype)
            if name:
                parent, _, child = name.rpartition(".")
                setattr(module.get_submodule(parent), child, resized)
            else:
                module = resized
    try:
        module.load_state_dict(own)
    except RuntimeError as err:
        raise PeftkitError(f"the adapter's {head!r} head does not fit this base: {err}") from None
    return module.eval().requires_grad_(False)
