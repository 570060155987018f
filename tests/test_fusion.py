"""AdapterFusion on tiny BERT and Llama models: the fused output at init against a hand computation,
only the fusion layers (and the head) train, save -> load bit-identical, and every refusal."""
import pytest
import torch
from conftest import make_tiny, tiny_inputs
from test_composition import by_hand, close, d, holding, out, perturb, saved

import peftkit
from peftkit import AdapterBank, Fuse, PeftkitError, Stack
from peftkit.saving import saved_state
from peftkit.tuners.bottleneck.fusion import Fusion, regularization
from peftkit.tuners.bottleneck.layer import BottleneckWrapper

models = pytest.mark.parametrize("arch,task", [("bert", "cls"), ("llama", "lm")])


def fused(arch, task, methods=("pfeiffer", "pfeiffer")):
    return peftkit.fuse(holding(arch, task, methods), ["a", "b"]).eval()


def fusions(model):
    return [m for m in model.modules() if isinstance(m, Fusion)]


@models
def test_at_init_the_fused_output_is_h_plus_the_attention_weighted_additions(arch, task):
    model, inputs = fused(arch, task), tiny_inputs()
    layers = fusions(model)
    assert len(layers) == 2  # one per site: the feed-forward output of each of the 2 layers
    for layer in layers:  # AdapterHub's init: V the identity (1e-6 off the diagonal), Q and K N(0, 0.02)
        v = layer.value.weight
        assert torch.equal(v.diagonal(), torch.ones(v.shape[0]))
        assert torch.equal(v - torch.diag(v.diagonal()), torch.full_like(v, 1e-6).fill_diagonal_(0))
        assert layer.value.bias is None and not layer.query.bias.any() and not layer.key.bias.any()
        assert 0.015 < layer.query.weight.std() < 0.025 and 0.015 < layer.key.weight.std() < 0.025

    def site(adapters, h, x, identity):
        wrapper = next(w for w in model.modules() if isinstance(w, BottleneckWrapper) and w.adapters is adapters)
        f = wrapper.fusions["fusion"]
        ds = [d(adapters, "a", h, x), d(adapters, "b", h, x)]
        q = h @ f.query.weight.T + f.query.bias
        scores = torch.stack([((di @ f.key.weight.T + f.key.bias) * q).sum(-1) for di in ds], -1)
        p = scores.softmax(-1)
        values = ds if identity else [di @ f.value.weight.T for di in ds]
        return h + p[..., :1] * values[0] + p[..., 1:] * values[1]
    exact = by_hand(model, inputs, lambda ads, h, x: site(ads, h, x, identity=False))
    with_identity = by_hand(model, inputs, lambda ads, h, x: site(ads, h, x, identity=True))
    peftkit.activate(model, "fusion")
    fused_out = out(model, inputs)
    close(fused_out, exact)
    close(fused_out, with_identity, atol=1e-4)  # V = I but for its 1e-6 entries
    plain = by_hand(model, inputs, lambda ads, h, x: h)
    assert not torch.allclose(fused_out, plain, atol=1e-3)  # the additions really are in it


def test_a_parallel_adapter_is_fused_by_what_it_adds_from_the_feed_forward_input():
    model, inputs = fused("llama", "lm", ("parallel", "parallel")), tiny_inputs()
    with torch.no_grad():
        for layer in fusions(model):
            layer.value.weight.copy_(torch.eye(layer.value.weight.shape[0]))

    def site(adapters, h, x):
        f = next(w for w in model.modules() if isinstance(w, BottleneckWrapper) and w.adapters is adapters).fusions["fusion"]
        ds = [d(adapters, "a", h, x), d(adapters, "b", h, x)]
        p = torch.stack([(f.key(di) * f.query(h)).sum(-1) for di in ds], -1).softmax(-1)
        return h + p[..., :1] * ds[0] + p[..., 1:] * ds[1]
    expected = by_hand(model, inputs, site)
    peftkit.activate(model, "fusion")
    close(out(model, inputs), expected)


@models
def test_only_the_fusion_layers_and_the_head_train(arch, task):
    model, inputs = fused(arch, task), tiny_inputs()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fusions.fusion." in n or n.startswith("classifier.") for n in trainable)
    assert any(n.startswith("classifier.") for n in trainable) == (task == "cls")
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.train()
    loss = model(**inputs).logits.float().pow(2).mean() + regularization(model)
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    for part in ("query.weight", "key.weight", "value.weight"):
        assert any(n.endswith(f".fusions.fusion.{part}") for n in changed), part


def test_regularization_pulls_each_value_matrix_toward_the_identity():
    model = fused("bert", "cls")
    with torch.no_grad():
        for i, layer in enumerate(fusions(model)):
            layer.value.weight.add_(0.1 * (i + 1))
    expected = sum(0.01 * (torch.eye(32) - f.value.weight).pow(2).sum() for f in fusions(model))
    close(regularization(model), expected, atol=1e-6)
    model.requires_grad_(False)  # frozen value matrices are not pulled
    assert regularization(model) is None


@models
def test_save_and_load_give_the_fusion_and_its_adapters_back_bit_identical(tmp_path, arch, task):
    model, inputs = fused(arch, task), tiny_inputs()
    with torch.no_grad():  # away from init, so that a fresh fusion would differ
        for i, layer in enumerate(fusions(model)):
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    expected = out(model, inputs)
    peftkit.save_adapter(model, tmp_path / "fusion", name="fusion")
    loaded = peftkit.load_adapter(make_tiny(arch, task), tmp_path / "fusion")
    assert list(loaded.peftkit_adapters) == ["fusion"]
    close(out(loaded, inputs), expected, atol=0)
    ours, theirs = saved_state(model, "fusion"), saved_state(loaded, "fusion")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(k.startswith("adapters.a.") for k in ours) and any(k.startswith("fusion.") for k in ours)
    peftkit.save_adapter(loaded, tmp_path / "again")
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "fusion" / "adapter_model.safetensors").read_bytes()
    retrain = peftkit.load_adapter(make_tiny(arch, task), tmp_path / "fusion", trainable=True)
    assert {n for n, p in retrain.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_a_fusion_over_adapter_folders_as_a_recipe_gives_it(tmp_path):
    """attach's spec {"method": "fusion", "adapters": [folders]}: the adapters come from their folders
    (without their heads), are named after them, and the saved fusion needs none of the folders."""
    folders = [saved(tmp_path, "bert", "cls", {"method": "pfeiffer", "bottleneck_size": 8}, s, f"ad-{s}")
               for s in (0, 1)]
    model = peftkit.attach(make_tiny("bert", "cls"), {"method": "fusion", "adapters": [str(f) for f in folders]})
    assert list(model.peftkit_adapters) == ["default"]
    assert list(model.peftkit_adapters["default"].options["adapters"]) == ["ad-0", "ad-1"]
    inputs = tiny_inputs()
    single = peftkit.load_adapter(make_tiny("bert", "cls"), folders[0])
    peftkit.activate(model, "ad-0")  # the folder's adapter, as it was trained (the head is the model's own)
    torch.testing.assert_close(single.bert(**inputs).last_hidden_state, model.bert(**inputs).last_hidden_state,
                               rtol=0, atol=0)
    peftkit.activate(model, Stack("ad-0", "ad-1"))  # a fusion's adapters compose like any others
    peftkit.activate(model, "default")
    expected = out(model, inputs)
    peftkit.save_adapter(model, tmp_path / "fused")
    for folder in folders:
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    close(out(peftkit.load_adapter(make_tiny("bert", "cls"), tmp_path / "fused"), inputs), expected, atol=0)
    remove_all = peftkit.load_adapter(make_tiny("bert", "cls"), tmp_path / "fused")
    peftkit.tuners.bottleneck.fusion.remove(remove_all, "default")  # takes the adapters it brought too
    assert not any(isinstance(m, BottleneckWrapper) for m in remove_all.modules())


# --- refusals: one line each, before anything changes ---

def refused(model, adapters, match, **kwargs):
    inputs = tiny_inputs()
    before, held = out(model, inputs), list(getattr(model, "peftkit_adapters", []))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(PeftkitError, match=match):
        peftkit.fuse(model, adapters, **kwargs)
    close(out(model, inputs), before, atol=0)
    assert list(getattr(model, "peftkit_adapters", [])) == held
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_fuse_refuses_too_few_unknown_and_non_bottleneck_adapters_and_other_sites():
    model = holding("llama", "lm")
    refused(model, ["a"], r"Fuse needs at least 2 adapters, got 1")
    refused(model, ["a", "a"], r"Fuse names 'a' more than once")
    refused(model, ["a", "zz"], r"fusion: 'zz' is neither an adapter the model holds \(a, b\) nor an adapter folder")
    refused(model, ["a", "b"], r"fusion name must be a non-empty string without '.'", name="x.y")
    with_prefix = peftkit.attach(model, {"method": "prefix", "num_virtual_tokens": 2}, name="p")
    refused(with_prefix, ["a", "p"], r"fusion: 'p' is prefix; AdapterFusion fuses bottleneck adapters")
    refused(holding("llama", "lm", ("houlsby", "pfeiffer")), ["a", "b"],
            r"fusion: 'a' sits at 4 sites and 'b' at 2 .*AdapterFusion needs adapters at the same sites")
    model = peftkit.fuse(holding("bert", "cls"), ["a", "b"])
    refused(model, ["a", "b"], r"fusion 'fusion' already fuses a, b", name="again")
    refused(model, ["b", "a"], r"the model already holds an adapter named 'fusion'")
    with pytest.raises(PeftkitError, match="adapter 'a' is fused by 'fusion'; remove that fusion first"):
        peftkit.tuners.bottleneck.remove(model, "a")


def test_fuse_refuses_folders_of_another_base_or_task(tmp_path):
    spec = {"method": "pfeiffer", "bottleneck_size": 8}
    own = saved(tmp_path, "bert", "cls", spec, 0, "own")
    other_base = peftkit.save_adapter(peftkit.attach(make_tiny("bert", "cls", seed=1), spec), tmp_path / "other-base")
    other_task = saved(tmp_path, "bert", "qa", spec, 0, "other-task")
    lora = saved(tmp_path, "bert", "cls", {"method": "lora", "r": 4}, 0, "lora")
    model = make_tiny("bert", "cls")
    refused(model, [str(own), str(other_base)], r"fusion: .*other-base: this adapter was trained on .* load the "
                                                r"adapter onto the base it was trained on")
    refused(model, [str(own), str(other_task)], r"other-task was trained for a BertForQuestionAnswering but the "
                                                r"model is a BertForSequenceClassification")
    refused(model, [str(own), str(lora)], r"fusion: .*lora' is lora; AdapterFusion fuses bottleneck adapters")
    assert not hasattr(model, "peftkit_adapters")


def test_a_fuse_block_needs_its_fusion_and_is_no_bank_row():
    model = holding("bert", "cls")
    with pytest.raises(PeftkitError, match=r"no fusion over 'a', 'b'; add one with peftkit.fuse\(model, \['a', 'b'\]\)"):
        peftkit.activate(model, Fuse("a", "b"))
    model = peftkit.fuse(model, ["a", "b"])
    peftkit.activate(model, "a")
    alone_a = out(model, tiny_inputs())
    peftkit.activate(model, Fuse("a", "b"))  # the block finds the fusion over exactly these adapters
    by_block = out(model, tiny_inputs())
    peftkit.activate(model, "fusion")
    close(out(model, tiny_inputs()), by_block, atol=0)
    assert not torch.allclose(by_block, alone_a)
    bank = AdapterBank(make_tiny("llama", "lm"))
    with pytest.raises(PeftkitError, match=r"a bank row can run Stack or Average, not Fuse\('x', 'y'\) \(load a "
                                           "saved fusion's folder into the bank and name it in the row\\)"):
        bank.forward([Fuse("x", "y"), None], **tiny_inputs())


def saved_fusion(tmp_path, arch, task, adapters, seed, name):
    """A saved fusion over `adapters` of a, b, c (the same three adapters whatever is fused), its layers
    moved from their init by `seed` so that fusions differ."""
    model = peftkit.fuse(holding(arch, task, ("pfeiffer",) * 3, ("a", "b", "c")), adapters)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for layer in fusions(model) for p in layer.parameters()):
            param.add_(torch.randn(param.shape, generator=g) * 0.3)
    return peftkit.save_adapter(model, tmp_path / name, "fusion")


def alone(tmp_path, arch, task, entry, inputs):
    """A row run on its own: the adapter folder loaded onto a fresh base (None: the base alone)."""
    model = make_tiny(arch, task)
    return out((peftkit.load_adapter(model, tmp_path / entry) if entry else model).eval(), inputs)[0]


@models
def test_the_bank_serves_saved_fusions_per_row_beside_other_adapters(tmp_path, arch, task):
    """Two fusions sharing adapter a (one copy in the bank) and a plain adapter, mixed in one batch:
    each row equals that row run alone; unloading a fusion keeps what the other still fuses."""
    saved_fusion(tmp_path, arch, task, ["a", "b"], 10, "f")
    saved_fusion(tmp_path, arch, task, ["a", "c"], 11, "g")
    saved(tmp_path, arch, task, {"method": "houlsby", "bottleneck_size": 8}, 5, "p")
    bank = AdapterBank(make_tiny(arch, task))
    for name in ("f", "g", "p"):
        bank.load(name, tmp_path / name)
    assert [a["method"] for a in bank.adapters()] == ["fusion", "fusion", "houlsby"]
    # g's copy of a is f's: the memory g adds leaves a out (f, over a and b, and g, over a and c, are alike)
    memory = {a["name"]: a["memory_bytes"] for a in bank.adapters()}
    a_bytes = sum(t.numel() * t.element_size() for m in bank.model.modules() if isinstance(m, BottleneckWrapper)
                  and "a" in m.adapters for t in m.adapters["a"].parameters())
    assert a_bytes > 0 and memory["g"] == memory["f"] - a_bytes
    rows = ["f", "p", None, "g", "f"]
    inputs = tiny_inputs(batch=len(rows))
    row = [{k: v[i:i + 1] for k, v in inputs.items()} for i in range(len(rows))]
    mixed = bank.forward(rows, **inputs).logits
    for i, entry in enumerate(rows):
        close(mixed[i], alone(tmp_path, arch, task, entry, row[i]))
    assert not torch.allclose(mixed[0], mixed[3], atol=1e-3)  # the two fusions differ
    bank.unload("f")  # takes b with it; a stays, g fuses it
    close(bank.forward(["g", "p"], **{k: v[3:5] for k, v in inputs.items()}).logits[0],
          alone(tmp_path, arch, task, "g", row[3]))
    bank.unload("g")
    assert {n for m in bank.model.modules() if isinstance(m, BottleneckWrapper) for n in m.adapters} == {"p"}


def test_the_bank_refuses_a_fusion_whose_copy_of_a_shared_adapter_differs(tmp_path):
    saved_fusion(tmp_path, "bert", "cls", ["a", "b"], 10, "f")
    model = peftkit.fuse(holding("bert", "cls", ("pfeiffer",) * 3, ("a", "b", "c")), ["a", "c"])
    perturb(model, "a", 7)  # not the a that f was saved with
    peftkit.save_adapter(model, tmp_path / "g", "fusion")
    bank = AdapterBank(make_tiny("bert", "cls"))
    bank.load("f", tmp_path / "f")
    inputs = tiny_inputs(batch=2)
    before = bank.forward(["f", None], **inputs).logits
    with pytest.raises(PeftkitError, match=r"^fusion 'g' was saved with other weights for adapter 'a' than the "
                                           r"model holds \(fusion 'f' brought in an adapter by that name\); "
                                           "unload 'f' first, or load the fusion on a model without it$"):
        bank.load("g", tmp_path / "g")
    assert [a["name"] for a in bank.adapters()] == ["f"]
    close(bank.forward(["f", None], **inputs).logits, before, atol=0)
    assert {n for m in bank.model.modules() if isinstance(m, BottleneckWrapper) for n in m.adapters} == {"a", "b"}
    bank.unload("f")  # the advice works: g then loads with its own a
    bank.load("g", tmp_path / "g")
    assert [a["name"] for a in bank.adapters()] == ["g"]


def test_the_bank_refuses_a_fusion_whose_shared_adapter_has_other_options(tmp_path):
    saved_fusion(tmp_path, "bert", "cls", ["a", "b"], 10, "f")  # a is a Pfeiffer adapter here
    model = peftkit.fuse(holding("bert", "cls", ("houlsby", "pfeiffer", "houlsby"), ("a", "b", "c")), ["a", "c"])
    peftkit.save_adapter(model, tmp_path / "g", "fusion")
    bank = AdapterBank(make_tiny("bert", "cls"))
    bank.load("f", tmp_path / "f")
    with pytest.raises(PeftkitError, match=r"^fusion 'g' brings in adapter 'a', but fusion 'f' brought in an adapter "
                                           "by that name with other options; unload 'f' first, or load the fusion "
                                           "on a model without it$"):
        bank.load("g", tmp_path / "g")
    assert [a["name"] for a in bank.adapters()] == ["f"]
    assert {n for m in bank.model.modules() if isinstance(m, BottleneckWrapper) for n in m.adapters} == {"a", "b"}


def test_the_trainer_adds_the_value_regularization_to_the_task_loss():
    from types import SimpleNamespace

    from peftkit.trainer import AdapterTrainer
    model = fused("bert", "cls")
    with torch.no_grad():
        fusions(model)[0].value.weight.mul_(2)
    task = SimpleNamespace(_task_loss=lambda *args: torch.tensor(1.5))
    loss = AdapterTrainer.compute_loss(task, model, {})
    close(loss, 1.5 + regularization(model), atol=0)
    assert regularization(model) >= 0.01 * 32  # ||I - 2I||^2 = 32 on the first layer alone
    plain = peftkit.attach(make_tiny("bert", "cls"), "pfeiffer")
    assert AdapterTrainer.compute_loss(task, plain, {}) == 1.5  # no fusion, no penalty


def test_a_fusion_recipe_refuses_adapters_of_another_base_before_training(tmp_path):
    from peftkit.recipe import load_recipe
    from peftkit.train import set_up
    spec = {"method": "pfeiffer", "bottleneck_size": 8}
    tiny = [saved(tmp_path, "bert", "cls", spec, s, f"tiny-{s}") for s in (0, 1)]  # not MiniLM's
    small = ["data.max_train_samples=16", "data.max_eval_samples=8", "train.max_steps=1", "train.max_length=32"]
    recipe = load_recipe("sentiment-fusion", small + [f"method.adapters=[{tiny[0]}, {tiny[1]}]"])
    with pytest.raises(PeftkitError, match=r"fusion: .*tiny-0: this adapter was trained on .* but the model given "
                                           r"is 'minilm-l6'"):
        set_up(recipe)
    recipe = load_recipe("sentiment-fusion", small + [f"method.adapters=[{tmp_path / 'nothing'}, {tiny[1]}]"])
    with pytest.raises(PeftkitError, match=r"fusion: '.*nothing' is neither an adapter the model holds"):
        set_up(recipe)
