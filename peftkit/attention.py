"""The attention kernel a run computes with, and peftkit's own for small bf16 batches on a CPU.

    attention = choose_attention(model, precision, batch_size, max_length)   # "plain" | "eager" | "sdpa"
    set_attention(model, "eager")                                             # what train.attention asks for
    running_attention(model)                                                  # "eager"

On a CPU in bf16, PyTorch's fused attention kernel is slower than plain matmuls for the recipes'
small batches (benchmarks/results/xeon-amx/cpu-kernels-cpu.md), and its math path computes bf16 in
fp32. transformers' "eager" attention is plain matmuls, but for every layer it copies the keys and
values once per query head sharing them, runs the softmax in fp32 and keeps that fp32 copy for
backward beside the bf16 one the next matmul keeps. `PlainAttention` computes the same forward, bit
for bit, without them, and writes its own backward from the saved probabilities (the softmax
gradient is P * (dP - rowsum(dP * P))). No library has this kernel for CPUs; transformers'
AttentionInterface is the documented way to plug one in.
"""
import torch

from .errors import PeftkitError

ATTENTIONS = ("auto", "plain", "eager", "sdpa")  # train.attention; auto: choose_attention decides
PLAIN = "peftkit_plain"  # the plain kernel's name in transformers' attention registry
# Attention score elements per batch (batch x heads x tokens^2) up to which plain matmul attention beats
# PyTorch's fused kernel on a CPU in bf16 (benchmarks/results/xeon-amx/cpu-kernels-cpu.md)
SMALL_ATTENTION = 2**24
# Architectures whose eager attention is Llama's (grouped keys and values, an additive mask, the softmax
# in fp32 cast back), so that PlainAttention computes what they would; tests compare each with eager
PLAIN_MODELS = ("llama", "mistral", "qwen2", "qwen3")


def check_attention(requested: str) -> None:
    if requested not in ATTENTIONS:
        raise PeftkitError(f"train.attention must be one of {', '.join(ATTENTIONS)}, got {requested!r}")


def choose_attention(model, precision: str, batch_size: int, max_length: int, requested: str = "auto") -> str:
    """Switch `model` to the attention `requested` (train.attention), and under `auto` to the fastest
    that computes what it would; return its name. `auto`: on a CPU in bf16 for batches of at most
    SMALL_ATTENTION score elements, peftkit's plain attention for the architectures in PLAIN_MODELS and
    transformers' "eager" for the others; elsewhere the model's own (SDPA). At 27M scores (MiniLM's QA
    windows of 384 tokens, batch 16) the fused kernel wins."""
    check_attention(requested)
    config = model.config.get_text_config()
    if requested == "auto":
        scores = batch_size * config.num_attention_heads * max_length ** 2
        if precision != "bf16" or torch.cuda.is_available() or scores > SMALL_ATTENTION:
            return running_attention(model)
        requested = "plain" if config.model_type in PLAIN_MODELS else "eager"
    if requested == "plain" and config.model_type not in PLAIN_MODELS:
        raise PeftkitError(f"train.attention: plain computes the attention of {', '.join(PLAIN_MODELS)} models; "
                           f"this one is {config.model_type}: use auto, eager or sdpa")
    set_attention(model, requested)
    return requested


def set_attention(model, name: str) -> None:
    """Make `model` (a transformers model) compute attention with `name`: plain, eager or sdpa."""
    if name == "plain":
        _register_plain()
    model.set_attn_implementation(PLAIN if name == "plain" else name)


def running_attention(model) -> str:
    """The attention `model` computes with, named as train.attention names it."""
    name = model.config._attn_implementation
    return "plain" if name == PLAIN else name


def _register_plain() -> None:
    """Put the plain kernel in transformers' registries (again is harmless). Done on first use, not at
    import: checking a recipe should not wait for transformers to load."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(PLAIN, plain_attention)
    AttentionMaskInterface.register(PLAIN, eager_mask)  # the additive mask eager attention takes


class PlainAttention(torch.autograd.Function):
    """softmax(q k^T * scaling + mask) v for q (batch, heads, rows, size), k and v (batch, groups,
    keys, size) with heads a multiple of groups; returns (batch, rows, heads, size) as eager does.
    It computes in its inputs' dtype, whatever autocast says, so that it stays eager's arithmetic."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scaling):
        with torch.autocast(query.device.type, enabled=False):
            batch, heads, rows, size = query.shape
            groups = key.shape[1]
            # The query heads that share a key/value head, stacked: one matmul per key/value head
            # instead of eager's copies of k and v for each query head
            q = query.reshape(batch, groups, -1, size)
            scores = torch.matmul(q, key.transpose(2, 3)).mul_(scaling)
            if mask is not None:
                scores.view(batch, groups, heads // groups, rows, -1).add_(mask.unsqueeze(2))
            probs = torch.softmax(scores, dim=-1)  # bf16 in and out, fp32 inside: eager's values
            out = torch.matmul(probs, value)
        ctx.save_for_backward(q, key, value, probs)
        ctx.scaling = scaling
        return out.view(batch, heads, rows, size).transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad):
        q, key, value, probs = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            batch, rows, heads, size = grad.shape
            grad = grad.transpose(1, 2).reshape(q.shape)
            grad_value = torch.matmul(probs.transpose(2, 3), grad)
            # aten's fused softmax backward (no public name): one pass where the formula takes three
            grad_scores = torch._softmax_backward_data(torch.matmul(grad, value.transpose(2, 3)), probs, -1,
                                                       probs.dtype)
            grad_query = torch.matmul(grad_scores, key).mul_(ctx.scaling)
            grad_key = torch.matmul(grad_scores.transpose(2, 3), q).mul_(ctx.scaling)
        return grad_query.view(batch, heads, rows, size), grad_key, grad_value, None, None


def plain_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface over PlainAttention. What it does not cover (attention dropout
    while training, a mask of another dtype or one per head) goes to eager attention, which does."""
    mask = attention_mask
    covered = (not (dropout and module.training) and query.dtype == key.dtype == value.dtype
               and (mask is None or (mask.dtype == query.dtype and mask.shape[1] == 1)))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if not covered:
        from transformers.models.llama.modeling_llama import eager_attention_forward
        return eager_attention_forward(module, query, key, value, mask, scaling, dropout, **kwargs)
    return PlainAttention.apply(query, key, value, mask, scaling), None
