"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) on tiny BERT, Llama and GPT-2 models."""
import json

import pytest
import torch
from conftest import make_tiny, tiny_inputs

from peftkit.errors import PeftkitError
from peftkit.tuners import bottleneck as bn
from peftkit.tuners.bottleneck.layer import Bottleneck, BottleneckWrapper

METHODS = ["houlsby", "pfeiffer", "parallel"]
MODELS = [("bert", "cls"), ("bert", "qa"), ("llama", "lm"), ("gpt2", "lm")]
LAYERS, B = 2, 8  # conftest's tiny models have 2 layers; hidden sizes are read from their configs
SITES_PER_LAYER = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}


def frozen(arch, task, seed=0):
    model = make_tiny(arch, task, seed)
    model.requires_grad_(False)
    return model


def build(arch, task, method, name="a", **options):
    model = frozen(arch, task)
    bn.inject(model, bn.Config.from_options({"method": method, "bottleneck_size": B, **options}), name)
    return model


def outputs(model, inputs) -> list[torch.Tensor]:
    """The model's output tensors (logits, or start/end logits), each [batch, ...]."""
    return [v for v in model(**inputs).to_tuple() if isinstance(v, torch.Tensor)]


def run(model, inputs):
    with torch.no_grad():
        return outputs(model, inputs)


def assert_close(xs, ys, atol=1e-6):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def adapters(model, name="a"):
    return [m.adapters[name] for m in model.modules() if isinstance(m, BottleneckWrapper) and name in m.adapters]


def perturb(model, name="a", seed=0):
    """Move an adapter away from identity so that it visibly changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters(model, name):
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def loss_of(model, inputs):
    return sum((t.float() ** 2).mean() for t in outputs(model, inputs))


grid = pytest.mark.parametrize("method", METHODS)
models = pytest.mark.parametrize("arch,task", MODELS)


@grid
@models
def test_identity_at_init(arch, task, method):
    inputs = tiny_inputs()
    base = run(frozen(arch, task), inputs)
    model = build(arch, task, method)
    assert_close(run(model, inputs), base, atol=0)  # up-projection is zero: bit-exact
    perturb(model)
    changed = run(model, inputs)
    assert not torch.allclose(changed[0], base[0])  # the adapter is really in the forward pass
    bn.set_active(model, None)
    assert_close(run(model, inputs), base, atol=0)


@grid
@models
def test_backward_and_step_touch_only_adapters(arch, task, method):
    model = build(arch, task, method)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_of(model, tiny_inputs()).backward()
    for adapter in adapters(model):
        assert adapter.up.weight.grad is not None and adapter.up.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    torch.optim.AdamW(trainable, lr=1e-2).step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".adapters.a." in k for k in changed)


@grid
@models
def test_parameter_count(arch, task, method):
    model = build(arch, task, method)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hidden = model.config.hidden_size
    per_adapter = hidden * B + B + B * hidden + hidden
    assert n == per_adapter * LAYERS * SITES_PER_LAYER[method]


@grid
@models
def test_state_dict_round_trip(arch, task, method):
    inputs = tiny_inputs()
    model = build(arch, task, method, name="first")
    perturb(model, "first")
    expected = run(model, inputs)
    state = bn.adapter_state_dict(model, "first")
    assert state and not any("first" in k for k in state)

    fresh = build(arch, task, method, name="renamed")  # a different name loads the same weights
    bn.load_adapter_state_dict(fresh, "renamed", state)
    assert_close(run(fresh, inputs), expected)


@grid
@models
def test_mixed_batch_rows_equal_single_runs(arch, task, method):
    model = build(arch, task, method)
    bn.inject(model, bn.Config.from_options({"method": method, "reduction_factor": 8}), "b")
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    inputs = tiny_inputs(batch=4)
    rows = ["a", None, "b", "a"]
    bn.set_active(model, rows)
    mixed = run(model, inputs)
    for i, name in enumerate(rows):
        bn.set_active(model, name)
        alone = run(model, {k: v[i : i + 1] for k, v in inputs.items()})
        assert_close([t[i : i + 1] for t in mixed], alone, atol=1e-5)


@grid
@models
def test_remove(arch, task, method):
    inputs = tiny_inputs()
    original = frozen(arch, task)
    base, base_keys = run(original, inputs), set(original.state_dict())
    model = build(arch, task, method, name="a")
    bn.inject(model, bn.Config(method="houlsby", bottleneck_size=4), "b")
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    bn.set_active(model, "b")
    with_b = run(model, inputs)
    bn.remove(model, "a")
    assert not adapters(model, "a")
    assert_close(run(model, inputs), with_b)  # the other adapter is untouched
    with pytest.raises(PeftkitError, match="unknown"):
        bn.set_active(model, "a")
    bn.remove(model, "b")
    assert not any(isinstance(m, BottleneckWrapper) for m in model.modules())
    assert set(model.state_dict()) == base_keys  # fully unwrapped
    assert_close(run(model, inputs), base, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_formula(method):
    """Check each method's math at one insertion point, including the scaling and BERT's
    parallel adapter that reads `intermediate`'s input."""
    for arch in ("bert", "llama"):
        model = build(arch, "cls" if arch == "bert" else "lm", method, non_linearity="tanh",
                      **({"scaling": 2.5} if method == "parallel" else {}))
        perturb(model)
        torch.manual_seed(0)
        x = torch.randn(2, 5, model.config.hidden_size)
        layer = model.bert.encoder.layer[0] if arch == "bert" else model.model.layers[0]
        with torch.no_grad():
            if method == "parallel" and arch == "bert":
                h = layer.intermediate(x)  # its pre-hook hands x to the output.dense wrapper
                wrapper, got = layer.output.dense, layer.output.dense(h)
                want = wrapper.base_layer(h) + _manual(wrapper.adapters["a"], x) * 2.5
            elif method == "parallel":
                wrapper, got = layer.mlp, layer.mlp(x)
                want = wrapper.base_layer(x) + _manual(wrapper.adapters["a"], x) * 2.5
            else:
                wrapper = layer.output.dense if arch == "bert" else layer.mlp
                inp = torch.randn(2, 5, model.config.intermediate_size) if arch == "bert" else x
                got = wrapper(inp)
                h = wrapper.base_layer(inp)
                want = h + _manual(wrapper.adapters["a"], h)
        torch.testing.assert_close(got, want)


def _manual(adapter: Bottleneck, x):
    return torch.tanh(x @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias


def test_insertion_points():
    names = lambda m: sorted(n for n, mod in m.named_modules() if isinstance(mod, BottleneckWrapper))
    assert names(build("bert", "cls", "houlsby")) == sorted(
        f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.output.dense", "output.dense"))
    assert names(build("gpt2", "lm", "houlsby")) == sorted(
        f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn.c_proj", "mlp"))
    assert names(build("llama", "lm", "pfeiffer")) == [f"model.layers.{i}.mlp" for i in range(2)]
    assert names(build("bert", "cls", "parallel")) == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    custom = build("llama", "lm", "houlsby", target_modules=[r"self_attn\.v_proj$"])
    assert names(custom) == [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]


@pytest.mark.parametrize("arch,method", [("llama", "houlsby"), ("gpt2", "parallel")])
def test_generate_with_mixed_batch_and_beams(arch, method):
    model = build(arch, "lm", method)
    perturb(model)
    ids = tiny_inputs(batch=2)["input_ids"]
    args = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    bn.set_active(model, ["a", None])  # generate repeats rows per beam; the adapters follow
    mixed = model.generate(ids, attention_mask=torch.ones_like(ids), **args)
    for i, name in enumerate(["a", None]):
        bn.set_active(model, name)
        alone = model.generate(ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), **args)
        assert torch.equal(mixed[i : i + 1], alone)


@pytest.mark.parametrize("arch,task,method", [("bert", "cls", "parallel"), ("llama", "lm", "houlsby")])
def test_gradient_checkpointing(arch, task, method):
    grads = []
    for checkpointing in (False, True):
        model = build(arch, task, method)
        perturb(model)
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0  # train mode (checkpointing needs it) without randomness
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss_of(model, tiny_inputs()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert_close(grads[0], grads[1], atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads[1])


def test_options_round_trip():
    for options in ({"method": "pfeiffer", "reduction_factor": 8, "non_linearity": "gelu", "dropout": 0.1,
                     "target_modules": ["output\\.dense$"]},
                    {"method": "parallel", "bottleneck_size": 16, "scaling": 2.0}):
        config = bn.Config.from_options(options)
        again = bn.Config.from_options(json.loads(json.dumps(config.to_options())))
        assert again == config
    assert bn.Config().bottleneck_dim(768) == 48  # default reduction factor 16


@pytest.mark.parametrize("options,match", [
    ({"bottlenek_size": 8}, r"unknown bottleneck option 'bottlenek_size'; did you mean bottleneck_size\? "
                            "bottleneck accepts: method, bottleneck_size"),
    ({"bottleneck_size": 8, "reduction_factor": 4}, "not both"),
    ({"bottleneck_size": 0}, "bottleneck_size must be >= 1, got 0"),
    ({"reduction_factor": -2}, "reduction_factor must be >= 1, got -2"),
    ({"bottleneck_size": "8"}, "bottleneck_size must be an integer"),
    ({"reduction_factor": True}, "reduction_factor must be an integer"),
    ({"non_linearity": "swish"}, "relu, gelu, silu, tanh"),
    ({"method": "lora"}, "houlsby, pfeiffer, parallel"),
    ({"dropout": 1.5}, r"dropout must be a number in \[0, 1\)"),
    ({"scaling": "big", "method": "parallel"}, "scaling must be a number"),
    ({"scaling": 2.0}, "only applies to method 'parallel'"),
    ({"method": "parallel", "target_modules": ["mlp"]},
     "only applies to methods 'houlsby', 'pfeiffer' and 'compacter'"),
    ({"target_modules": []}, "non-empty list"),
    ({"target_modules": ["(("]}, "not a valid regex"),
    ([("method", "houlsby")], "must be a dict"),
])
def test_bad_options(options, match):
    with pytest.raises(PeftkitError, match=match):
        bn.Config.from_options(options)


def test_sizes_checked_against_the_model_before_touching_it():
    with pytest.raises(PeftkitError, match=r"reduction_factor 64 .* hidden size 32; valid range is 1\.\.32"):
        bn.Config.from_options({"reduction_factor": 64}, hidden_size=32)
    for config, match in [
        (bn.Config(reduction_factor=64), "reduction_factor 64"),
        (bn.Config(), "too small for the default reduction_factor 16"),  # 32 // 16 = 2 is fine...
        (bn.Config(target_modules=["nothing_here"]), r"matched no module.*layer\.N\.attention\.output\.dense"),
        (bn.Config(target_modules=["attention"]), "submodule"),
    ]:
        model = frozen("bert", "cls")
        model.config.hidden_size = 8 if "too small" in match else 32  # ...8 // 16 = 0 is not
        before = repr(model)
        with pytest.raises(PeftkitError, match=match):
            bn.inject(model, config, "a")
        assert repr(model) == before and not adapters(model)
        assert "_peftkit_bottleneck" not in model.__dict__


def test_names_and_strict_loading():
    model = build("llama", "lm", "pfeiffer")
    with pytest.raises(PeftkitError, match="cannot add adapter 'a': the model holds a bottleneck adapter by that "
                                           "name; pick another name"):
        bn.inject(model, bn.Config(), "a")
    with pytest.raises(PeftkitError, match="without '.'"):
        bn.inject(model, bn.Config(), "x.y")
    with pytest.raises(PeftkitError, match="unknown adapter.*zzz"):
        bn.set_active(model, ["a", "zzz"])
    with pytest.raises(PeftkitError, match="unknown bottleneck adapter 'zzz'"):
        bn.adapter_state_dict(model, "zzz")

    state = bn.adapter_state_dict(model, "a")
    key = next(iter(state))
    snapshot = {k: v.clone() for k, v in bn.adapter_state_dict(model, "a").items()}
    bad = {k: torch.full_like(v, 7.0) for k, v in state.items()}
    for broken, match in [
        ({k: v for k, v in bad.items() if k != key}, f"missing keys: {key}"),
        ({**bad, "extra.weight": torch.zeros(1)}, "unexpected keys: extra.weight"),
        ({**bad, key: torch.zeros(3, 3)}, r"shape \(3, 3\), expected"),
    ]:
        with pytest.raises(PeftkitError, match=match):
            bn.load_adapter_state_dict(model, "a", broken)
        assert_close(list(bn.adapter_state_dict(model, "a").values()), list(snapshot.values()), atol=0)


def test_bf16_backbone_keeps_fp32_adapters():
    model = frozen("llama", "lm").to(torch.bfloat16)
    bn.inject(model, bn.Config(method="parallel", bottleneck_size=B), "a")
    perturb(model)
    out = model(**tiny_inputs()).logits
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    for adapter in adapters(model):
        assert adapter.up.weight.dtype == adapter.up.weight.grad.dtype == torch.float32


def test_4bit_llama_backbone(tmp_path):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    make_tiny("llama", "lm").save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant)
    # Train mode: on CPU, bitsandbytes repacks 4-bit weights for inference on an eval-mode
    # no-grad forward, and backward through the repacked layers is silently wrong afterwards.
    model.requires_grad_(False).train()
    # Reference: the same network with the dequantized weights in plain fp32 Linear layers.
    ref = frozen("llama", "lm").train()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                ref.get_submodule(name).weight.copy_(w)

    inputs = tiny_inputs()
    base = run(model, inputs)
    grads = []
    for m in (model, ref):
        bn.inject(m, bn.Config(method="houlsby", bottleneck_size=B), "a")
        if m is model:
            assert_close(run(model, inputs), base, atol=0)  # identity at init on the 4-bit base too
        perturb(m)
        loss_of(m, inputs).backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    assert type(model.model.layers[0].self_attn.o_proj.base_layer).__name__ == "Linear4bit"
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0])
    assert_close(grads[0], grads[1], atol=1e-5)  # grads flow through the 4-bit layers correctly
