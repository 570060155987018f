"""Several tuners' parts under one adapter name, for the composite methods (MAM, UniPELT).

    inject_parts(model, [(tuner, config), ...], name)        all or nothing: a failed part undoes the others
    parts_state_dict(model, name, {key prefix: tuner})       {"prefix." + key: tensor, "adapter." + key: ...}
    load_parts_state_dict(model, name, parts, state, label)  strict; on error nothing is changed
    check_name(known, name, label)                           PeftkitError naming the known adapters

Each part keeps its own per-model state under the composite's adapter name, so the part's
tuner saves, loads, switches and removes it as one of its own; the key prefixes keep the
parts' state-dict keys apart.
"""
import torch

from ..errors import PeftkitError


def inject_parts(model, parts, name: str) -> None:
    done = []
    try:
        for tuner, config in parts:
            tuner.inject(model, config, name)
            done.append(tuner)
    except Exception:
        for tuner in reversed(done):
            tuner.remove(model, name)
        raise


def parts_state_dict(model, name: str, parts: dict) -> dict[str, torch.Tensor]:
    return {prefix + key: value for prefix, tuner in parts.items()
            for key, value in tuner.adapter_state_dict(model, name).items()}


def load_parts_state_dict(model, name: str, parts: dict, state_dict: dict, label: str) -> None:
    """Check every key and shape of every part first, so a bad file changes no part."""
    own = {key: tuple(value.shape) for key, value in parts_state_dict(model, name, parts).items()}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(f"{key} (expected {own[key]}, got {tuple(getattr(state_dict[key], 'shape', ()))})"
                   for key in set(own) & set(state_dict)
                   if tuple(getattr(state_dict[key], "shape", ())) != own[key])
    problems = [f"{what}: {_some(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    if problems:
        raise PeftkitError(f"cannot load {label} adapter {name!r}: " + "; ".join(problems))
    for prefix, tuner in parts.items():
        tuner.load_adapter_state_dict(model, name, {key[len(prefix):]: value for key, value in state_dict.items()
                                                    if key.startswith(prefix)})


def check_name(known, name, label: str) -> None:
    if name not in known:
        raise PeftkitError(f"no {label} adapter named {name!r}; known: {', '.join(sorted(known)) or 'none'}")


def _some(items, k: int = 8) -> str:
    return ", ".join(items[:k]) + (f", ... ({len(items)} in all)" if len(items) > k else "")
