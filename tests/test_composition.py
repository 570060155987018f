"""Composition blocks (Stack, Parallel, Average) on tiny BERT and Llama models: each block's output
against a hand computation from the adapters' own modules, bank rows against rows run alone, and
every refusal."""
import pytest
import torch
from conftest import make_tiny, tiny_inputs

import peftkit
from peftkit import AdapterBank, Average, Parallel, PeftkitError, Stack
from peftkit.composition import Fuse
from peftkit.tuners import bottleneck as bn
from peftkit.tuners.bottleneck.layer import BottleneckWrapper

MODELS = [("bert", "cls"), ("llama", "lm")]
models = pytest.mark.parametrize("arch,task", MODELS)


def perturb(model, name, seed):
    """Move adapter `name` away from its identity init so that it changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BottleneckWrapper) and name in m.adapters:
                for p in m.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def holding(arch, task, methods=("pfeiffer", "pfeiffer"), names=("a", "b")):
    """A tiny model holding one perturbed bottleneck adapter per name."""
    model = make_tiny(arch, task)
    for seed, (name, method) in enumerate(zip(names, methods)):
        model = peftkit.attach(model, {"method": method, "bottleneck_size": 8}, name=name)
        perturb(model, name, seed)
    return model.eval()


def out(model, inputs):
    with torch.no_grad():
        result = model(**inputs)
    return result.logits


def by_hand(model, inputs, site_output):
    """The model with the adapters off and every site's output replaced by site_output(adapters, h, x),
    where x is the feed-forward input that parallel adapters read."""
    inputs_seen, handles = {}, []
    wrappers = [m for m in model.modules() if isinstance(m, BottleneckWrapper)]
    for w in wrappers:
        if w.source is not None:
            handles.append(w.source[0].register_forward_pre_hook(
                lambda mod, args, key=id(w): inputs_seen.__setitem__(key, args[0])))
        handles.append(w.register_forward_hook(
            lambda mod, args, h, key=id(w): site_output(mod.adapters, h, inputs_seen.pop(key, args[0]))))
    bn.set_active(model, None)
    try:
        return out(model, inputs)
    finally:
        for handle in handles:
            handle.remove()


def d(adapters, name, h, x):
    """Adapter `name`'s addition at a site, computed by its own module."""
    adapter = adapters[name]
    return adapter(x if adapter.parallel else h)


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


@models
def test_stack_feeds_each_adapters_output_to_the_next(arch, task):
    model, inputs = holding(arch, task), tiny_inputs()

    def stacked(adapters, h, x):
        h1 = h + d(adapters, "a", h, x)
        return h1 + d(adapters, "b", h1, x)
    expected = by_hand(model, inputs, stacked)
    peftkit.activate(model, Stack("a", "b"))
    close(out(model, inputs), expected)
    peftkit.activate(model, Stack("b", "a"))  # the order matters: a stack is not a sum
    assert not torch.allclose(out(model, inputs), expected, atol=1e-4)


@models
def test_stack_over_adapters_at_different_sites_runs_each_where_it_sits(arch, task):
    """A Houlsby adapter (attention and feed-forward) under a Pfeiffer one (feed-forward only), and a
    parallel adapter (reading the feed-forward input) stacked under a Pfeiffer one."""
    for methods in (("houlsby", "pfeiffer"), ("parallel", "pfeiffer")):
        model, inputs = holding(arch, task, methods), tiny_inputs()

        def stacked(adapters, h, x):
            h1 = h + d(adapters, "a", h, x) if "a" in adapters else h
            return h1 + d(adapters, "b", h1, x) if "b" in adapters else h1
        expected = by_hand(model, inputs, stacked)
        peftkit.activate(model, Stack("a", "b"))
        close(out(model, inputs), expected)


@models
def test_average_adds_the_weighted_sum_of_the_adapters_additions(arch, task):
    model, inputs = holding(arch, task), tiny_inputs()
    expected = by_hand(model, inputs, lambda ads, h, x: h + 0.75 * d(ads, "a", h, x) + 0.25 * d(ads, "b", h, x))
    peftkit.activate(model, Average("a", "b", weights=[3, 1]))  # scaled to 0.75, 0.25
    close(out(model, inputs), expected)
    uniform = by_hand(model, inputs, lambda ads, h, x: h + 0.5 * d(ads, "a", h, x) + 0.5 * d(ads, "b", h, x))
    peftkit.activate(model, Average("a", "b"))
    close(out(model, inputs), uniform)


@models
def test_parallel_returns_the_batch_once_per_adapter(arch, task):
    model, inputs = holding(arch, task), tiny_inputs(batch=3)
    alone = []
    for name in ("a", "b"):
        peftkit.activate(model, name)
        alone.append(out(model, inputs))
    peftkit.activate(model, Parallel("a", "b"))
    both = out(model, inputs)
    assert both.shape[0] == 6
    close(both[:3], alone[0])
    close(both[3:], alone[1])
    peftkit.activate(model, "a")  # the batch is no longer repeated
    close(out(model, inputs), alone[0], atol=0)


def test_parallel_trains_each_adapter_on_its_copy():
    model, inputs = holding("bert", "cls"), tiny_inputs()
    peftkit.activate(model, Parallel("a", "b"))
    labels = torch.tensor([0, 1])
    loss = model(**inputs, labels=labels).loss  # labels are repeated with the batch
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert any(".adapters.a." in n for n in grads) and any(".adapters.b." in n for n in grads)


def test_activate_switches_back_to_one_adapter_and_to_none():
    model, inputs = holding("llama", "lm"), tiny_inputs()
    base = out(make_tiny("llama", "lm"), inputs)
    peftkit.activate(model, "b")
    only_b = by_hand(model, inputs, lambda ads, h, x: h + d(ads, "b", h, x))
    peftkit.activate(model, "b")
    close(out(model, inputs), only_b)
    peftkit.activate(model, None)
    close(out(model, inputs), base, atol=0)


def test_set_active_of_the_tuner_takes_blocks_and_rows_of_blocks():
    model, inputs = holding("bert", "cls"), tiny_inputs(batch=3)
    rows = ["a", Stack("a", "b"), None]
    bn.set_active(model, rows)
    mixed = out(model, inputs)
    for i, entry in enumerate(rows):
        bn.set_active(model, entry)
        close(mixed[i], out(model, {k: v[i:i + 1] for k, v in inputs.items()})[0])


# --- the bank ---

def saved(tmp_path, arch, task, spec, seed, name):
    model = peftkit.attach(make_tiny(arch, task), spec)
    if spec["method"] == "lora":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.2)
    else:
        perturb(model, "default", seed)
    return peftkit.save_adapter(model, tmp_path / name)


@models
def test_bank_rows_may_name_blocks_mixed_with_plain_rows(tmp_path, arch, task):
    bank = AdapterBank(make_tiny(arch, task))
    for seed, (name, method) in enumerate([("a", "pfeiffer"), ("b", "pfeiffer"), ("h", "houlsby")]):
        bank.load(name, saved(tmp_path, arch, task, {"method": method, "bottleneck_size": 8}, seed, name))
    rows = ["a", Stack("a", "b"), None, Average("a", "b", weights=[1, 3]), Stack("h", "b")]
    inputs = tiny_inputs(batch=len(rows))
    mixed = bank.forward(rows, **inputs).logits
    for i, entry in enumerate(rows):
        alone = bank.forward(entry, **{k: v[i:i + 1] for k, v in inputs.items()}).logits
        close(mixed[i], alone[0])
    # and a block row is what the composition gives on a model holding the same adapters
    model = peftkit.load_adapter(make_tiny(arch, task), tmp_path / "a", name="a")
    model = peftkit.load_adapter(model, tmp_path / "b", name="b")
    peftkit.activate(model, Stack("a", "b"))
    # (a classifier's row is scored by its block's last adapter's head: b's, the one loaded last here)
    close(mixed[1], out(model, {k: v[1:2] for k, v in inputs.items()})[0])


def test_bank_stacks_a_bottleneck_adapter_over_a_lora_adapter(tmp_path):
    """Stack("lora", "b"): LoRA changes the layers, the bottleneck adapter adds after them; checked
    against the LoRA merged into the base with the bottleneck adapter's weights put on it."""
    bank = AdapterBank(make_tiny("llama", "lm"))
    bank.load("lora", saved(tmp_path, "llama", "lm", {"method": "lora", "r": 4}, 0, "lora"))
    bank.load("b", saved(tmp_path, "llama", "lm", {"method": "pfeiffer", "bottleneck_size": 8}, 1, "b"))
    rows = [Stack("lora", "b"), "lora", "b"]
    inputs = tiny_inputs(batch=3)
    mixed = bank.forward(rows, **inputs).logits
    merged = peftkit.merge(peftkit.load_adapter(make_tiny("llama", "lm"), tmp_path / "lora"))
    record = peftkit.saving.read_adapter_config(tmp_path / "b")["peftkit"]
    bn.inject(merged, bn.Config.from_options({"method": "pfeiffer", **record["options"]}), "b")
    bn.load_adapter_state_dict(merged, "b", peftkit.saving.read_weights(tmp_path / "b" / "adapter_model.safetensors"))
    close(mixed[0], out(merged.eval(), {k: v[:1] for k, v in inputs.items()})[0], atol=1e-4)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3) and not torch.allclose(mixed[0], mixed[2], atol=1e-3)


# --- refusals: one line each, before anything changes ---

@pytest.mark.parametrize("make,match", [
    (lambda: Stack("a"), r"Stack needs at least 2 adapters, got 1"),
    (lambda: Average(), r"Average needs at least 2 adapters, got 0"),
    (lambda: Stack("a", Parallel("b", "c")), r"nested blocks are not supported"),
    (lambda: Stack(["a", "b"]), r"give Stack the adapter names as arguments"),
    (lambda: Parallel("a", 3), r"Parallel takes adapter names \(non-empty strings\), got 3"),
    (lambda: Stack("a", "a"), r"Stack names 'a' more than once"),
    (lambda: Average("a", "b", weights=[1, "x"]), r"Average weights must be a list of numbers"),
    (lambda: Average("a", "b", weights=[True, 1]), r"Average weights must be a list of numbers"),
    (lambda: Average("a", "b", weights=[1]), r"Average got 1 weights for 2 adapters"),
    (lambda: Average("a", "b", weights=[1, -1]), r"sum to 0"),
])
def test_bad_blocks_are_refused(make, match):
    with pytest.raises(PeftkitError, match=match):
        make()


def refused(model, what, match):
    inputs = tiny_inputs()
    before = out(model, inputs)
    with pytest.raises(PeftkitError, match=match):
        peftkit.activate(model, what)
    close(out(model, inputs), before, atol=0)


def test_activate_refuses_unknown_names_other_methods_bases_and_tasks():
    model = holding("bert", "cls")
    peftkit.activate(model, "a")
    refused(model, Stack("a", "zz"), r"Stack\('a', 'zz'\): unknown adapter\(s\) zz; .*held: a, b")
    refused(model, "zz", r"activate takes an adapter's name.*the model holds a, b")
    other = dict(model.peftkit_adapters)
    model.peftkit_adapters = {**other, "b": peftkit.anatomy.AdapterInfo(
        "pfeiffer", {}, "other-base", peftkit.anatomy.base_fingerprint(make_tiny("bert", "cls", seed=1)),
        other["b"].task)}
    refused(model, Stack("a", "b"), r"'b' was trained on 'other-base', another base than 'a'")
    model.peftkit_adapters = {**other, "b": peftkit.anatomy.AdapterInfo(
        "pfeiffer", {}, other["b"].base_name, other["b"].base_fingerprint, {"class": "BertForQuestionAnswering"})}
    refused(model, Average("a", "b"), r"'a' is for a BertForSequenceClassification but 'b' for a "
                                      "BertForQuestionAnswering; compose adapters of one task")
    model.peftkit_adapters = other
    prefixed = peftkit.attach(model, {"method": "prefix", "num_virtual_tokens": 2}, name="p")
    refused(prefixed, Stack("a", "p"), r"'p' is prefix; blocks compose bottleneck adapters")


def test_average_over_adapters_at_different_sites_is_refused():
    model = holding("llama", "lm", ("houlsby", "pfeiffer"))
    refused(model, Average("a", "b"), r"Average\('a', 'b'.*'a' sits at 4 sites .* 'b' at 2 .*Average needs "
                                      r"adapters at the same sites \(Stack takes any\)")


def test_the_tuner_refuses_parallel_in_a_row_and_unsupported_blocks():
    model = holding("bert", "cls")
    with pytest.raises(PeftkitError, match="a batch row cannot run Parallel"):
        bn.set_active(model, [Parallel("a", "b"), "a"])
    with pytest.raises(PeftkitError, match=r"unknown adapter\(s\) zz"):
        bn.set_active(model, ["a", Stack("a", "zz")])
    with pytest.raises(PeftkitError, match=r"no fusion over 'a', 'b'; add one with peftkit.fuse"):
        bn.set_active(model, Fuse("a", "b"))


def test_the_bank_refuses_rows_it_cannot_compose(tmp_path):
    bank = AdapterBank(make_tiny("llama", "lm"))
    bank.load("lora", saved(tmp_path, "llama", "lm", {"method": "lora", "r": 4}, 0, "lora"))
    bank.load("lora2", saved(tmp_path, "llama", "lm", {"method": "lora", "r": 4}, 2, "lora2"))
    bank.load("b", saved(tmp_path, "llama", "lm", {"method": "pfeiffer", "bottleneck_size": 8}, 1, "b"))
    bank.load("p", saved(tmp_path, "llama", "lm", {"method": "prefix", "num_virtual_tokens": 2}, 1, "p"))
    inputs = tiny_inputs()
    for rows, match in [
        ([Parallel("b", "lora"), None], r"a bank row can run Stack or Average, not Parallel.*give the rows one adapter each"),
        ([Stack("b", "lora"), None], r"LoRA adapters \(lora\) compose only first in a Stack"),
        ([Stack("lora", "lora2"), None], r"LoRA adapters \(lora, lora2\) compose only first in a Stack"),
        ([Average("lora", "b"), None], r"LoRA adapters \(lora\) compose only first in a Stack"),
        ([Stack("b", "p"), None], r"'p' is prefix; a bank row composes bottleneck adapters \(houlsby, pfeiffer, parallel, compacter\)"),
        ([Stack("b", "zz"), None], r"unknown adapter\(s\) zz"),
    ]:
        with pytest.raises(PeftkitError, match=match):
            bank.forward(rows, **inputs)
    close(bank.forward([Stack("lora", "b"), None], **inputs).logits[1],
          bank.forward(None, **inputs).logits[1], atol=0)  # the refusals left no selection behind
