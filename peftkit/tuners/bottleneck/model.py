"""Put bottleneck adapters into a transformers model, and manage them by name.

    inject(model, config, name)                      add adapter `name` (and make it active)
    adapter_state_dict(model, name) -> {key: tensor} keys are module paths, without `name`
    load_adapter_state_dict(model, name, state_dict) strict; nothing changes on error
    set_active(model, name | block | None | [name, Stack, Average or None per batch row])
    check_active(model, name | block | ...)         set_active's checks alone
    remove(model, name)                              unwraps modules left without adapters

Where adapters go: Houlsby after every attention output projection and feed-forward
output, Pfeiffer after the feed-forward output only (or wherever `target_modules` says),
Compacter where Houlsby's go (or Pfeiffer's: placement), parallel beside the feed-forward
block (input of `ffn_input`, added to the output of `ffn_output`). The insertion points come
from peftkit.architectures.
"""
import re
from dataclasses import replace

import torch
from torch import nn

from ...architectures import layout_of
from ...composition import Average, Block, Fuse, Parallel, Stack
from ...errors import PeftkitError
from ..wrapping import device_of, unwrapped, wrap
from .config import Config
from .layer import Bottleneck, BottleneckWrapper
from .phm import SHARED, Compacter, check_widths, new_rule

STATE = "_peftkit_bottleneck"  # model attribute: {"adapters": {name: (config, [site names])}, "active": ...,
# "fusions": {name: (fused adapter names, [site names], [adapters the fusion brought in])}} (see fusion.py)


def inject(model: nn.Module, config: Config, name: str) -> None:
    state = _state(model)
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):
        raise PeftkitError(f"adapter name must be a non-empty string without '.', not a ModuleDict attribute; got {name!r}")
    if name in state["adapters"] or name in state["fusions"]:
        raise PeftkitError(f"cannot add adapter {name!r}: {holding(state, name)[0]}; pick another name")
    if not isinstance(config, Config):
        raise PeftkitError(f"config must be a bottleneck Config, got {type(config).__name__}")
    hidden, size, sites = fitted(model, config)  # everything is checked before the first change below
    rule = new_rule(config.phm_dim) if config.method == "compacter" else None  # one per adapter, for all its sites

    for site_name, source_name in sites:
        wrapper = wrap(model, site_name, BottleneckWrapper)
        parallel = config.method == "parallel"
        width = _out_features(wrapper.base_layer, hidden)
        if rule is not None:
            adapter = Compacter(width, width, size, rule, config.phm_rank, config.non_linearity, config.dropout)
        else:
            adapter = Bottleneck(
                in_dim=hidden if parallel else width,
                out_dim=width,
                size=size,
                non_linearity=config.non_linearity,
                dropout=config.dropout,
                parallel=parallel,
                scaling=config.scaling if parallel else 1.0,
            )
        wrapper.adapters[name] = adapter.to(device_of(wrapper.base_layer, model))
        if source_name is not None and wrapper.source is None:
            # hook the innermost module: wrappers come and go around it, its input stays the same
            wrapper.set_source(_unwrapped(model.get_submodule(source_name)))
    state["adapters"][name] = (replace(config), [site for site, _ in sites])  # a copy: callers may reuse theirs
    model.__dict__[STATE] = state
    set_active(model, name)


def holding(state: dict, name: str) -> tuple[str, str]:
    """For a refusal over a name the model holds: who holds it, and what to unload to free it. An adapter
    a saved fusion brought in is no entry of its own (a bank unloads the fusion), so that fusion is named."""
    brought = [f for f, (_, _, bodies) in state["fusions"].items() if name in bodies]
    if brought:
        return f"fusion {brought[0]!r} brought in an adapter by that name", brought[0]
    return f"the model holds a {'fusion' if name in state['fusions'] else 'bottleneck adapter'} by that name", name


def fitted(model: nn.Module, config: Config) -> tuple[int, int, list]:
    """(hidden size, bottleneck width, insertion points) of `config` on `model`, without changing it;
    PeftkitError if the adapter does not fit."""
    hidden = _hidden_size(model)
    config.check_sizes(hidden)
    sites = _plan(model, config)
    if config.method == "compacter":  # its bottleneck width is a multiple of phm_dim already (Config)
        check_widths(config.phm_dim, {site: _out_features(_unwrapped(model.get_submodule(site)), hidden)
                                      for site, _ in sites})
    return hidden, config.bottleneck_dim(hidden), sites


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {key: t.detach().clone() for key, t in _adapter_tensors(model, name).items()}


def load_adapter_state_dict(model: nn.Module, name: str, state_dict: dict) -> None:
    copy_strict(_adapter_tensors(model, name), state_dict, f"bottleneck adapter {name!r}")


def copy_strict(own: dict, state_dict: dict, what: str) -> None:
    """Copy `state_dict` into the tensors `own` ({key: parameter}) when its keys and shapes are exactly
    theirs; otherwise change nothing and name every problem."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    problems = []
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected)}")
    for key in sorted(set(own) & set(state_dict)):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != own[key].shape:
            problems.append(f"{key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    if problems:
        raise PeftkitError(f"cannot load {what}: " + "; ".join(problems))
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(state_dict[key])


def set_active(model: nn.Module, name) -> None:
    """`name`: an adapter's or a fusion's name, a block (peftkit.composition), None, or one of those
    but Parallel per batch row. Under Parallel the model repeats its batch once per adapter (see _Replicate)."""
    state = _state(model)
    name = check_active(model, name)
    state["active"] = name
    _replicate(model, len(name.adapters) if isinstance(name, Parallel) else None)
    for module in model.modules():
        if isinstance(module, BottleneckWrapper):
            module.active = name


def check_active(model: nn.Module, name):
    """`name` as set_active takes it (a list made a tuple), or PeftkitError; changes nothing."""
    state = _state(model)
    if isinstance(name, (list, tuple)):
        if not name:
            raise PeftkitError("set_active got an empty list; give one adapter name (or None) per batch row")
        name = [_fused(state, n) for n in name]
        parallel = [n for n in name if isinstance(n, Parallel)]
        if parallel:
            raise PeftkitError(f"a batch row cannot run {parallel[0]!r}: Parallel repeats the whole batch; "
                               "give it to set_active alone, or give the rows one adapter each")
        for entry in dict.fromkeys(n for n in name if n is not None):
            _check_entry(state, entry)
        name = tuple(name)
    elif name is not None:
        name = _fused(state, name)
        _check_entry(state, name)
    return name


def _fused(state: dict, entry):
    """A fusion's name stands for the Fuse block over its adapters (so a bank row may name a fusion)."""
    if isinstance(entry, str) and entry in state["fusions"]:
        return Fuse(*state["fusions"][entry][0])
    return entry


def _check_entry(state: dict, entry) -> None:
    known = state["adapters"]
    names = entry.adapters if isinstance(entry, Block) else (entry,)
    bad = [n for n in names if not isinstance(n, str) or n not in known]
    if bad:
        raise PeftkitError(f"unknown adapter(s) {_some(sorted(set(map(str, bad))))}; existing: {_some(list(known)) or 'none'}")
    if isinstance(entry, (str, Stack, Parallel)):
        return
    if isinstance(entry, Average):
        sites = {n: known[n][1] for n in entry.adapters}
        first = entry.adapters[0]
        for n in entry.adapters[1:]:
            if sites[n] != sites[first]:
                raise PeftkitError(f"{entry!r}: {first!r} sits at {len(sites[first])} sites "
                                   f"({_some(sites[first], 2)}) and {n!r} at {len(sites[n])} ({_some(sites[n], 2)}); "
                                   "Average needs adapters at the same sites (Stack takes any)")
        return
    if isinstance(entry, Fuse) and entry.adapters in [adapters for adapters, *_ in state["fusions"].values()]:
        return
    if isinstance(entry, Fuse):
        raise PeftkitError(f"no fusion over {', '.join(map(repr, entry.adapters))}; add one with "
                           f"peftkit.fuse(model, {list(entry.adapters)!r})")
    raise PeftkitError(f"{entry!r} is not supported here; give an adapter's name, Stack, Parallel, Average or Fuse")


class _Replicate:
    """A model's forward pre-hook under Parallel: every input tensor with the batch's rows is repeated,
    copy after copy, once per adapter; the wrappers give copy i to adapter i (rows_per_entry)."""

    def __init__(self, copies: int):
        self.copies = copies

    def __call__(self, module, args, kwargs):
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
        if first is None:
            return None
        rows = first.shape[0]

        def repeat(t):
            return torch.cat([t] * self.copies) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == rows else t
        return tuple(map(repeat, args)), {k: repeat(v) for k, v in kwargs.items()}


def _replicate(model, copies: int | None) -> None:
    hooks = model._forward_pre_hooks
    # found by type rather than kept as a handle, so a deep-copied model stays consistent
    for key in [k for k, fn in hooks.items() if isinstance(fn, _Replicate)]:
        del hooks[key]
    if copies:
        model.register_forward_pre_hook(_Replicate(copies), with_kwargs=True)


def remove(model: nn.Module, name: str) -> None:
    state = _state(model)
    _, sites = _entry(model, name)
    fused = [f for f, (adapters, *_) in state["fusions"].items() if name in adapters]
    if fused:
        raise PeftkitError(f"adapter {name!r} is fused by {fused[0]!r}; remove that fusion first")
    for site in sites:
        wrapper = model.get_submodule(site)
        del wrapper.adapters[name]
        if not any(a.parallel for a in wrapper.adapters.values()):
            wrapper.set_source(None)
        if not wrapper.adapters:  # nothing left: put the original module back
            model.set_submodule(site, wrapper.base_layer)
    del state["adapters"][name]
    if not state["adapters"]:  # the model is back to its original modules
        del model.__dict__[STATE]
        return
    active = state["active"]
    if isinstance(active, tuple):
        active = tuple(None if _uses(n, name) else n for n in active)
    elif _uses(active, name):
        active = None
    set_active(model, active)


def _uses(entry, name: str) -> bool:
    return entry == name or (isinstance(entry, Block) and name in entry.adapters)


# --- where adapters go ---

def _plan(model, config) -> list[tuple[str, str | None]]:
    """(module to wrap, module whose input parallel adapters read or None) per insertion point."""
    modules = dict(_visible_modules(model))
    if config.method == "parallel":
        layout = layout_of(model)
        inputs = _matching(modules, [layout.ffn_input])
        outputs = _matching(modules, [layout.ffn_output])
        if not outputs or len(inputs) != len(outputs):
            raise PeftkitError(
                f"parallel adapter: found {len(inputs)} feed-forward inputs ({layout.ffn_input!r}) and "
                f"{len(outputs)} outputs ({layout.ffn_output!r}) in {type(model).__name__}; need the same number, > 0"
            )
        # named_modules() lists modules in layer order, so the i-th input and output share a layer
        return [(out, None if inp == out else inp) for inp, out in zip(inputs, outputs)]

    if config.target_modules is not None:
        patterns = config.target_modules
    else:
        layout = layout_of(model)
        patterns = ([layout.attention_output] if config.after_attention else []) + [layout.ffn_output]
    sites = _matching(modules, patterns)
    if not sites:
        raise PeftkitError(
            f"target_modules {patterns} matched no module of {type(model).__name__}; "
            f"candidates: {_some(_candidates(modules), 12)}"
        )
    nested = [(a, b) for a in sites for b in sites if b.startswith(a + ".")]
    if nested:
        a, b = nested[0]
        raise PeftkitError(
            f"target_modules match both {a!r} and its submodule {b!r}; make the patterns more specific (e.g. end them with '$')"
        )
    return [(site, None) for site in sites]


def _visible_modules(model, prefix=""):
    """named_modules(), but a wrapper stands for the module it wraps (its insides are ours)."""
    for child_name, child in model.named_children():
        full = prefix + child_name
        yield full, child
        if not isinstance(child, BottleneckWrapper):
            yield from _visible_modules(child, full + ".")


def _matching(modules: dict, patterns) -> list[str]:
    return [n for n in modules if any(re.search(p, n) for p in patterns)]


def _candidates(modules: dict) -> list[str]:
    """Linear-like module names with layer numbers replaced by N, for error messages."""
    names = [n for n, m in modules.items() if _out_features(_unwrapped(m), None) is not None]
    return list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".N", n) for n in names))


def _unwrapped(module):
    return unwrapped(module, BottleneckWrapper)


def _out_features(module, default):
    # nn.Linear and bitsandbytes' Linear4bit/Linear8bitLt have out_features; GPT-2's Conv1D has nf
    for attr in ("out_features", "nf"):
        value = module.__dict__.get(attr)
        if isinstance(value, int):
            return value
    return default


def _hidden_size(model) -> int:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise PeftkitError(f"cannot tell the hidden size of {type(model).__name__}: its config has no hidden_size")
    return hidden


# --- per-model state ---

def _state(model) -> dict:
    # Lives in the model's __dict__ (not a submodule or buffer), so it follows the model
    # object and never shows up in its state dict. inject attaches it; a model that never
    # had an adapter gets a detached empty one, so failed calls leave no trace.
    return model.__dict__.get(STATE) or {"adapters": {}, "active": None, "fusions": {}}


def _entry(model, name):
    adapters = _state(model)["adapters"]
    if name not in adapters:
        raise PeftkitError(f"unknown bottleneck adapter {name!r}; existing: {_some(list(adapters)) or 'none'}")
    return adapters[name]


def _adapter_tensors(model, name) -> dict[str, torch.Tensor]:
    _, sites = _entry(model, name)
    out = {}
    for site in sites:
        adapter = model.get_submodule(site).adapters[name]
        for key, t in adapter.state_dict(keep_vars=True).items():
            if key in SHARED:  # one tensor held by every site (Compacter's rule): once, under its own key
                out[key] = t
            else:
                out[f"{site}.{key}"] = t
    return out


def _some(items, k=8) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:k]) + (f", ... ({len(items)} in all)" if len(items) > k else "")


def describe(model) -> str:
    """Bottleneck sizes and how many sites, for `bench params`."""
    adapters = [m for m in model.modules() if isinstance(m, (Bottleneck, Compacter))]
    sizes = sorted({a.down.out_features for a in adapters})
    phm = sorted({(a.down.phm_dim, a.down.s.shape[-1]) for a in adapters if isinstance(a, Compacter)})
    rules = "".join(f", phm_dim {n} rank {r}" for n, r in phm)
    return f"size {','.join(map(str, sizes))} at {len(adapters)} sites{rules}"
