"""attach / save / load / merge / report with LoRA on tiny random models."""
import json
import os
import stat

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftkit
from peftkit.anatomy import task_heads
from peftkit.saving import atomic_write, staged_dir
from conftest import make_tiny, tiny_inputs


def logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if "logits" in out else torch.cat([out.start_logits, out.end_logits], -1)


def train_step(model, inputs):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    out = model(**inputs)
    loss = (out.logits if "logits" in out else out.start_logits).float().pow(2).mean()
    loss.backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("arch,task", [("bert", "cls"), ("bert", "qa"), ("llama", "lm"), ("llama", "cls"),
                                       ("gpt2", "lm")])
def test_only_lora_and_heads_train(arch, task):
    model = peftkit.attach(make_tiny(arch, task), "lora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, tiny_inputs())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    for key in changed:
        assert "lora_" in key or "modules_to_save" in key, key
    heads = task_heads(model.get_base_model())
    assert all(any(f"{h}.modules_to_save" in k for k in changed) for h in heads)


@pytest.mark.parametrize("arch,task", [("bert", "cls"), ("llama", "lm"), ("gpt2", "cls")])
def test_save_load_reproduces_outputs(tmp_path, arch, task):
    model = peftkit.attach(make_tiny(arch, task), {"method": "lora", "r": 4, "init_lora_weights": False})
    inputs = tiny_inputs()
    train_step(model, inputs)
    expected = logits(model, inputs)
    peftkit.save_adapter(model, tmp_path / "a")
    loaded = peftkit.load_adapter(make_tiny(arch, task), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_saved_file_holds_only_adapter_and_heads(tmp_path):
    model = peftkit.attach(make_tiny("bert", "cls"), "lora")
    report = peftkit.param_report(model)
    peftkit.save_adapter(model, tmp_path / "a")
    size = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    names = sorted(p.name for p in (tmp_path / "a").iterdir())  # peft may add a README.md model card
    assert [n for n in names if n != "README.md"] == ["adapter_config.json", "adapter_model.safetensors",
                                                      "peftkit.json"]
    assert report["trainable"] * 4 < size < report["trainable"] * 4 + 8192


def test_peftkit_adapter_loads_in_stock_peft(tmp_path, recwarn):
    model = peftkit.attach(make_tiny("llama", "lm"), {"method": "lora", "init_lora_weights": False})
    inputs = tiny_inputs()
    peftkit.save_adapter(model, tmp_path / "a")
    stock = PeftModel.from_pretrained(make_tiny("llama", "lm"), str(tmp_path / "a"))
    assert not [w for w in recwarn if "Unexpected keyword arguments" in str(w.message)]  # nothing of ours in its config
    torch.testing.assert_close(logits(stock, inputs), logits(model, inputs), rtol=0, atol=0)


def test_peft_adapter_loads_in_peftkit(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    stock = get_peft_model(make_tiny("llama", "lm"), config)
    stock.save_pretrained(str(tmp_path / "p"))
    inputs = tiny_inputs()
    ours = peftkit.load_adapter(make_tiny("llama", "lm"), tmp_path / "p")
    torch.testing.assert_close(logits(ours, inputs), logits(stock, inputs), rtol=0, atol=0)


def test_a_stock_peft_folder_is_checked_on_shapes_and_says_it_has_no_fingerprint(tmp_path, caplog):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(make_tiny("llama", "lm"), config).save_pretrained(str(tmp_path / "p"))
    peftkit.load_adapter(make_tiny("llama", "lm"), tmp_path / "p")
    assert "records no base fingerprint (saved by peft, not peftkit)" in caplog.text
    wider = make_tiny("llama", "lm")
    wider.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 96, bias=False)
    with pytest.raises(peftkit.PeftkitError, match=r"q_proj.lora_B.weight has shape \(64, 4\), which does not fit "
                                                   r"model.layers.0.self_attn.q_proj \(64 in, 96 out\)"):
        peftkit.load_adapter(wider, tmp_path / "p")


def test_a_classifier_adapter_without_its_head_is_refused(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])  # no task type: peft does not keep the head
    get_peft_model(make_tiny("llama", "cls"), config).save_pretrained(str(tmp_path / "p"))
    with pytest.raises(peftkit.PeftkitError, match="holds no weights for the model's task head score"):
        peftkit.load_adapter(make_tiny("llama", "cls"), tmp_path / "p")


def test_an_adapter_saved_under_a_name_reloads_under_it(tmp_path):
    for method in ("lora", "houlsby"):
        model = peftkit.attach(make_tiny("bert", "cls"), method, name="sentiment")
        peftkit.save_adapter(model, tmp_path / method)
        loaded = peftkit.load_adapter(make_tiny("bert", "cls"), tmp_path / method)
        assert list(loaded.peftkit_adapters) == ["sentiment"]


@pytest.mark.parametrize("options", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_merge_matches_unmerged(options):
    model = peftkit.attach(make_tiny("llama", "cls"), {"method": "lora", "init_lora_weights": False, **options})
    inputs = tiny_inputs()
    train_step(model, inputs)
    expected = logits(model, inputs)
    merged = peftkit.merge(model)
    assert type(merged).__name__ == "LlamaForSequenceClassification"
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=0, atol=1e-4)
    # the caller's model is left as it was, adapter and all; only inplace=True gives it up
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    assert any("lora_A" in k for k in model.state_dict())
    peftkit.merge(model, inplace=True)
    assert not any("lora_A" in k for k in model.state_dict())


def test_merge_keeps_the_base_dtype_unless_asked():
    model = peftkit.attach(make_tiny("llama", "cls").to(torch.bfloat16), "lora")
    assert peftkit.merge(model).dtype == torch.bfloat16
    assert peftkit.merge(model, dtype=torch.float32).dtype == torch.float32


def test_wrong_base_is_refused_and_left_untouched(tmp_path):
    model = peftkit.attach(make_tiny("llama", "lm", seed=0), "lora")
    peftkit.save_adapter(model, tmp_path / "a")
    other = make_tiny("llama", "lm", seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(peftkit.PeftkitError, match="trained on .* but the model given is"):
        peftkit.load_adapter(other, tmp_path / "a")
    assert not hasattr(other, "peftkit_adapters") and not hasattr(other, "peft_config")
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    bert = make_tiny("bert", "cls")
    with pytest.raises(peftkit.PeftkitError, match="LlamaForCausalLM but the model given is .*BertForSequenceClassification"):
        peftkit.load_adapter(bert, tmp_path / "a")


def test_another_checkpoint_of_the_same_shape_is_refused_and_a_bf16_copy_is_not(tmp_path):
    peftkit.save_adapter(peftkit.attach(make_tiny("llama", "lm"), "lora"), tmp_path / "a")
    variant = make_tiny("llama", "lm")  # as a short fine-tune leaves it: the embeddings as they were,
    torch.manual_seed(1)  # one deep tensor's weights moved by 2% each
    weight = variant.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight.mul_(1 + 0.02 * torch.randn_like(weight))
    with pytest.raises(peftkit.PeftkitError, match=r"model.layers.1.mlp.down_proj.weight of the model given .* "
                                                   r"holds other weights"):
        peftkit.load_adapter(variant, tmp_path / "a")
    assert not hasattr(variant, "peft_config")
    peftkit.load_adapter(make_tiny("llama", "lm").to(torch.bfloat16), tmp_path / "a")  # rounding only


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(peftkit.PeftkitError, match="does not exist"):
        peftkit.load_adapter(make_tiny("bert", "cls"), tmp_path / "missing")
    model = peftkit.attach(make_tiny("bert", "cls"), "lora")
    peftkit.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(peftkit.PeftkitError, match="truncated or corrupted"):
        peftkit.load_adapter(make_tiny("bert", "cls"), tmp_path / "a")
    weights.write_bytes(b"\x00" * 8)
    with pytest.raises(peftkit.PeftkitError, match="truncated or corrupted"):
        peftkit.load_adapter(make_tiny("bert", "cls"), tmp_path / "a")
    peftkit.save_adapter(model, tmp_path / "b")
    record_file = tmp_path / "b" / "peftkit.json"  # LoRA: peftkit's record beside peft's config
    record = json.loads(record_file.read_text())
    record["method"] = "telepathy"
    record_file.write_text(json.dumps(record))
    with pytest.raises(peftkit.PeftkitError, match="unknown adapter method 'telepathy'"):
        peftkit.load_adapter(make_tiny("bert", "cls"), tmp_path / "b")


def test_interrupted_save_leaves_old_adapter(tmp_path, monkeypatch):
    model = peftkit.attach(make_tiny("bert", "cls"), {"method": "lora", "init_lora_weights": False})
    peftkit.save_adapter(model, tmp_path / "a")
    original = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PeftModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        peftkit.save_adapter(model, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        peftkit.save_adapter(model, tmp_path / "new")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_bad_input_errors():
    with pytest.raises(peftkit.PeftkitError, match="unknown preset 'lorax'.*presets: .*lora"):
        peftkit.attach(make_tiny("bert", "cls"), "lorax")
    with pytest.raises(peftkit.PeftkitError, match="unknown method 'hyperlora'; methods: lora, houlsby"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "hyperlora"})
    with pytest.raises(peftkit.PeftkitError, match="match no module.*candidates: .*query"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "lora", "target_modules": ["q_proj"]})
    with pytest.raises(peftkit.PeftkitError, match="positive integer, got 0"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "lora", "r": 0})
    with pytest.raises(peftkit.PeftkitError, match="unknown LoRA option.*rank"):
        peftkit.attach(make_tiny("bert", "cls"), {"method": "lora", "rank": 4})
    model = peftkit.attach(make_tiny("bert", "cls"), "lora")
    with pytest.raises(peftkit.PeftkitError, match="already holds adapter.*pass name="):
        peftkit.attach(model, "lora")
    model = peftkit.attach(model, "lora", name="second")
    assert sorted(model.peft_config) == ["default", "second"]


def test_targets_by_regex_and_all_linear():
    model = peftkit.attach(make_tiny("llama", "lm"), {"method": "lora", "target_modules": r".*\.(k|o)_proj"})
    names = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert names and all(n.split(".")[-2] in ("k_proj", "o_proj") for n in names)
    model = peftkit.attach(make_tiny("gpt2", "lm"), {"method": "lora", "target_modules": "all-linear"})
    assert any("c_fc.lora_A" in n for n, _ in model.named_modules())


def test_param_report_is_exact():
    model = peftkit.attach(make_tiny("llama", "cls"), "lora")
    report = peftkit.param_report(model)
    trainable, total = model.get_nb_trainable_parameters()
    assert (report["trainable"], report["total"]) == (trainable, total)
    assert report["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(report["modules"].values()) == report["trainable"]
    assert "ratio" in str(report) and "lora_A" in str(report)


def test_files_and_folders_written_atomically_get_the_usual_permissions(tmp_path):
    """A temporary file or folder is private; what replaces the real one must not stay so, or a server
    running as another user could not read a saved adapter."""
    before = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        with staged_dir(tmp_path / "run") as folder:
            (folder / "x").write_text("x")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755
