"""Composition blocks: several bottleneck adapters active at once, as AdapterHub composes them.

    Stack("lang", "task")                  at each site h1 = h + d_lang(h), out = h1 + d_task(h1)
    Average("a", "b", weights=[3, 1])      out = h + sum_i w_i d_i(h), weights scaled to sum to 1
    Parallel("a", "b")                     the batch runs once per adapter: B rows in, 2B rows out
    Fuse("a", "b")                         AdapterFusion over the adapters (add its layers with fuse)
    activate(model, "a" | block | None)    switch what a model runs: one adapter, a block, or the base alone
    fuse(model, ["a", "b"], name="fusion") add AdapterFusion layers over adapters (held, or folders); only they train

A block is given wherever an active adapter is: activate, the bottleneck tuner's set_active, and
AdapterBank rows (Stack and Average). Blocks hold adapter names only: nested blocks are refused.
"""
import importlib
from numbers import Real

from .errors import PeftkitError


class Block:
    """Two or more distinct adapter names; equal blocks compare and hash alike (a bank groups rows by them)."""

    def __init__(self, *adapters):
        kind = type(self).__name__
        nested = [a for a in adapters if isinstance(a, Block)]
        if nested:
            raise PeftkitError(f"{kind} got the block {nested[0]!r}; nested blocks are not supported, "
                               "give adapter names only")
        if len(adapters) == 1 and isinstance(adapters[0], (list, tuple)):
            raise PeftkitError(f"give {kind} the adapter names as arguments: {kind}('a', 'b'), not a list")
        bad = [a for a in adapters if not isinstance(a, str) or not a]
        if bad:
            raise PeftkitError(f"{kind} takes adapter names (non-empty strings), got {bad[0]!r}")
        if len(adapters) < 2:
            raise PeftkitError(f"{kind} needs at least 2 adapters, got {len(adapters)}: {list(adapters)}")
        twice = sorted({a for a in adapters if adapters.count(a) > 1})
        if twice:
            raise PeftkitError(f"{kind} names {twice[0]!r} more than once; name each adapter once")
        self.adapters = tuple(adapters)

    def _key(self):
        return type(self), self.adapters

    def __eq__(self, other):
        return isinstance(other, Block) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(map(repr, self.adapters))})"


class Stack(Block):
    """Each adapter reads the output of the one before it, at every site (AdapterHub's Stack)."""


class Parallel(Block):
    """The batch replicated once per adapter, each copy through its own: a model given B rows returns
    len(adapters) * B rows, the first B through the first adapter, and so on (AdapterHub's Parallel)."""


class Fuse(Block):
    """AdapterFusion (Pfeiffer et al. 2021) over the adapters' outputs; peftkit.fuse adds its layers."""


class Average(Block):
    """The adapters' outputs averaged with `weights` (default: equal), scaled to sum to 1 as AdapterHub does."""

    def __init__(self, *adapters, weights=None):
        super().__init__(*adapters)
        if weights is None:
            weights = [1.0] * len(adapters)
        if not isinstance(weights, (list, tuple)) or not all(isinstance(w, Real) and not isinstance(w, bool)
                                                              for w in weights):
            raise PeftkitError(f"Average weights must be a list of numbers, one per adapter, got {weights!r}")
        if len(weights) != len(adapters):
            raise PeftkitError(f"Average got {len(weights)} weights for {len(adapters)} adapters; give one each")
        total = float(sum(weights))
        if total == 0:
            raise PeftkitError(f"Average weights {list(weights)} sum to 0; they are scaled to sum to 1")
        self.weights = tuple(float(w) / total for w in weights)

    def _key(self):
        return type(self), self.adapters, self.weights

    def __repr__(self):
        return f"Average({', '.join(map(repr, self.adapters))}, weights={list(self.weights)})"


def activate(model, what):
    """Make `what` the model's active adapters: an adapter's name (a fusion's, or one it fuses), a block
    over its bottleneck adapters, or None for the base model alone (peftkit's own methods)."""
    from .anatomy import adapters_of
    from .methods import method

    held = adapters_of(model)
    if not held:
        raise PeftkitError("the model holds no peftkit adapter; call peftkit.attach or load_adapter first")
    known = _bottleneck_adapters(held)
    if isinstance(what, Block):
        from .tuners.bottleneck.model import check_active
        target = check(what, known)[0]
        check_active(model, what)  # the sites line up, a Fuse has its fusion: before any switch changes
    elif what is None:
        target = None
        if any(method(i.method).peft_native for i in held.values()):
            raise PeftkitError("a peft model always runs one of its adapters; for the base alone use "
                               "`with model.disable_adapter():`")
    elif isinstance(what, str) and what in known:
        target = known[what].method
        if method(target).peft_native:
            model.set_adapter(what)
            return model
    else:
        raise PeftkitError(f"activate takes an adapter's name, Stack/Parallel/Average/Fuse or None, got {what!r}; "
                           f"the model holds {', '.join(known)}")
    # every switch of the model's own adapters goes off first (a composite's parts too), then the target's on
    own = {i.method for i in held.values() if not method(i.method).peft_native}
    for module in sorted({s for m in own for s in method(m).switches}):
        importlib.import_module(module).set_active(model, None)
    if target is not None:
        method(target).tuner.set_active(model, what)
    return model


def fuse(model, adapters, name: str = "fusion"):
    """Add AdapterFusion layers (tuners/bottleneck/fusion.py) over bottleneck `adapters`, each a name the
    model holds or an adapter folder trained on its base, and make the fusion active. Every adapter is
    frozen: only the fusion layers and the task heads train. save_adapter(model, path, name) saves the
    fusion with the adapters it fuses."""
    from .attach import attach
    return attach(model, {"method": "fusion", "adapters": list(adapters)}, name=name)


def check(block: Block, held: dict) -> list[str]:
    """Refuse a block over adapters `held` ({name: AdapterInfo}) does not hold, of methods other than the
    bottleneck adapters, or of different bases or tasks; returns the adapters' methods."""
    from .fingerprint import check_same_base
    from .methods import method

    unknown = [a for a in block.adapters if a not in held]
    if unknown:
        raise PeftkitError(f"{block!r}: unknown adapter(s) {', '.join(unknown)}; bottleneck adapters held: "
                           f"{', '.join(held) or 'none'}")
    infos = [held[a] for a in block.adapters]
    other = [(a, i.method) for a, i in zip(block.adapters, infos) if not _is_bottleneck(method(i.method))]
    if other:
        raise PeftkitError(f"{block!r}: {other[0][0]!r} is {other[0][1]}; blocks compose bottleneck adapters "
                           f"({', '.join(_bottleneck_methods())})")
    first = infos[0]
    for name, info in zip(block.adapters[1:], infos[1:]):
        if info.task.get("class") != first.task.get("class"):
            raise PeftkitError(f"{block!r}: {block.adapters[0]!r} is for a {first.task.get('class')} but {name!r} "
                               f"for a {info.task.get('class')}; compose adapters of one task")
        try:
            check_same_base(info.base_fingerprint, first.base_fingerprint, info.base_name, first.base_name)
        except PeftkitError:
            raise PeftkitError(f"{block!r}: {name!r} was trained on {info.base_name!r}, another base than "
                               f"{block.adapters[0]!r} ({first.base_name!r}); compose adapters of one base") from None
    return [i.method for i in infos]


def _is_bottleneck(about) -> bool:
    return about.tuner_module == "peftkit.tuners.bottleneck"


def _bottleneck_methods() -> list[str]:
    from .methods import METHODS
    return [m.name for m in METHODS.values() if _is_bottleneck(m)]



def _bottleneck_adapters(held: dict) -> dict:
    """{name: AdapterInfo} of the adapters a model holds, with those its fusions brought in (a fusion's
    record lists them under "adapters" as {name: {"method", options}})."""
    from .anatomy import AdapterInfo

    out = dict(held)
    for info in held.values():
        fused = info.options.get("adapters")
        for name, options in fused.items() if isinstance(fused, dict) else ():
            out.setdefault(name, AdapterInfo(options["method"], options, info.base_name, info.base_fingerprint,
                                             info.task))
    return out
