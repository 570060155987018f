"""MAM adapters and UniPELT: their outputs against hand computations, their gates, their parameter
counts, switching beside other adapters (and per row in the bank for MAM), saving and refusals."""
import pytest
import torch
from conftest import logits, make_tiny, randomized, tiny_inputs

import peftkit
from peftkit import AdapterBank, PeftkitError
from peftkit.methods import method
from peftkit.saving import saved_state
from peftkit.tuners import mam, prefix, unipelt
from peftkit.tuners.unipelt.layer import LoRAWrapper

ARCHS = [("bert", "cls"), ("llama", "lm")]


def set_params(model, pattern: str, value: float):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if pattern in name:
                param.fill_(value)


def with_prefix_of(model, arch, task, tokens):
    """A fresh model with a plain prefix adapter holding `model`'s prefix part and its head."""
    plain = peftkit.attach(make_tiny(arch, task), {"method": "prefix", "num_virtual_tokens": tokens,
                                                   "prefix_projection": True})
    part = {k[len("prefix."):]: v for k, v in saved_state(model).items() if k.startswith("prefix.")}
    prefix.load_adapter_state_dict(plain, "default", part)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("classifier", "score")},
                          strict=False)
    return plain


def add_parallel_by_hand(model, adapters: dict, scaling: float, ffn_input: str, ffn_output: str):
    """Hooks adding scaling * up(relu(down(x))) to each layer's feed-forward output, x its input."""
    seen = {}
    for layer, (down_w, down_b, up_w, up_b) in adapters.items():
        model.get_submodule(ffn_input.format(layer)).register_forward_pre_hook(
            lambda m, args, layer=layer: seen.__setitem__(layer, args[0]))

        def add(m, args, out, layer=layer, w=(down_w, down_b, up_w, up_b)):
            return out + scaling * (torch.relu(seen[layer] @ w[0].T + w[1]) @ w[2].T + w[3])
        model.get_submodule(ffn_output.format(layer)).register_forward_hook(add)


FFN = {"bert": ("bert.encoder.layer.{}.intermediate", "bert.encoder.layer.{}.output.dense"),
       "llama": ("model.layers.{}.mlp", "model.layers.{}.mlp")}


# ----------------------------------------------------------------------------------------------- MAM

@pytest.mark.parametrize("arch,task", ARCHS)
def test_mam_is_the_prefix_alone_plus_the_scaled_parallel_adapter_computed_by_hand(arch, task):
    model = randomized(peftkit.attach(make_tiny(arch, task), {"method": "mam", "reduction_factor": 4}))
    reference = with_prefix_of(model, arch, task, 30)
    up_zero = randomized(peftkit.attach(make_tiny(arch, task), {"method": "mam", "reduction_factor": 4}))
    set_params(up_zero, ".up.", 0.0)  # the adapter part adds nothing: MAM is its prefix alone
    torch.testing.assert_close(logits(up_zero), logits(with_prefix_of(up_zero, arch, task, 30)), rtol=0, atol=1e-6)

    sites = {i: model.get_submodule(FFN[arch][1].format(i)).adapters["default"] for i in range(2)}
    add_parallel_by_hand(reference, {i: (a.down.weight, a.down.bias, a.up.weight, a.up.bias)
                                     for i, a in sites.items()}, 4.0, *FFN[arch])
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(model), logits(up_zero), atol=1e-3)  # the adapter part did matter


def test_mam_param_count_is_the_hand_formula_and_only_the_adapter_and_head_train():
    model = peftkit.attach(make_tiny("bert", "cls"), "mam")  # the preset: 30 tokens, MLP, reduction factor 2
    hidden, layers, tokens, size = 32, 2, 30, 16
    prefix_params = tokens * hidden + (hidden * hidden + hidden) + (hidden * 2 * layers * hidden + 2 * layers * hidden)
    adapter_params = layers * (hidden * size + size + size * hidden + hidden)
    head = hidden * 3 + 3
    assert peftkit.param_report(model)["trainable"] == prefix_params + adapter_params + head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("_peftkit_prefix.encoders.default.", "classifier.")) or ".adapters.default." in n
               for n in trainable)
    assert {k.split(".")[0] for k in saved_state(model)} == {"prefix", "adapter", "classifier"}


def test_mam_switches_beside_prefix_and_bottleneck_adapters_and_never_half(tmp_path):
    specs = {"m": {"method": "mam", "reduction_factor": 4}, "p": {"method": "prefix", "num_virtual_tokens": 5},
             "h": {"method": "houlsby"}}
    folders = {n: peftkit.save_adapter(randomized(peftkit.attach(make_tiny("llama", "lm"), s), seed=i), tmp_path / n)
               for i, (n, s) in enumerate(specs.items())}
    alone = {n: logits(peftkit.load_adapter(make_tiny("llama", "lm"), f)) for n, f in folders.items()}
    model = make_tiny("llama", "lm")
    for name in ("m", "p", "h"):  # each load makes its adapter the only active one
        model = peftkit.load_adapter(model, folders[name], name=name)
        torch.testing.assert_close(logits(model), alone[name], rtol=0, atol=1e-6)
    model = peftkit.load_adapter(model, folders["m"], name="m2")  # and back: both MAM parts come on again
    torch.testing.assert_close(logits(model), alone["m"], rtol=0, atol=1e-6)

    bank = AdapterBank(make_tiny("llama", "lm"))
    for name, folder in folders.items():
        bank.load(name, folder)
    inputs = tiny_inputs(batch=4)
    rows = ["m", "p", "h", None]
    mixed = bank.forward(rows, **inputs).logits
    for i, name in enumerate(rows):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        torch.testing.assert_close(mixed[i:i + 1], bank.forward(name, **one).logits, rtol=1e-5, atol=1e-5)
        if name is not None:  # each adapter is itself in the bank, with none of the others' parts
            torch.testing.assert_close(bank.forward(name, **one).logits,
                                       logits(peftkit.load_adapter(make_tiny("llama", "lm"), folders[name]), one),
                                       rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- UniPELT

def test_unipelt_gated_lora_is_the_hand_formula():
    model = randomized(peftkit.attach(make_tiny("bert", "cls"), {"method": "unipelt", "r": 4, "lora_alpha": 2}))
    wrapper = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(wrapper, LoRAWrapper)
    lora = wrapper.adapters["default"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    gate = torch.sigmoid(x @ lora.gate.weight.T + lora.gate.bias)  # one per token
    want = wrapper.base_layer(x) + gate * (2 / 4) * (x @ lora.A.weight.T @ lora.B.weight.T)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch, task, part, body", [
    ("bert", "cls", "query.adapters.", ".B."), ("bert", "cls", "value.adapters.", ".B."),
    ("bert", "cls", "output.dense.adapters.", ".up."), ("llama", "lm", "q_proj.adapters.", ".B."),
    ("llama", "lm", "v_proj.adapters.", ".B."), ("llama", "lm", "mlp.adapters.", ".up.")])
def test_a_unipelt_gate_at_zero_turns_its_part_off(arch, task, part, body):
    model = randomized(peftkit.attach(make_tiny(arch, task), "unipelt"))
    without = randomized(peftkit.attach(make_tiny(arch, task), "unipelt"))
    with torch.no_grad():
        for name, param in without.named_parameters():
            if part in name and body in name:
                param.zero_()  # the part itself adds nothing
    assert not torch.allclose(logits(model), logits(without), atol=1e-4)
    set_params(model, part + "default.gate.weight", 0.0)
    set_params(model, part + "default.gate.bias", -1e4)  # sigmoid: exactly 0
    torch.testing.assert_close(logits(model), logits(without), rtol=0, atol=0)


@pytest.mark.parametrize("arch,task", ARCHS)
def test_the_unipelt_prefix_gate_scales_the_prefix_keys_and_values(arch, task):
    model = randomized(peftkit.attach(make_tiny(arch, task), "unipelt"))
    set_params(model, "adapters.default.gate.weight", 0.0)  # LoRA and adapter off: the prefix alone is left
    set_params(model, "adapters.default.gate.bias", -1e4)
    set_params(model, "_peftkit_unipelt.gates.default", 0.0)
    set_params(model, "_peftkit_unipelt.gates.default.0.bias", 1e4)  # layer 0: gate 1
    set_params(model, "_peftkit_unipelt.gates.default.1.bias", 1e4)
    plain = with_prefix_of(model, arch, task, 10)
    torch.testing.assert_close(logits(model), logits(plain), rtol=1e-6, atol=1e-6)

    half = 0.5  # a gate of exactly 0.5 (weight 0, bias 0) halves every prefix key and value
    set_params(model, "_peftkit_unipelt.gates.default", 0.0)
    halved = with_prefix_of(model, arch, task, 10)
    with torch.no_grad():
        last = halved._peftkit_prefix.encoders["default"].transform[2]
        last.weight.mul_(half), last.bias.mul_(half)  # the MLP's last layer makes the keys and values
    torch.testing.assert_close(logits(model), logits(halved), rtol=1e-5, atol=1e-5)


def test_unipelt_param_count_is_the_hand_formula_and_only_the_adapter_and_head_train():
    model = peftkit.attach(make_tiny("bert", "cls"), "unipelt")
    hidden, layers, tokens, size, r = 32, 2, 10, 32 // 16, 8
    gate = hidden + 1
    prefix_params = tokens * hidden + (hidden * hidden + hidden) + (hidden * 2 * layers * hidden + 2 * layers * hidden)
    adapter_params = layers * (hidden * size + size + size * hidden + hidden + gate)
    lora_params = layers * 2 * (r * hidden + hidden * r + gate)  # query and value
    prefix_gates = layers * gate
    head = hidden * 3 + 3
    assert peftkit.param_report(model)["trainable"] == \
        prefix_params + adapter_params + lora_params + prefix_gates + head
    for name, param in model.named_parameters():
        assert param.requires_grad == (".default." in name or name.startswith("classifier.")), name


@pytest.mark.parametrize("name", ["mam", "unipelt"])
@pytest.mark.parametrize("arch,task", ARCHS + [("gpt2", "lm")])
def test_save_and_load_are_bit_identical(tmp_path, name, arch, task):
    model = peftkit.attach(make_tiny(arch, task), name)
    model.train()
    model(**tiny_inputs()).logits.pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    saved = saved_state(model)
    assert not any("default" in key for key in saved)
    loaded = peftkit.load_adapter(make_tiny(arch, task), peftkit.save_adapter(model, tmp_path / "a"))
    again = saved_state(loaded)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mam", "unipelt"])
def test_trains_and_loads_on_a_4bit_base(tmp_path, name):
    make_tiny("llama", "cls").save_pretrained(tmp_path / "base")
    model = peftkit.attach(peftkit.load_model(tmp_path / "base", task="classification", quantize="nf4"), name)
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad and "score" not in n}
    model.train()
    model(**tiny_inputs()).logits.float().pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    loaded = peftkit.load_adapter(peftkit.load_model(tmp_path / "base", task="classification", quantize="nf4"),
                                  peftkit.save_adapter(model, tmp_path / "a"))
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_unipelt_generates_and_its_first_token_is_the_forward_pass_argmax():
    model = randomized(peftkit.attach(make_tiny("llama", "lm"), "unipelt"))
    ids = tiny_inputs(batch=1)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)
    assert out[0, ids.shape[1]] == logits(model, {"input_ids": ids})[0, -1].argmax()


# ----------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("spec, message", [
    ({"method": "mam", "prefix_length": 30}, "unknown mam option 'prefix_length'; did you mean prefix_projection? mam accepts: num_virtual_tokens, "
                                             "prefix_projection, encoder_hidden_size, bottleneck_size, "
                                             "reduction_factor, non_linearity, scaling, dropout"),
    ({"method": "mam", "bottleneck_size": 8, "reduction_factor": 2}, "give either bottleneck_size or reduction_factor"),
    ({"method": "unipelt", "alpha": 2}, "unknown unipelt option 'alpha'; did you mean lora_alpha? unipelt accepts: num_virtual_tokens, "
                                        "prefix_projection, encoder_hidden_size, bottleneck_size, reduction_factor, "
                                        "non_linearity, dropout, r, lora_alpha, lora_dropout"),
    ({"method": "unipelt", "r": 0}, "unipelt r must be a positive integer, got 0"),
    ({"method": "unipelt", "num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer, got 0"),
])
def test_bad_options_are_refused_in_one_line_before_the_model_changes(spec, message):
    model = make_tiny("bert", "cls")
    with pytest.raises(PeftkitError) as err:
        peftkit.attach(model, spec)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not hasattr(model, "peftkit_adapters")
    assert [n for n, _ in model.named_modules()] == [n for n, _ in make_tiny("bert", "cls").named_modules()]


def test_a_failed_part_leaves_no_other_part_behind():
    model = make_tiny("bert", "cls")
    with pytest.raises(PeftkitError, match="reduction_factor 64 is larger than the model's hidden size 32"):
        peftkit.attach(model, {"method": "mam", "reduction_factor": 64})  # the prefix went in before it failed
    assert not hasattr(model, "_peftkit_prefix") and "_peftkit_bottleneck" not in model.__dict__


@pytest.mark.parametrize("name", ["mam", "unipelt"])
def test_merge_and_checkpointing_are_refused(name):
    model = peftkit.attach(make_tiny("llama", "lm"), name)
    with pytest.raises(PeftkitError, match=f"{name}, which merge.. cannot fold into the base"):
        peftkit.merge(model)
    with pytest.raises(PeftkitError, match=f"{method(name).long_name} does not work with gradient checkpointing"):
        peftkit.attach(make_tiny("llama", "lm"), name, gradient_checkpointing=True)


def test_the_bank_refuses_unipelt_and_unipelt_takes_no_per_row_list(tmp_path):
    model = peftkit.attach(make_tiny("llama", "lm"), "unipelt")
    with pytest.raises(PeftkitError, match="is unipelt, which the bank cannot apply per row"):
        AdapterBank(make_tiny("llama", "lm")).load("u", peftkit.save_adapter(model, tmp_path / "u"))
    with pytest.raises(PeftkitError, match="unipelt takes one adapter for the whole batch"):
        unipelt.set_active(model, ["default", None])


def test_removing_a_composite_gives_the_model_back():
    names = [n for n, _ in make_tiny("llama", "lm").named_modules()]
    for name, tuner in (("mam", mam), ("unipelt", unipelt)):
        model = peftkit.attach(make_tiny("llama", "lm"), name)
        tuner.remove(model, "default")
        assert [n for n, _ in model.named_modules()] == names
        assert not any(k.startswith("_peftkit") for k in model.__dict__)
        torch.testing.assert_close(logits(model), logits(make_tiny("llama", "lm")), rtol=0, atol=0)
