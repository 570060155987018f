"""A cheap identity for a base model, so an adapter refuses the wrong base.

Architecture, the logical shape of every linear/embedding layer (so a 4-bit
copy of a model matches its fp32 original) and the sum of |x| over a slice of
the input embeddings, which bnb never quantizes, plus a signed sum with fixed
weights that tells two random draws of the same shape apart.
"""
import hashlib

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .errors import PeftkitError


def fingerprint(model, heads=()) -> dict:
    shapes = [f"{name}:{_logical_shape(module)}" for name, module in model.named_modules()
              if _is_weight_layer(module) and not _in_heads(name, heads)]
    rows = model.get_input_embeddings().weight[:64].detach().to(torch.float64).flatten()
    weights = torch.sin(torch.arange(rows.numel(), dtype=torch.float64, device=rows.device))
    return {
        "architecture": model.config.model_type,
        "shapes": hashlib.sha256("\n".join(shapes).encode()).hexdigest()[:16],
        # a model built on the meta device (peftkit.bench) has shapes but no values to sum
        "embedding_checksum": None if rows.is_meta else [round(rows.abs().sum().item(), 5),
                                                          round((rows * weights).sum().item(), 5)],
    }


def check_same_base(expected: dict, actual: dict, expected_name: str, actual_name: str) -> None:
    same = (expected["architecture"] == actual["architecture"] and expected["shapes"] == actual["shapes"]
            and _close(expected["embedding_checksum"], actual["embedding_checksum"]))
    if not same:
        raise PeftkitError(
            f"this adapter was trained on {expected_name!r} ({expected['architecture']}, shapes "
            f"{expected['shapes']}, checksum {expected['embedding_checksum']}) but the model given is "
            f"{actual_name!r} ({actual['architecture']}, shapes {actual['shapes']}, checksum "
            f"{actual['embedding_checksum']}); load the adapter onto the base it was trained on"
        )


def _close(a: list | None, b: list | None) -> bool:
    if a is None or b is None:  # a meta-device model has no checksum: never the same as a real base
        return False
    # bf16/fp16 copies of the same weights differ by rounding; another model by far more.
    scale = 1e-3 * max(a[0], b[0], 1e-6)
    return abs(a[0] - b[0]) <= scale and abs(a[1] - b[1]) <= scale


def _is_weight_layer(module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, Conv1D))


def _logical_shape(module) -> tuple:
    if isinstance(module, nn.Linear):  # bnb layers store packed weights but keep these
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


def _in_heads(name: str, heads) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)
