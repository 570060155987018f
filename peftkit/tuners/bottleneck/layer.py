"""The adapter module and the wrapper that adds it to a model's module.

    Bottleneck(in_dim, out_dim, size, non_linearity, dropout, parallel, scaling)
        scaling * up(act(down(x))): an adapter's contribution to the wrapped output
    BottleneckWrapper(base_layer)
        out = base_layer(...); out + Bottleneck(src) for the active adapter, where src is
        the wrapped output (sequential: Houlsby/Pfeiffer) or the feed-forward input (parallel)

The wrapper keeps adapters by name in `adapters` (an nn.ModuleDict), so one model can
hold many; `active` picks one (a name), none (None), a composition block (peftkit.composition),
or one name, block or None per batch row (a tuple). AdapterFusion layers sit beside them in
`fusions` (tuners/bottleneck/fusion.py).
"""
import torch
from torch import nn

from ...composition import Average, Block, Fuse, Parallel, Stack
from ..wrapping import LayerWrapper

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    def __init__(self, in_dim, out_dim, size, non_linearity="relu", dropout=0.0, parallel=False, scaling=1.0):
        super().__init__()
        self.down = nn.Linear(in_dim, size, dtype=torch.float32)
        self.act = ACTIVATIONS[non_linearity]()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(size, out_dim, dtype=torch.float32)
        # down keeps nn.Linear's kaiming-uniform init so `up` gets a useful gradient from the
        # first step; a zero `up` makes the adapter add exactly 0, i.e. step 0 is the base model.
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.parallel = parallel  # reads the feed-forward input instead of the wrapped output
        self.scaling = scaling

    def forward(self, x):
        y = self.up(self.drop(self.act(self.down(x))))
        return y if self.scaling == 1.0 else y * self.scaling


class BottleneckWrapper(LayerWrapper):
    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.adapters = nn.ModuleDict()
        self.fusions = nn.ModuleDict()  # AdapterFusion layers at this site, by fusion name (fusion.py)
        self.active = None  # None | adapter name | tuple with one name-or-None per batch row
        self.source = None  # (module,) whose input parallel adapters read, when it isn't base_layer
        self._captured = None  # that module's latest input, set by its forward pre-hook

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if self.source is None:
            x = args[0] if args else next(iter(kwargs.values()), None)
        else:
            x, self._captured = self._captured, None  # don't keep the activation alive past this layer
        if self.active is None or not self.adapters:
            return out
        if isinstance(out, tuple):  # e.g. a user-targeted attention module returning (hidden, weights)
            return (self._add(out[0], x),) + tuple(out[1:])
        return self._add(out, x)

    def _add(self, h, x):
        if self.active is None or isinstance(self.active, str) or (isinstance(self.active, Block)
                                                                    and not isinstance(self.active, Parallel)):
            return self._output(self.active, h, x)
        # Mixed batch (or Parallel's copies of it): each entry runs on its own rows only, and
        # index_copy writes those rows back, so every row equals a run of that row alone with it.
        entries = self.active.adapters if isinstance(self.active, Parallel) else self.active
        names = rows_per_entry(entries, h.shape[0])
        out = h
        for entry in dict.fromkeys(names):
            if entry is None:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == entry], device=h.device)
            xs = None if x is None else x.index_select(0, rows)
            out = out.index_copy(0, rows, self._output(entry, h.index_select(0, rows), xs))
        return out

    def _output(self, entry, h, x):
        """The site's output under `entry`: an adapter's name or a block; adapters not at this site add nothing."""
        if isinstance(entry, str):
            return h + self._delta(entry, h, x) if entry in self.adapters else h
        if isinstance(entry, Stack):  # each adapter reads the output of the one before it
            for name in entry.adapters:
                if name in self.adapters:
                    h = h + self._delta(name, h, x)
            return h
        if isinstance(entry, Average):  # its adapters sit at the same sites (set_active checks)
            if entry.adapters[0] not in self.adapters:
                return h
            return h + sum(w * self._delta(name, h, x) for name, w in zip(entry.adapters, entry.weights))
        if isinstance(entry, Fuse):  # the fusion layer attends over the adapters' additions
            fusion = next((f for f in self.fusions.values() if f.adapters == entry.adapters), None)
            if fusion is None:
                return h
            deltas = [self._delta(name, h, x, torch.float32) for name in entry.adapters]
            return h + fusion(h.float(), deltas).to(h.dtype)
        return h

    def _delta(self, name, h, x, dtype=None):
        adapter = self.adapters[name]
        src = x if adapter.parallel else h
        if src is None:
            raise RuntimeError(f"parallel adapter {name!r} did not see the feed-forward input in this forward pass")
        # fp32 adapter on a possibly fp16/bf16 (or 4/8-bit) base: compute in fp32, add in the output's dtype
        return adapter(src.float()).to(dtype or h.dtype)

    # --- parallel adapters whose input is another module's input (BERT: `intermediate`) ---

    def set_source(self, module: nn.Module | None):
        """Read parallel adapters' input from `module`'s input via a forward pre-hook."""
        if self.source is not None:
            hooks = self.source[0]._forward_pre_hooks
            # found by owner rather than kept as a handle, so a deep-copied model stays consistent
            for key in [k for k, fn in hooks.items() if getattr(fn, "__self__", None) is self]:
                del hooks[key]
            self.source, self._captured = None, None
        if module is not None:
            module.register_forward_pre_hook(self._capture, with_kwargs=True)
            self.source = (module,)  # a tuple so nn.Module doesn't register it as our submodule

    def _capture(self, module, args, kwargs):
        self._captured = args[0] if args else next(iter(kwargs.values()), None)


def rows_per_entry(names, n: int) -> tuple:
    """Expand one-entry-per-batch-row `names` to the n rows a module actually sees.

    generate() repeats each row for beams / num_return_sequences, and modules that flatten
    [B, T, H] to [B*T, H] repeat it per token: both are repeat_interleave.
    """
    if n == len(names):
        return tuple(names)
    if n % len(names) == 0:
        k = n // len(names)
        return tuple(name for name in names for _ in range(k))
    raise RuntimeError(
        f"set_active was given {len(names)} per-row adapters but a module got a batch of {n} rows"
    )
