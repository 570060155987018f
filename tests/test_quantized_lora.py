"""LoRA on 4-bit and 8-bit bitsandbytes bases, on the CPU."""
import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.anatomy import is_quantized
from peftkit.merge import dequantize
from conftest import make_tiny, tiny_inputs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", "cls").save_pretrained(path)
    return path


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "8bit"])
def test_lora_on_quantized_base(tmp_path, tiny_dir, quantize):
    model = peftkit.load_model(tiny_dir, task="classification", quantize=quantize)
    assert is_quantized(model)
    model = peftkit.attach(model, {"method": "lora", "init_lora_weights": False}, gradient_checkpointing=True)
    inputs = tiny_inputs()
    model.train()
    model(**inputs).logits.pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n or "modules_to_save" in n for n in grads)
    assert any("score" in n for n in grads)
    model.eval()
    expected = logits(model, inputs)

    peftkit.save_adapter(model, tmp_path / "a")
    fresh = peftkit.load_model(tiny_dir, task="classification", quantize=quantize)
    loaded = peftkit.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=1e-6)

    # The merge is exact against the same adapter on the dequantized base ...
    dequantized = peftkit.load_model(tiny_dir, task="classification", quantize=quantize)
    reference = logits(peftkit.load_adapter(dequantize(dequantized), tmp_path / "a"), inputs)
    merged = peftkit.merge(model)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    assert getattr(merged.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(merged, inputs), reference, rtol=0, atol=1e-4)
    # ... and equal to the quantized forward where that forward is float32 (4-bit); LLM.int8
    # quantizes activations too, so 8-bit is only close.
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=0, atol=1e-4 if quantize != "8bit" else 5e-3)

    merged.save_pretrained(tmp_path / "merged")
    again = peftkit.load_model(tmp_path / "merged", task="classification")
    torch.testing.assert_close(logits(again, inputs), logits(merged, inputs), rtol=0, atol=0)


def test_qlora_preset_needs_quantized_base():
    with pytest.raises(peftkit.PeftkitError, match="not quantized.*quantize='nf4'"):
        peftkit.attach(make_tiny("llama", "lm"), "qlora")


@pytest.mark.parametrize("quantize", ["nf4", "8bit"])
def test_quantized_load_lets_go_of_the_checkpoint_file(tmp_path, quantize):
    """The unquantized tensors are copied out of the memory-mapped checkpoint, so its mapping
    (and every page read while quantizing) does not outlive the load; outputs are unchanged."""
    make_tiny("llama", "cls").save_pretrained(tmp_path)
    checkpoint = str((tmp_path / "model.safetensors").resolve())
    model = peftkit.load_model(str(tmp_path), task="classification", quantize=quantize)
    import gc
    gc.collect()
    maps = open("/proc/self/maps").read()
    assert checkpoint not in maps
    inputs = tiny_inputs()
    assert torch.isfinite(logits(model, inputs)).all()
    embedding = model.get_input_embeddings().weight
    torch.testing.assert_close(embedding, make_tiny("llama", "cls").get_input_embeddings().weight)


def test_4bit_layers_compute_in_bf16_on_a_gpu_that_has_it_and_in_the_model_dtype_elsewhere(monkeypatch):
    from peftkit.loading import bnb_config, compute_dtype

    assert compute_dtype(torch.float32) == torch.float32  # this CPU: fp32 throughout, as the tests train
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype(torch.float32) == torch.bfloat16  # QLoRA's setting
    assert compute_dtype(torch.float16) == torch.float16  # a half-precision model keeps its own
    assert bnb_config("nf4", compute_dtype(torch.float32)).bnb_4bit_compute_dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert compute_dtype(torch.float32) == torch.float32


def test_prefix_on_a_quantized_base_trains_with_default_arguments(tiny_dir, caplog):
    model = peftkit.attach(peftkit.load_model(tiny_dir, task="classification", quantize="nf4"), "prefix")
    assert "trains without gradient checkpointing" in caplog.text
    prefix = [p for n, p in model.named_parameters() if p.requires_grad and "score" not in n]
    before = [p.detach().clone() for p in prefix]
    model.train()
    loss = model(**tiny_inputs(), labels=torch.tensor([0, 2])).loss
    loss.backward()
    torch.optim.SGD(prefix, lr=0.1).step()
    assert any(not torch.equal(p, b) for p, b in zip(prefix, before))
    with pytest.raises(peftkit.PeftkitError, match="prefix tuning does not work with gradient checkpointing"):
        peftkit.attach(peftkit.load_model(tiny_dir, task="classification", quantize="nf4"), "prefix",
                       gradient_checkpointing=True)
