"""Prefix tuning: base outputs untouched when off, agreement with peft, heads, training,
state dicts, mixed batches, removal, option errors, 4-bit backbones."""
import pytest
import torch
from conftest import make_tiny, tiny_inputs
from peft import PrefixTuningConfig, get_peft_model

from peftkit.errors import PeftkitError
from peftkit.tuners import prefix

HEADS = [("bert", "base"), ("bert", "cls"), ("bert", "qa"), ("llama", "lm"), ("llama", "cls"),
         ("llama", "qa"), ("gpt2", "lm"), ("gpt2", "cls")]


def frozen(arch, task, seed=0):
    model = make_tiny(arch, task, seed)
    model.requires_grad_(False)
    return model


def main_output(out):
    for key in ("logits", "start_logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return out[key]


def run(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def real_tokens(out, mask):
    """Per-token outputs at non-padding positions only (padding positions are don't-care)."""
    return out[mask.bool()] if out.dim() == 3 else out


def copy_from_peft(peft_model, model, name):
    weights = peft_model.prompt_encoder["default"].state_dict()
    prefix.load_adapter_state_dict(model, name, {"prefix_encoder." + k: v for k, v in weights.items()})


def loss_of(out, task):
    if task == "qa":
        return out.start_logits.square().mean() + out.end_logits.square().mean()
    return main_output(out).square().mean()


@pytest.mark.parametrize("arch,task", HEADS)
def test_off_is_base_and_on_changes_outputs(arch, task):
    model, inputs = frozen(arch, task), tiny_inputs()
    base = run(model, inputs)
    prefix.inject(model, prefix.Config(num_virtual_tokens=4), "a")
    assert not torch.allclose(run(model, inputs), base, atol=1e-4)
    prefix.set_active(model, None)
    assert torch.equal(run(model, inputs), base)


@pytest.mark.parametrize("arch,projection", [("llama", False), ("llama", True), ("gpt2", False)])
def test_forward_agrees_with_peft(arch, projection):
    options = dict(num_virtual_tokens=5, prefix_projection=projection)
    reference = get_peft_model(make_tiny(arch, "lm"), PrefixTuningConfig(task_type="CAUSAL_LM", **options))
    model, inputs = frozen(arch, "lm"), tiny_inputs()
    prefix.inject(model, prefix.Config(**options), "a")
    copy_from_peft(reference, model, "a")
    mask = inputs["attention_mask"]
    torch.testing.assert_close(real_tokens(run(model, inputs), mask), real_tokens(run(reference, inputs), mask),
                               atol=1e-5, rtol=0)


def test_greedy_generate_agrees_with_peft_forward():
    # peft 0.21's own generate drops the prefix under transformers 5 (its cache goes in as the
    # deprecated `past_key_values` and loses to `cache`), so the reference is a greedy loop over
    # peft's forward, which is correct.
    reference = get_peft_model(make_tiny("llama", "lm"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model = frozen("llama", "lm")
    prefix.inject(model, prefix.Config(num_virtual_tokens=3), "a")
    copy_from_peft(reference, model, "a")
    with torch.no_grad():  # small prefix values, so greedy decoding does not collapse onto one token
        for p in list(model.parameters()) + list(reference.parameters()):
            if p.requires_grad:
                p.mul_(0.1)
    ids = tiny_inputs()["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens, step_logits = ids, []
    for _ in range(6):
        with torch.no_grad():
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate derives from the mask
            logits = reference(input_ids=tokens, attention_mask=mask, position_ids=positions).logits[:, -1]
        step_logits.append(logits)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(out.sequences, tokens)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(step_logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,task", [("bert", "cls"), ("bert", "qa"), ("llama", "cls"), ("llama", "qa"),
                                       ("gpt2", "cls")])
def test_heads_forward_backward(arch, task):
    model, inputs = frozen(arch, task), tiny_inputs()
    prefix.inject(model, prefix.Config(num_virtual_tokens=4), "a")
    loss_of(model(**inputs), task).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_optimizer_step_changes_only_prefix():
    model, inputs = frozen("llama", "cls"), tiny_inputs()
    prefix.inject(model, prefix.Config(num_virtual_tokens=4, prefix_projection=True), "a")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**inputs, labels=torch.tensor([0, 2])).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name.startswith("_peftkit_prefix."):
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("arch,task", [("bert", "cls"), ("llama", "lm")])
def test_state_dict_round_trip_into_fresh_model(arch, task):
    config, inputs = prefix.Config(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=12), tiny_inputs()
    model = frozen(arch, task)
    prefix.inject(model, config, "trained")
    saved = prefix.adapter_state_dict(model, "trained")
    assert saved and all("trained" not in key for key in saved)
    assert saved["prefix_encoder.transform.0.weight"].shape[0] == 12
    fresh = frozen(arch, task)
    prefix.inject(fresh, prefix.Config.from_options(config.to_options()), "other_name")
    prefix.load_adapter_state_dict(fresh, "other_name", saved)
    assert torch.equal(run(fresh, inputs), run(model, inputs))


def test_load_is_strict_and_atomic():
    model = frozen("llama", "lm")
    prefix.inject(model, prefix.Config(num_virtual_tokens=4), "a")
    good = prefix.adapter_state_dict(model, "a")
    key = "prefix_encoder.embedding.weight"
    bad_cases = {
        "missing keys: " + key: {},
        "unexpected keys: extra": {**good, "extra": torch.zeros(1)},
        "wrong shapes: " + key: {key: torch.zeros(5, good[key].shape[1])},
    }
    for message, state in bad_cases.items():
        with pytest.raises(PeftkitError, match=message):
            prefix.load_adapter_state_dict(model, "a", state)
    assert torch.equal(prefix.adapter_state_dict(model, "a")[key], good[key])


@pytest.mark.parametrize("arch,task", [("bert", "cls"), ("llama", "lm"), ("llama", "cls"), ("gpt2", "lm")])
def test_mixed_batch_rows_equal_single_runs(arch, task):
    model, inputs = frozen(arch, task), tiny_inputs(batch=3)
    inputs["attention_mask"][2, -5:] = 0
    prefix.inject(model, prefix.Config(num_virtual_tokens=4), "a")
    prefix.inject(model, prefix.Config(num_virtual_tokens=6, prefix_projection=True), "b")
    rows = ["b", None, "a"]  # different prefix lengths, and a row without any
    prefix.set_active(model, rows)
    mixed = run(model, inputs)
    for i, name in enumerate(rows):
        prefix.set_active(model, name)
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        mask = row["attention_mask"]
        torch.testing.assert_close(real_tokens(mixed[i:i + 1], mask), real_tokens(run(model, row), mask),
                                   atol=1e-5, rtol=0)


def test_mixed_batch_generate_rows_equal_single_runs():
    model = frozen("llama", "lm")
    prefix.inject(model, prefix.Config(num_virtual_tokens=2), "a")
    prefix.inject(model, prefix.Config(num_virtual_tokens=5), "b")
    ids = tiny_inputs(batch=3)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    rows = ["a", "b", None]
    prefix.set_active(model, rows)
    mixed = model.generate(input_ids=ids, attention_mask=mask, **settings)
    for i, name in enumerate(rows):
        prefix.set_active(model, name)
        single = model.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **settings)
        assert torch.equal(mixed.sequences[i:i + 1], single.sequences)
        torch.testing.assert_close(torch.stack(mixed.logits)[:, i:i + 1], torch.stack(single.logits), atol=1e-5, rtol=0)


def test_remove():
    model, inputs = frozen("bert", "cls"), tiny_inputs()
    base = run(model, inputs)
    prefix.inject(model, prefix.Config(num_virtual_tokens=4), "a")
    prefix.inject(model, prefix.Config(num_virtual_tokens=3), "b")
    prefix.set_active(model, "a")
    with_a = run(model, inputs)
    prefix.remove(model, "b")
    assert not any(".b." in n for n, _ in model.named_parameters())
    assert torch.equal(run(model, inputs), with_a)
    with pytest.raises(PeftkitError, match="no adapter named 'b'"):
        prefix.set_active(model, "b")
    prefix.remove(model, "a")  # the last one: the model is back to its original state
    assert not hasattr(model, "_peftkit_prefix") and all(not p.requires_grad for p in model.parameters())
    assert torch.equal(run(model, inputs), base)


def test_options_validation_and_round_trip():
    config = prefix.Config.from_options({"num_virtual_tokens": 8, "prefix_projection": True})
    assert prefix.Config.from_options(config.to_options()) == config
    with pytest.raises(PeftkitError, match=r"unknown prefix option 'num_tokens'; did you mean num_virtual_tokens\? "
                       "prefix accepts: num_virtual_tokens, prefix_projection"):
        prefix.Config.from_options({"num_tokens": 8})
    with pytest.raises(PeftkitError, match="num_virtual_tokens must be a positive integer, got 0"):
        prefix.Config.from_options({"num_virtual_tokens": 0})
    for bad in ({"num_virtual_tokens": "8"}, {"num_virtual_tokens": True}, {"prefix_projection": 1},
                {"encoder_hidden_size": 1.5}):
        with pytest.raises(PeftkitError):
            prefix.Config.from_options(bad)


def test_unsupported_architecture_and_bad_selection():
    from transformers import OPTConfig, OPTForCausalLM
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=32))
    with pytest.raises(PeftkitError, match="supported: bert, roberta"):
        prefix.inject(opt, prefix.Config(), "a")
    model = frozen("llama", "lm")
    prefix.inject(model, prefix.Config(num_virtual_tokens=2), "a")
    prefix.set_active(model, ["a", None, "a"])
    with pytest.raises(PeftkitError, match="3 per-row adapters are active but the batch has 2 rows"):
        model(**tiny_inputs())


def test_gradient_checkpointing_is_refused_not_silently_wrong():
    model = frozen("llama", "lm")
    prefix.inject(model, prefix.Config(num_virtual_tokens=2), "a")
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(PeftkitError, match="gradient checkpointing"):
        model(**tiny_inputs())


def test_half_precision_backbone_keeps_fp32_prefix():
    model, inputs = frozen("llama", "lm").to(torch.bfloat16), tiny_inputs()
    prefix.inject(model, prefix.Config(num_virtual_tokens=3), "a")
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    (param,) = [p for p in model.parameters() if p.requires_grad]
    assert param.dtype == torch.float32 and param.grad.abs().sum() > 0


def test_4bit_backbone_forward_backward(tmp_path):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    make_tiny("llama", "lm").save_pretrained(tmp_path)
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantized)
    model.requires_grad_(False)
    prefix.inject(model, prefix.Config(num_virtual_tokens=4), "a")
    inputs = tiny_inputs()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].grad.abs().sum() > 0
    prefix.set_active(model, None)
    assert not torch.allclose(run(model, inputs), out.logits.detach(), atol=1e-4)


def test_too_long_for_learned_positions_is_a_clear_error():
    model = frozen("gpt2", "lm")  # 64 positions
    prefix.inject(model, prefix.Config(num_virtual_tokens=10), "a")
    run(model, tiny_inputs(length=54))
    with pytest.raises(PeftkitError, match="need 65 positions but the model has 64"):
        run(model, tiny_inputs(length=55))
