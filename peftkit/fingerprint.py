"""A cheap identity for a base model, so an adapter refuses the wrong base.

Architecture, the logical shape of every linear/embedding layer (so a 4-bit
copy of a model matches its fp32 original), and a signature of every weight
tensor read from SAMPLE values spread over all of it: their mean |x|, and a
signed sum with fixed weights over their |x| sum. bf16 or fp16 copies of the
same weights move the signatures by rounding (about 2e-5 at 1024 values); a
fine-tuned checkpoint of the same shape moves some tensor's far more, and is
refused. bitsandbytes' packed 4/8-bit weights have no float values to read (under
FSDP or DeepSpeed the 4-bit ones are typed float, see loading.sharded_training,
but each float is the bytes of 4-bit codes), so a quantized base is compared on
the tensors it keeps in floats (embeddings, norms, biases). Adapters saved
before the signatures carry a checksum of 64 embedding rows, still checked for them.
"""
import hashlib

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .errors import PeftkitError


SAMPLE = 1024  # values read per tensor: a few thousand reads cover even a 70B model in milliseconds
TOLERANCE = 5e-4  # signature change allowed: 20x what bf16 rounding moves it


def fingerprint(model, heads=()) -> dict:
    shapes = [f"{name}:{_logical_shape(module)}" for name, module in model.named_modules()
              if _is_weight_layer(module) and not _in_heads(name, heads)]
    rows = model.get_input_embeddings().weight[:64].detach().to(torch.float64).flatten()
    weights = torch.sin(torch.arange(rows.numel(), dtype=torch.float64, device=rows.device))
    # a model built on the meta device (peftkit.bench.params) has shapes but no values to read
    return {
        "architecture": model.config.model_type,
        "shapes": hashlib.sha256("\n".join(shapes).encode()).hexdigest()[:16],
        "embedding_checksum": None if rows.is_meta else [round(rows.abs().sum().item(), 5),
                                                          round((rows * weights).sum().item(), 5)],
        "signatures": None if rows.is_meta else {
            name: _signature(param) for name, param in model.named_parameters()
            if _holds_floats(param) and not _in_heads(name, heads)},
    }


def check_same_base(expected: dict, actual: dict, expected_name: str, actual_name: str) -> None:
    same = (expected["architecture"] == actual["architecture"] and expected["shapes"] == actual["shapes"]
            and _close(expected["embedding_checksum"], actual["embedding_checksum"]))
    differs = _differing_tensor(expected.get("signatures"), actual.get("signatures")) if same else None
    if differs:
        raise PeftkitError(
            f"this adapter was trained on {expected_name!r}, but {differs} of the model given "
            f"({actual_name!r}) holds other weights: same architecture and shapes, another checkpoint "
            f"(a fine-tuned variant?); load the adapter onto the base it was trained on")
    if not same:
        raise PeftkitError(
            f"this adapter was trained on {expected_name!r} ({expected['architecture']}, shapes "
            f"{expected['shapes']}, checksum {expected['embedding_checksum']}) but the model given is "
            f"{actual_name!r} ({actual['architecture']}, shapes {actual['shapes']}, checksum "
            f"{actual['embedding_checksum']}); load the adapter onto the base it was trained on"
        )


def _holds_floats(param) -> bool:
    return param.is_floating_point() and param.__class__.__name__ != "Params4bit"


def _signature(param) -> list[float]:
    flat = param.detach().reshape(-1)
    count = min(SAMPLE, flat.numel())
    picked = flat[torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)]
    values = picked.to(torch.float64)
    size = values.abs().sum().item()
    weights = torch.sin(torch.arange(1, values.numel() + 1, dtype=torch.float64, device=values.device))
    return [round(size / values.numel(), 7), round((values * weights).sum().item() / size, 7) if size else 0.0]


def _differing_tensor(expected: dict | None, actual: dict | None) -> str | None:
    """The first tensor, of those both models hold in floats, whose signature moved by more than rounding."""
    if expected is None or actual is None:  # saved before signatures, or a meta-device model
        return None
    for name in sorted(expected.keys() & actual.keys()):
        (size_a, signed_a), (size_b, signed_b) = expected[name], actual[name]
        if abs(size_a - size_b) > TOLERANCE * max(size_a, size_b, 1e-12) or abs(signed_a - signed_b) > TOLERANCE:
            return name
    return None


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
