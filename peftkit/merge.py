"""merge(): fold LoRA into the base weights and return a plain transformers model.

The model given stays as it was (the merge works on a copy) unless inplace=True, which
saves the copy's memory and leaves the given model unusable. The merged model keeps the
base's dtype (a bf16 base stays bf16) unless `dtype` asks for another.

A quantized base is dequantized first and the adapter re-applied on the
full-precision copy, so the merge itself is exact (peft's own merge on a
4-bit layer would re-quantize the merged weight and lose the update).
"""
import copy

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from .anatomy import is_quantized, pick_adapter
from .errors import PeftkitError
from .methods import method


def merge(model, name: str | None = None, dtype: torch.dtype | None = None, inplace: bool = False):
    name, info = pick_adapter(model, name)
    about = method(info.method)
    if not about.mergeable:
        raise PeftkitError(f"adapter {name!r} is {info.method}, which merge() cannot fold into the base: "
                           f"{about.why_not_mergeable}")
    if not inplace:
        model = copy.deepcopy(model)
    model.set_adapter(name)
    if is_quantized(model):
        dtype = dtype or torch.float32  # what the 4/8-bit weights are dequantized to
        try:
            model = _requantize_free(model, name)
        except ValueError as err:  # peft refuses to take some methods' layers off a 4-bit base (IA3)
            raise PeftkitError(f"peft cannot take {info.method} off a 4/8-bit base to merge it ({err}); load the "
                               "base without quantize, load_adapter onto it, and merge that") from None
    dtype = dtype or model.get_base_model().dtype
    merged = model.merge_and_unload(adapter_names=[name])
    merged.peftkit_adapters = {}
    return merged.to(dtype)


def _requantize_free(model: PeftModel, name: str) -> PeftModel:
    config = model.peft_config[name]
    state = get_peft_model_state_dict(model, adapter_name=name)
    base = dequantize(model.unload())  # LoRA layers out, trained heads kept
    plain = get_peft_model(base, config, adapter_name=name)
    set_peft_model_state_dict(plain, state, adapter_name=name)
    return plain


def dequantize(model):
    """The bitsandbytes base as a plain float32 transformers model, in place."""
    _undo_cpu_packing(model)
    model.dequantize(dtype=torch.float32)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            setattr(model, attr, False)
    return model


def _undo_cpu_packing(model) -> None:
    """bitsandbytes' CPU kernels repack 4-bit weights in place on first use;
    transformers' dequantize reads them in the standard layout and would return
    garbage, so put the standard layout back first (bnb does the same before
    saving a state dict)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
