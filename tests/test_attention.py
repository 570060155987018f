"""peftkit's plain attention: the forward of eager attention bit for bit, gradients as close to exact
as eager's, the same greedy generations, eager itself where it does not apply, and chosen exactly
where it was measured to pay."""
import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

import peftkit
from peftkit import attention
from peftkit.attention import PlainAttention, choose_attention, plain_attention, set_attention
from peftkit.errors import PeftkitError
from peftkit.recipe import load_recipe

from conftest import CLASSES, make_tiny, tiny_inputs


def tiny_lm(arch: str):
    return make_tiny(arch, "lm").to(torch.bfloat16)


def loss_and_grads(model, inputs, implementation):
    set_attention(model, implementation)
    model.zero_grad()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_every_listed_architecture_is_tested():
    assert {arch for arch, task in CLASSES if task == "lm"} >= set(attention.PLAIN_MODELS)


@pytest.mark.parametrize("arch", attention.PLAIN_MODELS)
def test_plain_attention_computes_eagers_logits_bit_for_bit_and_its_gradients(arch):
    model = tiny_lm(arch).train()  # training: the attention has no dropout in these configs
    inputs = tiny_inputs(length=12)  # one row padded
    eager_logits, eager_grads = loss_and_grads(model, inputs, "eager")
    plain_logits, plain_grads = loss_and_grads(model, inputs, "plain")
    assert torch.equal(plain_logits, eager_logits)
    assert plain_grads.keys() == eager_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():  # bf16 gradients: rounded in other places, so close, not equal
        torch.testing.assert_close(grad.float(), eager_grads[name].float(), rtol=0.05, atol=0.02 * grad.abs().max().item())


def exact_attention(q, k, v, mask, scaling):
    groups = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(groups, 1) for x in (k, v))
    probs = torch.softmax(q.double() @ k.transpose(2, 3) * scaling + mask.double(), -1)
    return (probs @ v).transpose(1, 2)


def test_plain_gradients_are_as_close_to_exact_as_eagers():
    torch.manual_seed(0)
    batch, heads, groups, rows, size = 4, 6, 2, 24, 32
    q = torch.randn(batch, heads, rows, size, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, groups, rows, size, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    allowed = torch.ones(rows, rows, dtype=torch.bool).tril() & (torch.arange(rows) < rows - 5)  # causal, padded
    mask = torch.zeros(batch, 1, rows, rows, dtype=torch.bfloat16).masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    upstream = torch.randn(batch, rows, heads, size, dtype=torch.bfloat16)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = heads // groups, True

    def grads(fn, *inputs):
        inputs = [x.detach().requires_grad_() for x in inputs]
        fn(*inputs).backward(upstream.to(inputs[0].dtype))
        return [x.grad.double() for x in inputs]

    exact = grads(lambda q, k, v: exact_attention(q, k, v, mask, size ** -0.5), q.double(), k.double(), v.double())
    eager = grads(lambda q, k, v: eager_attention_forward(module, q, k, v, mask, size ** -0.5)[0], q, k, v)
    plain = grads(lambda q, k, v: PlainAttention.apply(q, k, v, mask, size ** -0.5), q, k, v)
    for name, want, e, p in zip("qkv", exact, eager, plain):
        eager_error, plain_error = ((x - want).abs().max().item() for x in (e, p))
        assert plain_error <= 1.5 * eager_error, f"d{name}: {plain_error} against eager's {eager_error}"


def test_greedy_generation_with_a_cache_gives_eagers_tokens():
    model = tiny_lm("llama").eval()
    prompt = tiny_inputs(batch=3, length=9)
    prompt["attention_mask"][0] = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1])  # left padding, as generation pads
    runs = {}
    for implementation in ("eager", "plain"):
        set_attention(model, implementation)
        runs[implementation] = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(runs["plain"], runs["eager"])


def test_prefix_tuning_through_plain_attention_gives_eagers_logits():
    model = peftkit.attach(make_tiny("llama", "lm"), "prefix").to(torch.bfloat16).eval()
    inputs = tiny_inputs()
    logits = {}
    for implementation in ("eager", "plain"):
        set_attention(model.base_model, implementation)
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits
    assert torch.equal(logits["plain"], logits["eager"])


def test_what_plain_attention_does_not_cover_goes_to_eager():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8, dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 6, 8, dtype=torch.bfloat16), torch.randn(2, 2, 6, 8, dtype=torch.bfloat16)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    module.train()
    torch.manual_seed(1)
    dropped = eager_attention_forward(module, q, k, v, None, 0.3, dropout=0.5)
    torch.manual_seed(1)
    out, weights = plain_attention(module, q, k, v, None, 0.3, dropout=0.5)
    assert torch.equal(out, dropped[0]) and weights is not None  # eager's, dropout and all
    fp32_mask = torch.zeros(2, 1, 6, 6)
    out, weights = plain_attention(module.eval(), q, k, v, fp32_mask, 0.3)
    assert weights is not None and out.dtype == torch.bfloat16
    out, weights = plain_attention(module, q, k, v, fp32_mask.bfloat16(), 0.3)
    assert weights is None  # covered: peftkit's kernel, which keeps no weights


def test_the_choice_plain_for_listed_architectures_eager_for_others_fused_elsewhere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    inputs = tiny_inputs()
    for arch, small in (("llama", "plain"), ("bert", "eager")):
        model = make_tiny(arch, "cls")
        with torch.no_grad():
            fused = model(**inputs).logits
        heads = model.config.num_attention_heads
        too_many = int((attention.SMALL_ATTENTION / heads) ** 0.5) + 1  # tokens past the limit at batch 1
        assert choose_attention(model, "fp32", 32, 64) == "sdpa"
        assert choose_attention(model, "bf16", 1, too_many) == "sdpa"
        assert choose_attention(model, "bf16", 32, 64) == small
        assert attention.running_attention(model) == small
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, fused, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_attention(make_tiny("llama", "cls"), "bf16", 32, 64) == "sdpa"


def test_train_attention_picks_the_kernel_and_refuses_what_cannot_be():
    model = make_tiny("llama", "cls")
    for asked in ("eager", "sdpa", "plain"):  # honoured whatever auto would pick
        assert choose_attention(model, "fp32", 32, 64, asked) == asked
    assert attention.running_attention(model) == "plain" and model.config._attn_implementation == attention.PLAIN
    with pytest.raises(PeftkitError, match="train.attention: plain computes the attention of llama, mistral, "
                                           "qwen2, qwen3 models; this one is bert: use auto, eager or sdpa"):
        choose_attention(make_tiny("bert", "cls"), "bf16", 32, 64, "plain")
    with pytest.raises(PeftkitError, match="train.attention must be one of auto, plain, eager, sdpa, got 'flash'"):
        load_recipe("headlines-lora", ["train.attention=flash"])
