"""Compacter (Karimi Mahabadi et al. 2021): PHM projections, rule matrices shared by every layer of
an adapter, on tiny BERT, Llama and GPT-2 models."""
import json

import pytest
import torch
from conftest import BERT, GPT2, LLAMA, logits, make_tiny, randomized, tiny_inputs
from safetensors import safe_open

import peftkit
from peftkit import AdapterBank, PeftkitError
from peftkit.bench.params import param_table
from peftkit.tuners import bottleneck as bn
from peftkit.tuners.bottleneck.layer import BottleneckWrapper
from peftkit.tuners.bottleneck.phm import Compacter, PHMLinear

WIDTH = {"bert": BERT["hidden_size"], "llama": LLAMA["hidden_size"], "gpt2": GPT2["n_embd"]}
LAYERS = 2
HEAD = {"bert": BERT["hidden_size"] * 2 + 2}  # bench params counts encoders as 2-label classifiers


def compacters(model, name="default"):
    return [m.adapters[name] for m in model.modules() if isinstance(m, BottleneckWrapper) and name in m.adapters]


def kron_weight(layer: PHMLinear, rule):
    """sum_i A_i ⊗ (s_i t_i^T), as the paper writes it: (in x out), applied as x @ W."""
    return sum(torch.kron(rule[i], layer.s[i] @ layer.t[i]) for i in range(rule.shape[0]))


def expected_count(width, size, sites, n=4, rank=1):
    """Per site: down s (in/n x rank) and t (rank x size/n) per rule, + size bias; up the same the
    other way, + width bias. Once per adapter: the n rules of n x n."""
    down = n * (width // n * rank + rank * size // n) + size
    up = n * (size // n * rank + rank * width // n) + width
    return sites * (down + up) + n ** 3


def test_a_phm_layer_is_the_kronecker_sum_computed_by_hand():
    torch.manual_seed(0)
    layer, rule = PHMLinear(8, 12, phm_dim=4, phm_rank=2), torch.randn(4, 4, 4)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 5, 8)
    by_hand = x @ kron_weight(layer, rule) + layer.bias
    torch.testing.assert_close(layer(x, rule), by_hand, rtol=0, atol=1e-5)

    adapter = Compacter(8, 8, 4, torch.nn.Parameter(rule), phm_rank=2, non_linearity="tanh")
    randomized(adapter)
    hidden = torch.tanh(x @ kron_weight(adapter.down, adapter.phm_rule) + adapter.down.bias)
    torch.testing.assert_close(adapter(x), hidden @ kron_weight(adapter.up, adapter.phm_rule) + adapter.up.bias,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,task", [("bert", "cls"), ("llama", "lm"), ("gpt2", "lm")])
def test_step_zero_is_the_base_model_and_the_up_projection_starts_at_zero(arch, task):
    model = peftkit.attach(make_tiny(arch, task), "compacter")
    assert all(torch.count_nonzero(a.up.t) == 0 and torch.count_nonzero(a.up.s) > 0 for a in compacters(model))
    torch.testing.assert_close(logits(model), logits(make_tiny(arch, task)), rtol=0, atol=0)


def test_the_rules_are_one_tensor_with_a_gradient_from_every_layer():
    model = randomized(peftkit.attach(make_tiny("bert", "cls"), "compacter"))
    adapters = compacters(model)
    rule = adapters[0].phm_rule
    assert len(adapters) == 2 * LAYERS and all(a.phm_rule is rule for a in adapters)
    assert [n for n, _ in model.named_parameters() if n.endswith("phm_rule")] == \
        ["bert.encoder.layer.0.attention.output.dense.adapters.default.phm_rule"]
    inputs = tiny_inputs()
    tied = model(**inputs).logits
    tied.pow(2).sum().backward()

    for a in adapters:  # the same values, untied: one copy per layer
        a.phm_rule = torch.nn.Parameter(rule.detach().clone())
    untied = model(**inputs).logits
    torch.testing.assert_close(untied, tied, rtol=0, atol=0)
    untied.pow(2).sum().backward()
    per_layer = [a.phm_rule.grad for a in adapters]
    assert all(g.abs().sum() > 0 for g in per_layer)
    torch.testing.assert_close(rule.grad, sum(per_layer), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch,task,head", [("bert", "cls", "classifier."), ("llama", "lm", None)])
def test_only_the_adapter_and_the_head_train(arch, task, head):
    model = peftkit.attach(make_tiny(arch, task), "compacter")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n or head and n.startswith(head) for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # the first step moves up.t off zero; then every adapter tensor has a gradient
        model(**tiny_inputs()).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    adapter = {k for k in before if ".adapters.default." in k}
    assert adapter <= changed  # every adapter tensor moved, the shared rule under each site's key too
    assert all(k in adapter or head and k.startswith(head) for k in changed)


def test_save_and_load_are_bit_identical_with_the_rules_saved_once(tmp_path):
    model = randomized(peftkit.attach(make_tiny("llama", "lm"), "compacter", name="mine"))
    folder = peftkit.save_adapter(model, tmp_path / "c", name="mine")
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert [k for k in keys if "phm_rule" in k] == ["phm_rule"]
    assert not any("mine" in k for k in keys)
    assert len(keys) == 1 + 2 * LAYERS * 6  # the rules, then s, t and bias of down and up per site

    loaded = peftkit.load_adapter(make_tiny("llama", "lm"), folder)
    ours, theirs = bn.adapter_state_dict(model, "mine"), bn.adapter_state_dict(loaded, "mine")
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert len({id(a.phm_rule) for a in compacters(loaded, "mine")}) == 1  # still shared after loading
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("arch,task", [("bert", "cls"), ("llama", "lm"), ("gpt2", "lm")])
@pytest.mark.parametrize("preset,sites_per_layer", [("compacter", 2), ("compacter-pp", 1)])
def test_exact_count_by_hand_in_param_report_and_bench_params(arch, task, preset, sites_per_layer, tmp_path):
    width = WIDTH[arch]
    size = 4  # width // 32 rounded down to a multiple of phm_dim 4, and at least 4
    expected = expected_count(width, size, LAYERS * sites_per_layer)
    model = peftkit.attach(make_tiny(arch, task), preset)
    assert {a.down.out_features for a in compacters(model)} == {size}
    head = width * 3 + 3 if task == "cls" else 0  # conftest's classifiers have 3 labels
    assert peftkit.param_report(model)["trainable"] == expected + head

    config = tmp_path / f"{arch}.json"
    config.write_text(json.dumps({"model_type": arch, **{"bert": BERT, "llama": LLAMA, "gpt2": GPT2}[arch]}))
    (row,) = param_table(config, [preset])
    assert row["trainable"] == expected + HEAD.get(arch, 0)

    options = {"method": "compacter", "bottleneck_size": 8, "phm_dim": 2, "phm_rank": 3}
    model = peftkit.attach(make_tiny(arch, task), options)
    assert peftkit.param_report(model)["trainable"] == expected_count(width, 8, LAYERS * 2, n=2, rank=3) + head


@pytest.mark.parametrize("options, problem", [
    ({"phm_dim": 3}, "compacter phm_dim 3 does not divide the width 32 of bert.encoder.layer.0.attention.output.dense; "
                     "phm_dim values that divide every adapted width here: 1, 2, 4, 8, 16, 32$"),
    ({"bottleneck_size": 6}, "bottleneck_size 6 is not a multiple of phm_dim 4"),
    ({"phm_rank": 0}, "phm_rank must be an integer >= 1, got 0"),
    ({"phm_dim": 2.5}, "phm_dim must be an integer >= 1, got 2.5"),
    ({"phm_rnk": 2}, r"unknown bottleneck option 'phm_rnk'; did you mean phm_rank\? bottleneck accepts: "
                     ".*phm_dim, phm_rank, placement"),
    ({"placement": "middle"}, "placement 'middle' is not one of houlsby, pfeiffer"),
    ({"placement": "pfeiffer", "target_modules": ["output"]}, "either placement or target_modules, not both"),
    ({"scaling": 2.0}, "only applies to method 'parallel', not 'compacter'"),
])
def test_bad_options_are_refused_in_one_line_before_the_model_changes(options, problem):
    model = make_tiny("bert", "cls")
    before = repr(model)
    with pytest.raises(PeftkitError, match=problem) as err:
        peftkit.attach(model, {"method": "compacter", **options})
    assert "\n" not in str(err.value)
    assert repr(model) == before and not hasattr(model, "peftkit_adapters")
    assert all(p.requires_grad for p in model.parameters()), "refused, yet the model was frozen"


def test_compacter_options_are_refused_for_the_other_bottleneck_methods():
    with pytest.raises(PeftkitError, match="option 'phm_dim' only applies to method 'compacter', not 'houlsby'"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "houlsby", "phm_dim": 4})


def test_options_round_trip_and_the_defaults_are_adapterhubs():
    config = bn.Config.from_options({"method": "compacter"})
    assert (config.non_linearity, config.phm_dim, config.phm_rank, config.placement) == ("gelu", 4, 1, None)
    assert config.bottleneck_dim(768) == 24  # reduction factor 32
    assert bn.Config.from_options({"method": "compacter"}).bottleneck_dim(576) == 16  # 18, down to 4's multiple
    assert bn.Config().non_linearity == "relu" and bn.Config().bottleneck_dim(768) == 48  # the others unchanged
    for options in ({"method": "compacter"}, {"method": "compacter", "placement": "pfeiffer", "phm_dim": 2,
                                              "phm_rank": 3, "bottleneck_size": 8, "dropout": 0.1}):
        config = bn.Config.from_options(options)
        assert bn.Config.from_options(json.loads(json.dumps(config.to_options()))) == config
    assert "phm_dim" not in bn.Config.from_options({"method": "houlsby"}).to_options()


def test_two_compacters_on_one_model_have_their_own_rules_and_remove_leaves_no_trace():
    original = make_tiny("bert", "cls")
    base_keys, base_out = set(original.state_dict()), logits(original)
    model = peftkit.attach(make_tiny("bert", "cls"), "compacter", name="a")
    peftkit.attach(model, "compacter-pp", name="b")
    model.classifier.requires_grad_(False)  # randomize the adapters only
    randomized(model)
    rule_a, rule_b = compacters(model, "a")[0].phm_rule, compacters(model, "b")[0].phm_rule
    assert rule_a is not rule_b and not torch.equal(rule_a, rule_b)
    assert "phm_rule" in bn.adapter_state_dict(model, "a") and "phm_rule" in bn.adapter_state_dict(model, "b")
    bn.remove(model, "a")
    bn.remove(model, "b")
    assert not any(isinstance(m, (BottleneckWrapper, Compacter)) for m in model.modules())
    assert set(model.state_dict()) == base_keys and "_peftkit_bottleneck" not in model.__dict__
    torch.testing.assert_close(logits(model), base_out, rtol=0, atol=0)


def test_the_bank_serves_compacters_mixed_per_row_as_each_alone(tmp_path):
    folders = {}
    for i, spec in enumerate(["compacter", "compacter-pp", "houlsby"]):
        model = randomized(peftkit.attach(make_tiny("llama", "lm"), spec), seed=i)
        folders[spec] = peftkit.save_adapter(model, tmp_path / spec)
    bank = AdapterBank(make_tiny("llama", "lm"))
    for name, folder in folders.items():
        bank.load(name, folder)
    rows = ["compacter", None, "compacter-pp", "houlsby"]
    inputs = tiny_inputs(batch=len(rows))
    mixed = bank.forward(rows, **inputs).logits
    for i, name in enumerate(rows):
        alone = make_tiny("llama", "lm") if name is None else peftkit.load_adapter(make_tiny("llama", "lm"),
                                                                                   folders[name])
        torch.testing.assert_close(mixed[i], logits(alone, inputs)[i], rtol=0, atol=1e-5)
