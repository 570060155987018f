"""merge(): fold LoRA into the base weights and return a plain transformers model.

A quantized base is dequantized first and the adapter re-applied on the
full-precision copy, so the merge itself is exact (peft's own merge on a
4-bit layer would re-quantize the merged weight and lose the update).
"""
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from .attach import pick_adapter, is_quantized
from .errors import PeftkitError


def merge(model, dtype: torch.dtype = torch.float32):
    name, info = pick_adapter(model)
    if info.method != "lora":
        raise PeftkitError(
            f"adapter {name!r} is {info.method}: only LoRA is a weight update that folds into the base; "
            f"{info.method} adds computation of its own (use load_adapter for inference instead)"
        )
    model.set_adapter(name)
    if is_quantized(model):
        model = _requantize_free(model, name)
    merged = model.merge_and_unload(adapter_names=[name])
    merged.peftkit_adapters = {}
    return merged.to(dtype)


def _requantize_free(model: PeftModel, name: str) -> PeftModel:
    config = model.peft_config[name]
    state = get_peft_model_state_dict(model, adapter_name=name)
    base = model.unload()  # LoRA layers out, trained heads kept
    base.dequantize(dtype=torch.float32)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(base, attr):
            setattr(base, attr, False)
    plain = get_peft_model(base, config, adapter_name=name)
    set_peft_model_state_dict(plain, state, adapter_name=name)
    return plain
