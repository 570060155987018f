"""Where adapters go in each supported architecture, in one table.

LoRA's default targets, LN tuning's norm layers and the bottleneck adapters' insertion
points come from here, so those methods support a new architecture with one entry. Prefix
tuning also lists the architectures whose attention cache it was checked with (SUPPORTED in
tuners/prefix/model.py), and task heads are found per model (anatomy.task_heads).
Each placement pattern is a regular expression matched (re.search) against full module
names such as "bert.encoder.layer.3.attention.output.dense".
"""
import re
from dataclasses import dataclass

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .errors import PeftkitError


@dataclass(frozen=True)
class Layout:
    lora_targets: tuple[str, ...]  # LoRA's default targets, as peft matches them (name suffixes)
    attention_output: str  # output projection of self-attention, before the residual add
    ffn_input: str  # module whose *input* is the feed-forward block's input
    ffn_output: str  # module whose *output* is the feed-forward block's output, before the residual add
    norm_targets: tuple[str, ...]  # its normalization layers, as peft matches them (LN tuning's default targets)


_BERT = Layout(
    lora_targets=("query", "value"),
    attention_output=r"layer\.\d+\.attention\.output\.dense$",
    ffn_input=r"layer\.\d+\.intermediate$",
    ffn_output=r"layer\.\d+\.output\.dense$",
    norm_targets=("LayerNorm",),  # embeddings, after attention and after the feed-forward block
)
_LLAMA = Layout(
    lora_targets=("q_proj", "v_proj"),
    attention_output=r"layers\.\d+\.self_attn\.o_proj$",
    ffn_input=r"layers\.\d+\.mlp$",
    ffn_output=r"layers\.\d+\.mlp$",
    norm_targets=("input_layernorm", "post_attention_layernorm", "norm"),
)
_GPT2 = Layout(
    lora_targets=("c_attn",),
    attention_output=r"h\.\d+\.attn\.c_proj$",
    ffn_input=r"h\.\d+\.mlp$",
    ffn_output=r"h\.\d+\.mlp$",
    norm_targets=("ln_1", "ln_2", "ln_f"),
)

LAYOUTS = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": _GPT2,
}


def layout_of(model) -> Layout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise PeftkitError(
            f"no default adapter placement for model_type {model_type!r}; "
            f"supported: {', '.join(sorted(LAYOUTS))}. For LoRA pass target_modules explicitly."
        )
    return LAYOUTS[model_type]


def candidate_modules(model, limit: int = 12) -> list[str]:
    """Names of the model's linear layers with layer numbers folded to N,
    for error messages that must say what *would* match."""
    seen = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            folded = re.sub(r"\.\d+\.", ".N.", name)
            if folded not in seen:
                seen.append(folded)
    return seen[:limit]
