"""train.compile: the model's transformer blocks compiled for training steps. Compiled, a step
computes the loss and gradients eager computes; leaving the context restores the eager model
untouched; `auto` compiles only where it was measured to pay, and `true` where it cannot work is
refused in one line."""
import pytest
import torch
from conftest import make_tiny, tiny_inputs

import peftkit
from peftkit import compiling
from peftkit.attention import set_attention
from peftkit.dropout import swap_in_fast_dropout
from peftkit.errors import PeftkitError
from peftkit.recipe import load_recipe

LORA = {"method": "lora", "init_lora_weights": False, "lora_dropout": 0.0}


def loss_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs, labels=inputs["input_ids"], use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attention", ["sdpa", "plain"])  # peftkit's own kernel traces too
def test_compiled_blocks_compute_the_eager_loss_and_gradients_and_leave_the_model_as_it_was(attention):
    model = peftkit.attach(make_tiny("llama", "lm"), LORA).train()
    set_attention(model.base_model.model, attention)
    blocks = compiling.CompiledBlocks(model)
    assert len(blocks.blocks) == 2  # the tiny Llama's two decoder layers
    names = list(model.state_dict())
    for length in (10, 14):  # a second length reuses the dynamic graph
        inputs = tiny_inputs(length=length)
        eager_loss, eager_grads = loss_and_grads(model, inputs)
        with blocks:
            assert all("forward" in vars(block) for block in blocks.blocks)
            loss, grads = loss_and_grads(model, inputs)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert eager_grads.keys() == grads.keys() and any("lora_A" in n for n in grads)
        for name in grads:
            torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6)
    assert not any("forward" in vars(block) for block in blocks.blocks)  # eager again outside
    assert list(model.state_dict()) == names


def test_the_cpu_dropout_gives_way_to_inductors_own_inside_compiled_blocks():
    model = peftkit.attach(make_tiny("llama", "lm"), {"method": "lora", "lora_dropout": 0.3}).train()
    assert swap_in_fast_dropout(model) > 0
    inputs = tiny_inputs()
    with compiling.CompiledBlocks(model):  # the fast dropout's reinterpreting views do not trace
        loss, grads = loss_and_grads(model, inputs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    model.eval()
    with torch.no_grad():
        first = model(**inputs).logits
        assert torch.equal(model(**inputs).logits, first)  # evaluation: no dropout, eager


@pytest.mark.parametrize("task,method,precision,steps,on", [
    ("causal-lm", "lora", "bf16", 400, True),
    ("causal-lm", "lora", "bf16", compiling.PAYS_AFTER_STEPS - 1, False),  # the warm-up would not pay
    ("classification", "lora", "bf16", 400, False),  # measured slower on MiniLM's short rows
    ("causal-lm", "houlsby", "bf16", 400, False),  # not measured
    ("causal-lm", "full", "bf16", 400, False),  # bench's full fine-tuning: not measured either
    ("causal-lm", "lora", "fp32", 400, False),
])
def test_auto_compiles_only_where_it_was_measured_to_pay(monkeypatch, task, method, precision, steps, on):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = peftkit.attach(make_tiny("llama", "lm"), LORA)
    chosen, why = compiling.resolve_compile("auto", model, task, method, precision, steps)
    assert chosen is on
    assert why.startswith("compiled" if on else "eager (")
    assert compiling.resolve_compile(False, model, task, method, precision, steps)[0] is False
    assert compiling.resolve_compile(True, model, task, method, precision, steps)[0] is True


def test_compile_true_where_it_cannot_work_is_one_error():
    model = peftkit.attach(make_tiny("llama", "lm"), LORA)
    model.gradient_checkpointing_enable()
    with pytest.raises(PeftkitError, match="gradient checkpointing.*set train.compile to auto or false"):
        compiling.resolve_compile(True, model, "causal-lm", "lora", "bf16", 400)
    on, why = compiling.resolve_compile("auto", model, "causal-lm", "lora", "bf16", 400)
    assert not on and "gradient checkpointing" in why


def test_a_bad_compile_setting_is_refused_with_the_valid_ones():
    with pytest.raises(PeftkitError, match="train.compile must be auto, true or false, got 'fast'"):
        load_recipe("sentiment-lora", ["train.compile=fast"])

