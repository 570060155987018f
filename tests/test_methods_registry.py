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
    """The method at its defaults, with LoRA's B matrix random so the adapter changes outputs."""
    return {"method": name, "init_lora_weights": False} if name == "lora" else {"method": name}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", list(METHODS))
def test_every_tuner_module_has_the_contract(name):
    about = METHODS[name]
    wanted = CONTRACT + (() if about.peft_native else OWN_CONTRACT)
    assert [f for f in wanted if not callable(getattr(about.tuner, f, None))] == []


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("arch,task", [("bert", "cls"), ("llama", "lm")])
def test_every_registered_method_attaches_trains_saves_and_loads(tmp_path, name, arch, task):
    model = peftkit.attach(make_tiny(arch, task), spec_of(name))
    base = dict(make_tiny(arch, task).named_parameters())
    inputs = tiny_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    logits_now = model(**inputs).logits
    logits_now.float().pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "one step changed nothing"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not any(k in frozen for k in changed), "a frozen weight moved"
    expected = logits(model, inputs)
    assert not torch.allclose(expected, logits(make_tiny(arch, task), inputs)), "the adapter does nothing"

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


def test_a_method_declared_without_quantized_bases_refuses_one(monkeypatch, tmp_path):
    make_tiny("llama", "cls").save_pretrained(tmp_path / "base")
    model = peftkit.load_model(tmp_path / "base", task="classification", quantize="nf4")
    declare(monkeypatch, "pfeiffer", quantized_base=False)
    with pytest.raises(PeftkitError, match="the Pfeiffer adapter does not work on a 4/8-bit base"):
        peftkit.attach(model, "pfeiffer")
    assert not hasattr(model, "peftkit_adapters")


def test_a_method_declared_without_mixed_rows_is_refused_in_a_mixed_batch(monkeypatch, tmp_path):
    bank = AdapterBank(make_tiny("llama", "lm"))
    for name in ("houlsby", "prefix"):
        model = peftkit.attach(make_tiny("llama", "lm"), name)
        bank.load(name, peftkit.save_adapter(model, tmp_path / name))
    inputs = tiny_inputs(batch=2)
    alone = bank.forward("prefix", **inputs).logits
    declare(monkeypatch, "prefix", bank_rows=False)
    with pytest.raises(PeftkitError, match="adapter.s. prefix cannot share a batch with other adapters"):
        bank.forward(["houlsby", "prefix"], **inputs)
    torch.testing.assert_close(bank.forward(["prefix", "prefix"], **inputs).logits, alone, rtol=0, atol=0)


def test_an_unknown_method_names_every_registered_one():
    with pytest.raises(PeftkitError, match="unknown method 'ia3'; methods: " + ", ".join(METHODS)):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "ia3"})
