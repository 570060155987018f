"""combine(): one adapter from several trained on the same base for the same task.

    model = peftkit.combine(base, ["runs/a", "runs/b"], "ties", [0.7, 0.3], density=0.5)
    peftkit.save_adapter(model, "out/ab")

LoRA adapters combine through peft's add_weighted_adapter (every type in COMBINATIONS);
bottleneck adapters of one config by a weighted sum of their weights (linear only), as
peft's linear sums LoRA's matrices. Weights are taken as given, not normalized: 0.5,0.5
averages two adapters, 1,1 adds them. Task heads (and anything else a LoRA saves whole,
its modules_to_save) are never mixed: the combined adapter keeps the first adapter's, as
heads trained from different random starts have no common coordinates to average in.
plan_combination checks the request from the folders alone, so bad input fails before a base loads.
"""
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, set_peft_model_state_dict
from peft.utils import ModulesToSaveWrapper

from .anatomy import AdapterInfo, adapters_of, base_model, head_weights, task_heads
from .combinations import COMBINATIONS, EQUAL_RANKS, USE_DENSITY
from .errors import PeftkitError
from .fingerprint import check_same_base
from .methods import METHODS, method
from .saving import WEIGHTS, adapter_info, check_fits, load_adapter, read_adapter_config, read_weights

BOTTLENECK_TUNER = "peftkit.tuners.bottleneck"  # its weights are plain tensors per layer: a weighted sum is a soup
COMBINED = "default"  # the name save_adapter records, as for any freshly attached adapter


@dataclass
class Source:
    """One adapter folder as read from disk."""
    path: Path
    config: dict
    info: AdapterInfo
    state: dict


@dataclass
class Plan:
    sources: list[Source]
    combination: str
    weights: list[float]
    density: float | None


def combine(model, paths, combination: str, weights, density: float | None = None):
    """The bare base `model` (changed in place, as attach changes it) holding one adapter, the
    combination of the adapter folders `paths` (run folders or save_adapter's), ready for save_adapter."""
    return apply_plan(model, plan_combination(paths, combination, weights, density))


def plan_combination(paths, combination: str, weights, density: float | None = None) -> Plan:
    """The folders read and every request checked, before any model is touched."""
    _check_arguments(paths, combination, weights, density)
    sources = [_read(Path(path)) for path in paths]
    _check_same_kind(sources)
    if _is_bottleneck(sources[0].info.method):
        _check_bottlenecks(sources, combination)
    else:
        _check_loras(sources, combination)
    return Plan(sources, combination, [float(w) for w in weights], density)


def apply_plan(model, plan: Plan):
    if adapters_of(model):
        raise PeftkitError("combine takes the bare base model; this one already holds adapters "
                           f"{sorted(adapters_of(model))}")
    if _is_bottleneck(plan.sources[0].info.method):
        return _sum_bottlenecks(model, plan)
    return _weighted_lora(model, plan)


def _check_arguments(paths, combination, weights, density) -> None:
    if len(paths) < 2:
        raise PeftkitError(f"combining needs two or more adapters, got {len(paths)}")
    if combination not in COMBINATIONS:
        raise PeftkitError(f"unknown combine type {combination!r}; valid: {', '.join(COMBINATIONS)}")
    if len(weights or []) != len(paths):
        raise PeftkitError(f"give one weight per adapter: {len(paths)} adapters, {len(weights or [])} weights")
    if combination in USE_DENSITY and density is None:
        raise PeftkitError(f"{combination} needs a density in (0, 1]: the share of each matrix it keeps")
    if combination not in USE_DENSITY and density is not None:
        raise PeftkitError(f"density applies to {', '.join(USE_DENSITY)} only, not {combination}")
    if density is not None and not 0 < density <= 1:
        raise PeftkitError(f"density must be in (0, 1], got {density}")


def _read(path: Path) -> Source:
    config = read_adapter_config(path)
    if "peftkit" not in config:
        raise PeftkitError(f"{path} was not saved by peftkit: it records no base fingerprint to check the "
                           "adapters share a base; load it with peftkit.load_adapter and save_adapter it first")
    return Source(path, config, adapter_info(config), read_weights(path / WEIGHTS))


def _is_lora(name: str) -> bool:
    return method(name).peft_type == "LORA"


def _is_bottleneck(name: str) -> bool:
    return method(name).tuner_module == BOTTLENECK_TUNER


def _check_same_kind(sources: list[Source]) -> None:
    first = sources[0]
    for source in sources:
        if not (_is_lora(source.info.method) or _is_bottleneck(source.info.method)):
            lora, bottleneck = [m for m in METHODS if _is_lora(m)], [m for m in METHODS if _is_bottleneck(m)]
            raise PeftkitError(f"{source.path} holds {method(source.info.method).long_name} "
                               f"({source.info.method}), which cannot be combined; combine {', '.join(lora)} "
                               f"adapters (any combine type) or {', '.join(bottleneck)} adapters (linear)")
        if source.info.method != first.info.method:
            raise PeftkitError(f"{source.path} is a {source.info.method} adapter but {first.path} is "
                               f"{first.info.method}; combine adapters of one method")
        if source.info.task != first.info.task:
            raise PeftkitError(f"{source.path} is for {_task(source)} but {first.path} is for {_task(first)}; "
                               "combine adapters of one task (and the same labels)")
        _check_same_base(first, source)


def _check_same_base(first: Source, other: Source) -> None:
    try:
        check_same_base(first.info.base_fingerprint, other.info.base_fingerprint,
                        first.info.base_name, other.info.base_name)
    except PeftkitError:
        raise PeftkitError(f"{other.path} was trained on another base ({other.info.base_name!r}) than "
                           f"{first.path} ({first.info.base_name!r}): their fingerprints differ; combine "
                           "adapters trained on one base") from None


def _task(source: Source) -> str:
    task = source.info.task
    labels = f" with labels {task['id2label']}" if "id2label" in task else ""
    return f"a {task.get('class', 'bare model')}{labels}"


def _check_loras(sources: list[Source], combination: str) -> None:
    for source in sources:
        for option, why in (("use_dora", "DoRA's magnitude vectors, which peft does not combine"),
                            ("use_rslora", "rsLoRA's scaling, which peft's combined adapter gets wrong")):
            if source.config.get(option):
                raise PeftkitError(f"{source.path} uses {why}; combine plain LoRA adapters")
    ranks = {source.path: {source.config["r"], *(source.config.get("rank_pattern") or {}).values()}
             for source in sources}
    if combination in EQUAL_RANKS and len(set().union(*ranks.values())) > 1:
        listed = ", ".join(f"{path}: r={'/'.join(map(str, sorted(r)))}" for path, r in ranks.items())
        raise PeftkitError(f"{combination} needs adapters of one rank ({listed}); "
                           f"use svd or cat, which take any ranks")


def _check_bottlenecks(sources: list[Source], combination: str) -> None:
    first = sources[0]
    if combination != "linear":
        raise PeftkitError(f"{first.info.method} adapters combine by linear only (a weighted sum of their "
                           f"weights), not {combination}")
    for source in sources[1:]:
        if source.info.options != first.info.options:
            differ = sorted(k for k in {*source.info.options, *first.info.options}
                            if source.info.options.get(k) != first.info.options.get(k))
            raise PeftkitError(f"{source.path} and {first.path} differ in {', '.join(differ)}; only adapters "
                               "of one config (the same shapes) can be summed")
        shapes = {k: tuple(v.shape) for k, v in source.state.items()}
        if shapes != {k: tuple(v.shape) for k, v in first.state.items()}:
            raise PeftkitError(f"{source.path} holds other tensors or shapes than {first.path}; only "
                               "adapters of one config (the same shapes) can be summed")


def _sum_bottlenecks(model, plan: Plan):
    first = plan.sources[0]
    model = load_adapter(model, first.path, name=COMBINED)  # checks the base; brings the first's head
    heads = head_weights(first.state, task_heads(base_model(model)))
    summed = {key: _weighted_sum([s.state[key] for s in plan.sources], plan.weights)
              for key in first.state if key not in heads}
    method(first.info.method).tuner.load_adapter_state_dict(model, COMBINED, summed)
    return model


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = sum(w * t.to(torch.float32) for t, w in zip(tensors, weights))
    return total.to(tensors[0].dtype)


def _weighted_lora(model, plan: Plan):
    """peft's add_weighted_adapter over the adapters loaded side by side into a plain PeftModel:
    peft's task models give every adapter its own copy of the head, and then refuse to combine them."""
    first, names = plan.sources[0], [f"input-{n}" for n in range(len(plan.sources))]
    check_fits(model, first.path, first.info, first.state)
    model = PeftModel(model, _peft_config(first, modules_to_save=True), adapter_name=names[0])
    set_peft_model_state_dict(model, first.state, adapter_name=names[0])
    for name, source in zip(names[1:], plan.sources[1:]):
        model.add_adapter(name, _peft_config(source, modules_to_save=False))
        set_peft_model_state_dict(model, {k: v for k, v in source.state.items() if "lora_" in k}, adapter_name=name)
    try:
        model.add_weighted_adapter(names, plan.weights, COMBINED, combination_type=plan.combination,
                                   density=plan.density)
    except ValueError as err:  # what the folders cannot show before peft builds the layers
        raise PeftkitError(f"peft cannot combine these adapters: {err}") from None
    _copy_saved_modules(model, names[0], COMBINED)
    model.set_adapter(COMBINED)
    for name in names:
        model.delete_adapter(name)
    model.peft_config[COMBINED].task_type = first.config.get("task_type")  # saved as the inputs were
    model.peftkit_adapters = {COMBINED: _combined_info(first.info, model.peft_config[COMBINED])}
    return model.eval()


def _peft_config(source: Source, modules_to_save: bool):
    config = PeftConfig.from_peft_type(**{k: v for k, v in source.config.items() if k != "peftkit"})
    return replace(config, task_type=None, modules_to_save=config.modules_to_save if modules_to_save else None)


def _copy_saved_modules(model, source: str, target: str) -> None:
    """peft starts the combined adapter's modules_to_save from the base's untrained modules."""
    for wrapper in model.modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and source in wrapper.modules_to_save:
            wrapper.modules_to_save[target].load_state_dict(wrapper.modules_to_save[source].state_dict())


def _combined_info(first: AdapterInfo, config) -> AdapterInfo:
    targets = config.target_modules
    options = {**first.options, "r": config.r, "lora_alpha": config.lora_alpha,
               "target_modules": sorted(targets) if isinstance(targets, set) else targets}
    return replace(first, options=options)
