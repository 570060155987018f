"""AdapterFusion (Pfeiffer et al. 2021): a learned attention over bottleneck adapters' additions.

    Fusion(hidden, adapters, dropout)   one site's fusion layer (query, key, value)
    peftkit.fuse(model, ["a", "b"], name="fusion")        over adapters the model holds
    attach(model, {"method": "fusion", "adapters": ["runs/a", "runs/b"]})   over adapter folders
    recorded_options(config)            what a fusion's record keeps: the fused adapters' own options
    regularization(model)               the training loss's pull of each value matrix toward identity
    and the tuner contract (peftkit.tuners): check_options, build_config, inject, adapter_state_dict,
    load_adapter_state_dict, set_active, remove, describe

At a site with output h where the fused adapters add d_1..d_n (peftkit's sites are the output
projections before the residual add, so h is also AdapterHub's adapter residual):

    out = h + sum_i softmax_i(Q(h) . K(d_i)) V(d_i)

AdapterHub's default ("dynamic") fusion, followed exactly where the sites allow: keys and values
are the adapters' up-projections (d_i); Q and K start N(0, 0.02) with zero bias; V has no bias and
starts at the identity with 1e-6 off the diagonal, so at first the output is h plus a weighted
mean of the additions; scores get the base's attention_probs_dropout_prob (else none) and a plain
softmax (no temperature); training adds 0.01 * ||I - V||^2 per fusion layer. AdapterHub's query
is the sub-layer's output after its residual add and layer norm; at peftkit's sites it is h.

Adding a fusion freezes every parameter of the model but the fusion layers (attach then turns the
task heads back on). Its file holds the fusion layers and every fused adapter's weights, and its
record their names and options, so load_adapter rebuilds it whole on a bare base. On a model that
holds some of those adapters already (a bank serving several fusions), it shares each one whose
options and weights are the same, and removing it keeps those another fusion still fuses.
A fusion's name runs it wherever the bottleneck tuner takes an adapter's: set_active, bank rows.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...anatomy import adapters_of, base_fingerprint, base_name, base_model, head_weights, task_heads
from ...composition import Fuse
from ...errors import PeftkitError
from ...fingerprint import check_same_base
from . import model as bottleneck
from ..options import refuse_unknown_options
from .config import Config as BottleneckConfig

REGULARIZATION = 0.01  # AdapterHub's weight on ||I - V||^2
OFF_DIAGONAL = 1e-6  # AdapterHub's value init off the diagonal


class Fusion(nn.Module):
    def __init__(self, hidden: int, adapters, dropout: float = 0.0):
        super().__init__()
        self.adapters = tuple(adapters)  # the fused adapters, in order (a plain attribute: not saved)
        self.query = nn.Linear(hidden, hidden, dtype=torch.float32)
        self.key = nn.Linear(hidden, hidden, dtype=torch.float32)
        self.value = nn.Linear(hidden, hidden, bias=False, dtype=torch.float32)
        self.drop = nn.Dropout(dropout)
        for layer in (self.query, self.key):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.value.weight.fill_(OFF_DIAGONAL).fill_diagonal_(1.0)

    def forward(self, h, deltas):
        """The fused addition for site output h [..., hidden] and the adapters' additions (each like h)."""
        d = torch.stack(deltas, dim=-2)  # [..., adapters, hidden]
        scores = (self.key(d) @ self.query(h).unsqueeze(-1)).squeeze(-1)  # [..., adapters]
        probs = self.drop(scores).softmax(-1)
        return (probs.unsqueeze(-2) @ self.value(d)).squeeze(-2)


@dataclass
class Config:
    adapters: tuple  # the fused adapters, in order
    bodies: dict  # name -> bottleneck Config of each adapter the fusion brings into the model
    folders: dict  # name -> the folder a brought adapter's weights come from (none: load_adapter's follow)
    recorded: dict  # name -> {"method", options} of every fused adapter, for the record


def check_options(method: str, options: dict) -> None:
    refuse_unknown_options("fusion", options, ["adapters"])
    adapters = options.get("adapters")
    if isinstance(adapters, dict):  # a saved fusion's record: {name: {"method", options}}
        bad = [n for n, o in adapters.items() if not isinstance(o, dict) or "method" not in o]
        if bad:
            raise PeftkitError(f"fusion record: adapter {bad[0]!r} has no method and options")
    elif not isinstance(adapters, list) or not adapters:
        raise PeftkitError("fusion needs 'adapters': a list of 2 or more bottleneck adapters, each a name the "
                           f"model holds or an adapter folder; got {adapters!r}")
    Fuse(*adapters)  # at least two, each once, names only


def build_config(method: str, options: dict, model, heads=()) -> Config:
    """Each fused adapter checked against `model` (held, or a folder trained on its base for its task)
    before anything changes; a saved fusion's record builds every adapter afresh."""
    check_options(method, options)
    adapters = options["adapters"]
    if isinstance(adapters, dict):
        bodies = {name: _body(name, opts) for name, opts in adapters.items()}
        return Config(tuple(adapters), bodies, {}, {name: dict(opts) for name, opts in adapters.items()})
    held, state = adapters_of(model), bottleneck._state(model)
    names, bodies, folders, recorded = [], {}, {}, {}
    for entry in adapters:
        if entry in held:
            name, info = entry, held[entry]
            _need_bottleneck(name, info.method)
        elif Path(entry).is_dir():
            name, info = _from_folder(model, Path(entry))
            if name in held or name in state["adapters"] or name in bodies:
                raise PeftkitError(f"fusion: the folder {entry} would add adapter {name!r}, but the model holds one "
                                   "by that name already (adapters take their folder's name)")
            bodies[name], folders[name] = _body(name, {"method": info.method, **info.options}), Path(entry)
        else:
            raise PeftkitError(f"fusion: {entry!r} is neither an adapter the model holds "
                               f"({', '.join(held) or 'none'}) nor an adapter folder")
        names.append(name)
        recorded[name] = {"method": info.method, **info.options}
    _check_sites(model, names, bodies, state)
    return Config(tuple(names), bodies, folders, recorded)


def recorded_options(config: Config) -> dict:
    return {"adapters": config.recorded}


def inject(model: nn.Module, config: Config, name: str) -> None:
    state = bottleneck._state(model)
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):
        raise PeftkitError(f"fusion name must be a non-empty string without '.', not a ModuleDict attribute; "
                           f"got {name!r}")
    if name in state["fusions"] or name in state["adapters"] or name in config.adapters:
        raise PeftkitError(f"the model already has a fusion or adapter named {name!r}; pick another name")
    same = [f for f, (adapters, *_) in state["fusions"].items() if adapters == config.adapters]
    if same:
        raise PeftkitError(f"fusion {same[0]!r} already fuses {', '.join(config.adapters)}; use it, or remove it first")
    # A saved fusion's adapters may be held already (a bank serving fusions that share an adapter):
    # the fusion shares one of the same options, and load_adapter_state_dict checks it holds the same weights.
    for body, body_config in config.bodies.items():
        if body in state["fusions"] or (body in state["adapters"] and state["adapters"][body][0] != body_config):
            held, owner = bottleneck.holding(state, body)
            other = "" if body in state["fusions"] else " with other options"
            raise PeftkitError(f"fusion {name!r} brings in adapter {body!r}, but {held}{other}; unload {owner!r} "
                               "first, or load the fusion on a model without it")
    weights = {body: _body_weights(model, folder) for body, folder in config.folders.items()}  # read before changes
    brought = []
    try:
        for body, body_config in config.bodies.items():
            if body in state["adapters"]:
                continue
            bottleneck.inject(model, body_config, body)
            brought.append(body)
            if body in weights:
                bottleneck.load_adapter_state_dict(model, body, weights[body])
    except Exception:
        for body in brought:
            bottleneck.remove(model, body)
        raise
    state = bottleneck._state(model)
    sites = bottleneck._entry(model, config.adapters[0])[1]
    dropout = getattr(model.config, "attention_probs_dropout_prob", 0.0) or 0.0
    for site in sites:
        wrapper = model.get_submodule(site)
        hidden = wrapper.adapters[config.adapters[0]].up.out_features
        device = next(wrapper.adapters[config.adapters[0]].parameters()).device
        # in the model's mode: its scores' dropout stays off in a model put in eval mode before
        wrapper.fusions[name] = Fusion(hidden, config.adapters, dropout).to(device).train(model.training)
    state["fusions"][name] = (config.adapters, list(sites), tuple(brought))
    model.__dict__[bottleneck.STATE] = state
    # only the fusion trains: the adapters it fuses keep what they learned (attach turns the heads on)
    model.requires_grad_(False)
    for key, param in _fusion_tensors(model, name).items():
        param.requires_grad_(True)


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {key: t.detach().clone() for key, t in _tensors(model, name).items()}


def load_adapter_state_dict(model: nn.Module, name: str, state_dict: dict) -> None:
    """The fusion's weights and those of the adapters it brought in; an adapter it shares with the model
    (held before it came) must hold exactly the weights saved with the fusion, and is left untouched."""
    adapters, _, brought = _fusion(model, name)
    own = _tensors(model, name)
    held_before = tuple(f"adapters.{a}." for a in adapters if a not in brought)
    shared = {k: t for k, t in own.items() if k.startswith(held_before)}
    differ = [k for k, t in shared.items() if not (isinstance(state_dict.get(k), torch.Tensor)
                                                    and state_dict[k].shape == t.shape
                                                    and torch.equal(state_dict[k].to(t), t))]
    if differ:
        adapter = differ[0].split(".")[1]
        held, owner = bottleneck.holding(bottleneck._state(model), adapter)
        raise PeftkitError(f"fusion {name!r} was saved with other weights for adapter {adapter!r} than the model "
                           f"holds ({held}); unload {owner!r} first, or load the fusion on a model without it")
    bottleneck.copy_strict({k: t for k, t in own.items() if k not in shared},
                           {k: t for k, t in state_dict.items() if k not in shared}, f"fusion {name!r}")


def set_active(model: nn.Module, name) -> None:
    """`name`: a fusion's name, or None (no bottleneck adapter runs); the bottleneck tuner runs a
    fusion by its name."""
    if name is not None and not isinstance(name, str):
        raise PeftkitError(f"a fusion runs whole batches: give its name or None, not {name!r}")
    if name is not None:
        _fusion(model, name)  # an unknown name is refused with the fusions there are
    bottleneck.set_active(model, name)


def remove(model: nn.Module, name: str) -> None:
    """Take fusion `name` out, with the adapters it brought in; adapters held before stay, and so do
    those another fusion still fuses (which then counts them as brought by it)."""
    adapters, sites, brought = _fusion(model, name)
    state = bottleneck._state(model)
    for site in sites:
        del model.get_submodule(site).fusions[name]
    del state["fusions"][name]
    active = state["active"]
    if active == Fuse(*adapters) or (isinstance(active, tuple) and Fuse(*adapters) in active):
        bottleneck.set_active(model, None)
    for body in brought:
        heir = next((f for f, (fused, *_) in state["fusions"].items() if body in fused), None)
        if heir is None:
            bottleneck.remove(model, body)
        else:
            fused, heir_sites, heir_brought = state["fusions"][heir]
            state["fusions"][heir] = (fused, heir_sites, (*heir_brought, body))


def describe(model) -> str:
    fusions = [m for m in model.modules() if isinstance(m, Fusion)]
    return f"fusion of {len(fusions[0].adapters) if fusions else 0} adapters at {len(fusions)} sites"


def regularization(model):
    """0.01 * ||I - V||^2 summed over the fusion layers whose value matrix trains; None without one."""
    values = [m.value.weight for m in model.modules() if isinstance(m, Fusion) and m.value.weight.requires_grad]
    if not values:
        return None
    eye = torch.eye(values[0].shape[0], device=values[0].device, dtype=values[0].dtype)
    return REGULARIZATION * sum((eye - v).pow(2).sum() for v in values)


# --- helpers ---

def shared_bytes(model: nn.Module, name: str) -> int:
    """Bytes of the fused adapters that were held before this fusion came (a bank holds them once)."""
    adapters, _, brought = _fusion(model, name)
    return sum(t.numel() * t.element_size() for adapter in adapters if adapter not in brought
               for t in bottleneck._adapter_tensors(model, adapter).values())


def _fusion(model, name: str):
    fusions = bottleneck._state(model)["fusions"]
    if name not in fusions:
        raise PeftkitError(f"unknown fusion {name!r}; fusions: {', '.join(fusions) or 'none'}")
    return fusions[name]


def _fusion_tensors(model, name: str) -> dict:
    _, sites, _ = _fusion(model, name)
    return {f"fusion.{site}.{key}": t for site in sites
            for key, t in model.get_submodule(site).fusions[name].state_dict(keep_vars=True).items()}


def _tensors(model, name: str) -> dict:
    """The fusion layers' tensors and every fused adapter's, keyed without the fusion's name."""
    adapters, _, _ = _fusion(model, name)
    out = _fusion_tensors(model, name)
    for adapter in adapters:
        out.update({f"adapters.{adapter}.{key}": t for key, t in bottleneck._adapter_tensors(model, adapter).items()})
    return out


def _need_bottleneck(name: str, method_name: str) -> None:
    from .config import METHODS
    if method_name not in METHODS:
        raise PeftkitError(f"fusion: {name!r} is {method_name}; AdapterFusion fuses bottleneck adapters "
                           f"({', '.join(METHODS)})")


def _body(name: str, options: dict) -> BottleneckConfig:
    _need_bottleneck(name, options.get("method"))
    return BottleneckConfig.from_options(dict(options))


def _from_folder(model, path: Path):
    """(adapter name, AdapterInfo) of an adapter folder trained on `model`'s base for its task."""
    from ...saving import adapter_info, read_adapter_config

    info = adapter_info(read_adapter_config(path))
    base = base_model(model)
    _need_bottleneck(str(path), info.method)
    if info.task.get("class") != type(base).__name__:
        raise PeftkitError(f"fusion: {path} was trained for a {info.task.get('class')} but the model is a "
                           f"{type(base).__name__}; fuse adapters of the model's task")
    try:
        check_same_base(info.base_fingerprint, base_fingerprint(model), info.base_name, base_name(base))
    except PeftkitError as err:
        raise PeftkitError(f"fusion: {path}: {err}") from None
    return path.name, info


def _body_weights(model, folder: Path) -> dict:
    """An adapter folder's weights without its task head (the fusion trains the model's own head)."""
    from ...saving import WEIGHTS, read_weights

    state = read_weights(folder / WEIGHTS)
    heads = head_weights(state, task_heads(base_model(model)))
    return {k: v for k, v in state.items() if k not in heads}


def _check_sites(model, names: list, bodies: dict, state: dict) -> None:
    sites = {n: bottleneck._entry(model, n)[1] if n not in bodies
             else [site for site, _ in bottleneck._plan(model, bodies[n])] for n in names}
    for n in names[1:]:
        if sites[n] != sites[names[0]]:
            raise PeftkitError(f"fusion: {names[0]!r} sits at {len(sites[names[0]])} sites and {n!r} at "
                               f"{len(sites[n])} (or others); AdapterFusion needs adapters at the same sites")
