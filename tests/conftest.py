"""Tiny random models built from configs: fast, offline, deterministic."""
import time

import pytest
import torch
from transformers import (
    BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertModel,
    GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel,
    LlamaConfig, LlamaForCausalLM, LlamaForQuestionAnswering, LlamaForSequenceClassification,
    MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

BERT = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)
LLAMA = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
             pad_token_id=0)
GPT2 = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)

CLASSES = {
    ("bert", "base"): (BertConfig, BertModel),
    ("bert", "cls"): (BertConfig, BertForSequenceClassification),
    ("bert", "qa"): (BertConfig, BertForQuestionAnswering),
    ("llama", "lm"): (LlamaConfig, LlamaForCausalLM),
    ("llama", "cls"): (LlamaConfig, LlamaForSequenceClassification),
    ("llama", "qa"): (LlamaConfig, LlamaForQuestionAnswering),
    ("mistral", "lm"): (MistralConfig, MistralForCausalLM),  # Llama's attention, as peftkit's plain kernel
    ("qwen2", "lm"): (Qwen2Config, Qwen2ForCausalLM),  # computes it (tests/test_attention.py)
    ("qwen3", "lm"): (Qwen3Config, Qwen3ForCausalLM),
    ("gpt2", "lm"): (GPT2Config, GPT2LMHeadModel),
    ("gpt2", "cls"): (GPT2Config, GPT2ForSequenceClassification),
}
SIZES = {"bert": BERT, "llama": LLAMA, "gpt2": GPT2,
         **dict.fromkeys(("mistral", "qwen2", "qwen3"), {**LLAMA, "head_dim": 16})}


def make_tiny(arch: str, task: str, seed: int = 0):
    """A fresh tiny model; the same (arch, task, seed) always gives the same weights."""
    config_cls, model_cls = CLASSES[(arch, task)]
    torch.manual_seed(seed)
    config = config_cls(**SIZES[arch], num_labels=2 if task == "qa" else 3)
    return model_cls(config).eval()


def tiny_inputs(batch: int = 2, length: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded row so masks are exercised
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or tiny_inputs())).logits


def randomized(model, seed: int = 0, scale: float = 0.3):
    """`model` with every trainable tensor (adapter and head) random: distinct adapters that visibly
    change outputs, without training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    return model


@pytest.fixture
def tiny():
    return make_tiny


@pytest.fixture
def inputs():
    return tiny_inputs()


def wait_until(condition, tries: int = 5000):
    """Poll `condition` every millisecond (another thread is getting somewhere) until it holds."""
    for _ in range(tries):
        if condition():
            return
        time.sleep(0.001)
    raise AssertionError("timed out")
