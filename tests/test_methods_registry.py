"""The method registry (peftkit.methods): every entry works end to end, and what an entry
declares it cannot do is refused with one clear error."""
import dataclasses

import pytest
import torch
from conftest import make_tiny, tiny_inputs

import peftkit
from peftkit import AdapterBank, PeftkitError
from peftkit.methods import METHODS

# What every tuner module exposes; the methods peft lacks are also injected, saved and switched by it.
CONTRACT = ("check_options", "build_config", "describe")
OWN_CONTRACT = ("inject", "adapter_state_dict", "load_adapter_state_dict", "set_active", "remove")


def spec_of(name: str) -> dict:
    """The method at its defaults, with LoRA's B matrix random so the adapter changes outputs, and a
    rank schedule (AdaLoRA) as long as a 10-step run."""
    options = {"init_lora_weights": False} if name == "lora" else {}
    return {"method": name, **METHODS[name].for_run(options, 10)}


def attached(name: str, arch: str, task: str, tmp_path):
    """A tiny model with method `name` attached at its defaults; AdapterFusion, which fuses adapters, over
    the folders of two Pfeiffer adapters trained a step each."""
    if name != "fusion":
        return peftkit.attach(make_tiny(arch, task), spec_of(name))
    folders = [str(peftkit.save_adapter(trained(peftkit.attach(make_tiny(arch, task), "pfeiffer"), tiny_inputs(seed=s)),
                                        tmp_path / f"pfeiffer-{s}")) for s in (1, 2)]
    return peftkit.attach(make_tiny(arch, task), {"method": "fusion", "adapters": folders})


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def trained(model, inputs=None):
    """`model` after one SGD step on tiny inputs, in eval mode: its adapter is no longer at its init."""
    model.train()
    model(**(inputs or tiny_inputs())).logits.float().pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    return model.eval()


@pytest.mark.parametrize("name", list(METHODS))
def test_every_tuner_module_has_the_contract(name):
    about = METHODS[name]
    wanted = CONTRACT + (() if about.peft_native else OWN_CONTRACT)
    assert [f for f in wanted if not callable(getattr(about.tuner, f, None))] == []


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("arch,task", [("bert", "cls"), ("llama", "lm")])
def test_every_registered_method_attaches_trains_saves_and_loads(tmp_path, name, arch, task):
    model = attached(name, arch, task, tmp_path)
    base = dict(make_tiny(arch, task).named_parameters())
    inputs = tiny_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained(model, inputs)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "one step changed nothing"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not any(k in frozen for k in changed), "a frozen weight moved"
    expected = logits(model, inputs)
    plain = logits(make_tiny(arch, task), inputs)
    # a causal LM under prompt learning has logits at its virtual tokens' positions too, before the input's
    assert not torch.allclose(expected[:, -plain.shape[1]:], plain), "the adapter does nothing"

    peftkit.save_adapter(model, tmp_path / name)
    loaded = peftkit.load_adapter(make_tiny(arch, task), tmp_path / name)
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=1e-6)
    assert peftkit.param_report(loaded)["total"] >= sum(p.numel() for p in base.values())


def declare(monkeypatch, name: str, **capabilities):
    """Pretend the registry declares `name` without these capabilities."""
    monkeypatch.setitem(METHODS, name, dataclasses.replace(METHODS[name], **capabilities))


def test_a_method_declared_not_mergeable_is_refused_by_merge(monkeypatch):
    model = peftkit.attach(make_tiny("bert", "cls"), spec_of("lora"))
    declare(monkeypatch, "lora", mergeable=False, why_not_mergeable="declared so by this test")
    with pytest.raises(PeftkitError, match="lora, which merge.. cannot fold into the base: declared so by this test"):
        peftkit.merge(model)


def test_a_method_declared_without_checkpointing_refuses_it(monkeypatch):
    declare(monkeypatch, "houlsby", gradient_checkpointing=False, why_no_checkpointing="declared so by this test")
    model = make_tiny("llama", "lm")
    with pytest.raises(PeftkitError, match="the Houlsby adapter does not work with gradient checkpointing "
                                           r"\(declared so by this test\)"):
        peftkit.attach(model, "houlsby", gradient_checkpointing=True)
    assert not hasattr(model, "peftkit_adapters")
    assert not any(p.requires_grad is False for p in model.parameters()), "refused, yet the model was frozen"


def test_a_method_declared_without_quantized_bases_refuses_one(tmp_path):
    make_tiny("llama", "cls").save_pretrained(tmp_path / "base")
    model = peftkit.load_model(tmp_path / "base", task="classification", quantize="nf4")
    unable = [m for m in METHODS.values() if not m.quantized_base]
    assert unable, "every method declares 4/8-bit bases; this test needs one that does not"
    with pytest.raises(PeftkitError, match=f"{unable[0].long_name} does not work on a 4/8-bit base"):
        peftkit.attach(model, unable[0].name)
    assert not hasattr(model, "peftkit_adapters")


def test_a_method_the_bank_cannot_serve_per_row_is_refused_and_the_bank_is_unchanged(tmp_path):
    unable = [m.name for m in METHODS.values() if not m.bank_rows]
    assert unable, "the bank serves every method; this test needs one it does not"
    bank = AdapterBank(make_tiny("llama", "lm"))
    bank.load("houlsby", peftkit.save_adapter(peftkit.attach(make_tiny("llama", "lm"), "houlsby"),
                                              tmp_path / "houlsby"))
    inputs = tiny_inputs(batch=2)
    before = bank.forward(["houlsby", None], **inputs).logits
    folder = peftkit.save_adapter(peftkit.attach(make_tiny("llama", "lm"), spec_of(unable[0])), tmp_path / "x")
    with pytest.raises(PeftkitError, match=f"is {unable[0]}, which the bank cannot apply per row"):
        bank.load("x", folder)
    assert [a["name"] for a in bank.adapters()] == ["houlsby"]
    torch.testing.assert_close(bank.forward(["houlsby", None], **inputs).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("name", [m.name for m in METHODS.values() if m.peft_native])
def test_stock_peft_loads_what_peftkit_saves_for_its_methods(tmp_path, name):
    from peft import PeftModel

    model = trained(peftkit.attach(make_tiny("bert", "cls"), spec_of(name)))
    peftkit.save_adapter(model, tmp_path / name)
    stock = PeftModel.from_pretrained(make_tiny("bert", "cls"), tmp_path / name).eval()
    inputs = tiny_inputs()
    torch.testing.assert_close(logits(stock, inputs), logits(model, inputs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [m.name for m in METHODS.values() if m.mergeable])
def test_every_mergeable_method_merges_to_the_same_outputs(name):
    model = trained(peftkit.attach(make_tiny("llama", "lm"), spec_of(name)))
    inputs = tiny_inputs()
    merged = peftkit.merge(model)
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in make_tiny("llama", "lm").named_parameters()]
    torch.testing.assert_close(logits(merged, inputs), logits(model, inputs), rtol=1e-4, atol=1e-5)


def test_an_unknown_method_names_every_registered_one():
    with pytest.raises(PeftkitError, match="unknown method 'hyperlora'; methods: " + ", ".join(METHODS)):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "hyperlora"})


def test_ia3_trains_on_a_4bit_base_and_its_merge_there_is_refused_in_one_line(tmp_path):
    make_tiny("llama", "cls").save_pretrained(tmp_path / "base")
    model = trained(peftkit.attach(peftkit.load_model(tmp_path / "base", task="classification", quantize="nf4"),
                                   "ia3"))
    inputs = tiny_inputs()
    peftkit.save_adapter(model, tmp_path / "ia3")
    loaded = peftkit.load_adapter(peftkit.load_model(tmp_path / "base", task="classification", quantize="nf4"),
                                  tmp_path / "ia3")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)
    with pytest.raises(PeftkitError, match="peft cannot take ia3 off a 4/8-bit base to merge it"):
        peftkit.merge(model)
    torch.testing.assert_close(logits(model, inputs), logits(loaded, inputs), rtol=0, atol=0)  # left as it was


# peft's layer methods beyond LoRA whose 4/8-bit merge peftkit makes on a dequantized copy (IA3's: above)
QUANTIZED_MERGES = [m.name for m in METHODS.values()
                    if m.tuner_module == "peftkit.tuners.peft_layers" and m.quantized_base and m.name != "ia3"]


@pytest.mark.parametrize("name", QUANTIZED_MERGES)
def test_a_method_declared_for_quantized_bases_trains_loads_and_merges_on_a_4bit_one(tmp_path, name):
    make_tiny("llama", "cls").save_pretrained(tmp_path / "base")
    model = peftkit.attach(peftkit.load_model(tmp_path / "base", task="classification", quantize="nf4"),
                           spec_of(name))
    inputs = tiny_inputs()
    before = logits(model, inputs)
    adapter = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad and "score" not in k}
    trained(model, inputs)
    assert any(not torch.equal(v, adapter[k]) for k, v in model.named_parameters() if k in adapter), \
        "only the task head trained"
    assert not torch.allclose(logits(model, inputs), before)
    peftkit.save_adapter(model, tmp_path / name)
    loaded = peftkit.load_adapter(peftkit.load_model(tmp_path / "base", task="classification", quantize="nf4"),
                                  tmp_path / name)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)
    torch.testing.assert_close(logits(peftkit.merge(model), inputs), logits(model, inputs), rtol=0, atol=1e-4)


def test_adalora_without_total_step_is_refused_by_attach_in_one_line():
    model = make_tiny("bert", "cls")
    with pytest.raises(PeftkitError, match="adalora needs total_step, the optimizer steps its rank budget schedule "
                                           r"runs over; pass total_step=N \(peftkit train fills it in"):
        peftkit.attach(model, "adalora")
    assert not hasattr(model, "peftkit_adapters")


def test_an_unknown_option_of_a_peft_method_names_the_nearest_valid_ones():
    with pytest.raises(PeftkitError, match="unknown oft option 'oft_blocksize'; did you mean oft_block_size.*"
                                           "OFTConfig accepts: .*module_dropout"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "oft", "oft_blocksize": 16})
    with pytest.raises(PeftkitError, match="unknown ln_tuning option 'r'"):  # LN tuning has no rank
        peftkit.attach(make_tiny("bert", "cls"), {"method": "ln_tuning", "r": 8})


def test_an_unknown_option_of_peftkits_own_methods_names_the_nearest_valid_ones():
    with pytest.raises(PeftkitError, match=r"unknown LoRA option 'lora_alfa'; did you mean lora_alpha( or .*)?\? "
                                           "LoraConfig accepts: "):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "lora", "lora_alfa": 16})
    with pytest.raises(PeftkitError, match=r"unknown LoRA option 'lora_alfa' \(also unknown: 'rank', 'targets'\); "
                                           "did you mean lora_alpha"):  # every mistake named in one go
        peftkit.attach(make_tiny("bert", "cls"), {"method": "lora", "lora_alfa": 16, "rank": 4, "targets": ["q"]})
    # fields peftkit fills in itself are not options: inference_mode would leave nothing to train
    with pytest.raises(PeftkitError, match=r"unknown LoRA option 'inference_mode'"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "lora", "inference_mode": True})
    with pytest.raises(PeftkitError, match=r"unknown fusion option 'adaptors'; did you mean adapters\? fusion accepts: "
                                           "adapters$"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "fusion", "adaptors": ["a", "b"]})
    with pytest.raises(PeftkitError, match=r"unknown bottleneck option 'reduction'; did you mean reduction_factor\? "):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "pfeiffer", "reduction": 8})


def test_ranks_are_checked_as_each_method_counts_them():
    with pytest.raises(PeftkitError, match="loha rank r must be a positive integer, got 0"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "loha", "r": 0})
    with pytest.raises(PeftkitError, match=r"oft rank r must be 0 \(blocks of oft_block_size\) or a positive "
                                           "integer, got -1"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "oft", "r": -1})
    assert peftkit.attach(make_tiny("bert", "cls"), {"method": "oft", "r": 0}).peft_config["default"].r == 0


@pytest.mark.parametrize("spec, problem", [
    ({"method": "oft", "oft_block_size": 24}, "oft oft_block_size=24 does not divide the input width 32 of "
                                              r"bert\.encoder\.layer\.0\.attention\.self\.query: .*every adapted "
                                              "layer here: 1, 2, 4, 8, 16, 32$"),
    ({"method": "boft", "boft_block_size": 0, "boft_block_num": 3}, "boft boft_block_num=3 does not divide"),
    ({"method": "fourierft", "n_frequency": 2000}, "fourierft n_frequency=2000 is more than the 1024 weights of "
                                                   r"bert\.encoder\.layer\.0\.attention\.self\.query"),
])
def test_a_layer_shape_a_method_cannot_take_is_refused_before_peft_runs(spec, problem):
    model = make_tiny("bert", "cls")
    with pytest.raises(PeftkitError, match=problem):
        peftkit.attach(model, spec)
    assert not hasattr(model, "peftkit_adapters")


@pytest.mark.parametrize("name", ["oft", "boft"])
def test_oft_and_boft_refuse_gpt2_conv1d_layers(name):
    with pytest.raises(PeftkitError, match=f"{name} cannot adapt transformer.h.0.attn.c_attn, a transformers "
                                           "Conv1D"):
        peftkit.attach(make_tiny("gpt2", "lm"), name)


@pytest.mark.parametrize("arch, task, norms", [("bert", "cls", 5), ("llama", "lm", 5)])
def test_ln_tuning_trains_the_architectures_norm_layers_and_the_head_only(arch, task, norms):
    model = peftkit.attach(make_tiny(arch, task), "ln_tuning")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted = {n.split(".ln_tuning_layers.")[0] for n in trainable if ".ln_tuning_layers." in n}
    assert len(adapted) == norms  # 2 layers x 2 norms + the embeddings' (BERT) or the final one (Llama)
    assert all(".ln_tuning_layers." in n or ".classifier." in n for n in trainable)
