"""The public API with peftkit's own methods (bottleneck adapters, prefix)."""
import pytest
import torch

import peftkit
from conftest import make_tiny, tiny_inputs
from peftkit.methods import METHODS

OWN = ["houlsby", "pfeiffer", "parallel", "prefix"]
MODELS = [("bert", "cls"), ("bert", "qa"), ("llama", "lm"), ("llama", "cls"), ("gpt2", "lm")]


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if "logits" in out else torch.cat([out.start_logits, out.end_logits], -1)


def train_step(model, inputs):
    model.train()
    out = model(**inputs)
    (out.logits if "logits" in out else out.start_logits).float().pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.eval()


@pytest.mark.parametrize("method", OWN)
@pytest.mark.parametrize("arch,task", MODELS)
def test_train_save_load(tmp_path, method, arch, task):
    model = peftkit.attach(make_tiny(arch, task), method)
    heads = [n for n in ("classifier", "score", "qa_outputs") if hasattr(model, n)]
    base_names = {n for n, _ in make_tiny(arch, task).named_parameters()}
    report = peftkit.param_report(model)
    assert report["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = tiny_inputs()
    train_step(model, inputs)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed
    for key in changed:  # base weights never move; heads and the adapter do
        assert key.split(".")[0] in heads or key not in base_names, key
    expected = outputs(model, inputs)

    peftkit.save_adapter(model, tmp_path / "a")
    size = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    assert report["trainable"] * 4 <= size < report["trainable"] * 4 + 16384
    loaded = peftkit.load_adapter(make_tiny(arch, task), tmp_path / "a")
    torch.testing.assert_close(outputs(loaded, inputs), expected, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = peftkit.load_adapter(make_tiny(arch, task), tmp_path / "a", trainable=True)
    assert peftkit.param_report(trainable)["trainable"] == report["trainable"]


@pytest.mark.parametrize("method", OWN)
def test_merge_refuses_methods_that_do_not_fold(method):
    model = peftkit.attach(make_tiny("bert", "cls"), method)
    with pytest.raises(peftkit.PeftkitError, match=f"{method}, which merge.. cannot fold into the base"):
        peftkit.merge(model)


@pytest.mark.parametrize("method", ["houlsby", "prefix"])
def test_wrong_base_refused_for_own_methods(tmp_path, method):
    peftkit.save_adapter(peftkit.attach(make_tiny("llama", "cls"), method), tmp_path / "a")
    other = make_tiny("llama", "cls", seed=3)
    with pytest.raises(peftkit.PeftkitError, match="trained on"):
        peftkit.load_adapter(other, tmp_path / "a")
    assert not hasattr(other, "peftkit_adapters")
    assert [n for n, _ in other.named_modules()] == [n for n, _ in make_tiny("llama", "cls").named_modules()]


def test_head_shape_mismatch_is_refused(tmp_path):
    peftkit.save_adapter(peftkit.attach(make_tiny("bert", "cls"), "houlsby"), tmp_path / "a")
    model = make_tiny("bert", "cls")
    model.classifier = torch.nn.Linear(32, 5)
    with pytest.raises(peftkit.PeftkitError, match="head classifier.(weight|bias) has shape"):
        peftkit.load_adapter(model, tmp_path / "a")


def test_bad_options_for_own_methods():
    with pytest.raises(peftkit.PeftkitError, match="num_virtual_tokens"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "prefix", "num_virtual_tokens": 0})
    with pytest.raises(peftkit.PeftkitError, match="reduction_factor"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "houlsby", "reduction_factor": 1000})
    with pytest.raises(peftkit.PeftkitError, match="bottleneck_size"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "pfeiffer", "bottleneck_size": -1})
    with pytest.raises(peftkit.PeftkitError, match="candidates"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "houlsby", "target_modules": ["nothing_here"]})
    model = peftkit.attach(make_tiny("bert", "cls"), "houlsby")
    with pytest.raises(peftkit.PeftkitError, match="pass name="):
        peftkit.attach(model, "pfeiffer")
    peft_methods = ", ".join(sorted(m.name for m in METHODS.values() if m.peft_native))
    own_methods = ", ".join(sorted(m.name for m in METHODS.values() if not m.peft_native))
    with pytest.raises(peftkit.PeftkitError, match=rf"either peft's methods \({peft_methods}\) or peftkit's own "
                                                   rf"methods \({own_methods}\)"):
        peftkit.attach(model, "lora", name="b")
    model = peftkit.attach(model, "pfeiffer", name="b")
    assert sorted(model.peftkit_adapters) == ["b", "default"]


def test_adapter_at_init_reproduces_base():
    inputs = tiny_inputs()
    for method in ["houlsby", "pfeiffer", "parallel"]:
        base = outputs(make_tiny("llama", "lm"), inputs)
        torch.testing.assert_close(outputs(peftkit.attach(make_tiny("llama", "lm"), method), inputs), base,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "houlsby"])
def test_other_task_or_head_is_refused_untouched(tmp_path, method):
    peftkit.save_adapter(peftkit.attach(make_tiny("bert", "cls"), method), tmp_path / "a")
    qa = make_tiny("bert", "qa")
    with pytest.raises(peftkit.PeftkitError, match="with a BertForSequenceClassification but the model "
                                                    "given is .*a BertForQuestionAnswering"):
        peftkit.load_adapter(qa, tmp_path / "a")
    wider = make_tiny("bert", "cls")
    wider.classifier = torch.nn.Linear(32, 5)
    names = [n for n, _ in wider.named_modules()]
    with pytest.raises(peftkit.PeftkitError, match="head classifier.(weight|bias) has shape"):
        peftkit.load_adapter(wider, tmp_path / "a")
    assert [n for n, _ in wider.named_modules()] == names and not hasattr(wider, "peftkit_adapters")
