"""AdapterBank: one base, many adapters of every method, picked per call and per batch row.

The reference output of each adapter comes from a fresh Python process (this file run as a
script), with a fresh base per adapter and peftkit.load_adapter (peft's PeftModel for LoRA). The
bank must give the same outputs (fp32: 1e-5; generated tokens: equal) alone, after random switch
orders, and as one row of a mixed batch; unloading one adapter must not change the others.
"""
import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, SIZES, tiny_inputs, wait_until

import peftkit
from peftkit import AdapterBank, PeftkitError
from peftkit.bank import generate as bank_generate
from peftkit.cli import main
from peftkit.decoding import Sequence

ATOL = 1e-5
PREFIX = {"method": "prefix", "num_virtual_tokens": 4, "prefix_projection": True}
GROUPS = {  # group -> (arch, task, {adapter: (spec, num_labels)})
    "llama-lm": ("llama", "lm", {
        "lora": ({"method": "lora", "init_lora_weights": False}, None),
        "lora_all": ({"method": "lora", "target_modules": "all-linear", "r": 4, "init_lora_weights": False}, None),
        "houlsby": ("houlsby", None), "pfeiffer": ("pfeiffer", None), "parallel": ("parallel", None),
        "prefix": (PREFIX, None),
        "prefix6": ({"method": "prefix", "num_virtual_tokens": 6}, None)}),
    "gpt2-lm": ("gpt2", "lm", {
        "lora": ({"method": "lora", "init_lora_weights": False}, None), "houlsby": ("houlsby", None),
        "prefix": (PREFIX, None)}),
    "bert-cls": ("bert", "cls", {
        "lora": ({"method": "lora", "init_lora_weights": False}, 2), "houlsby": ("houlsby", 5),
        "pfeiffer": ("pfeiffer", 3), "parallel": ("parallel", 2), "prefix": (PREFIX, 4)}),
    "bert-qa": ("bert", "qa", {
        "lora": ({"method": "lora", "init_lora_weights": False}, None), "parallel": ("parallel", None),
        "prefix": (PREFIX, None)}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP waiting
    for a descheduled thread makes each op 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(arch, task, num_labels=None, seed=0, **config):
    """conftest's tiny models, with any number of labels (the body's weights do not depend on it)."""
    config_cls, model_cls = CLASSES[(arch, task)]
    torch.manual_seed(seed)
    labels = num_labels or (2 if task == "qa" else 3)
    return model_cls(config_cls(**{**SIZES[arch], **config}, num_labels=labels)).eval()


def make_adapter(model, spec, path, seed=0):
    """Attach `spec` to `model`, give every adapter and head weight random values, save."""
    model = peftkit.attach(model, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return peftkit.save_adapter(model, path)


def lm_inputs():
    """Left padded, for generate."""
    inputs = tiny_inputs(batch=4)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :3] = 0
    return inputs


def outputs(out):
    return torch.stack([out.start_logits, out.end_logits], -1) if hasattr(out, "start_logits") else out.logits


def reference(spec_file, out_file):
    """Run in a fresh process: each adapter on a fresh base through peftkit.load_adapter."""
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_file).read_text())
    result = {}
    for group, entries in spec.items():
        arch, task, _ = GROUPS[group]
        for name, (path, num_labels) in {**entries, "__base__": (None, None)}.items():
            base = tiny(arch, task, num_labels)
            model = base if path is None else peftkit.load_adapter(base, path)
            with torch.no_grad():
                result[f"{group}/{name}"] = outputs(model(**tiny_inputs(batch=4)))
                if task == "lm":
                    result[f"{group}/{name}/gen"] = model.generate(**lm_inputs(), max_new_tokens=5, do_sample=False,
                                                                   pad_token_id=0)
    torch.save(result, out_file)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    spec = {}
    for group, (arch, task, adapters) in GROUPS.items():
        spec[group] = {}
        for i, (name, (method, labels)) in enumerate(adapters.items()):
            path = make_adapter(tiny(arch, task, labels), method, root / group / name, seed=i)
            spec[group][name] = (str(path), labels)
    (root / "spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, __file__, str(root / "spec.json"), str(root / "ref.pt")], check=True,
                   capture_output=True, cwd=Path(__file__).parent)
    return spec, torch.load(root / "ref.pt", weights_only=True), root


TOKEN = "s3cret"  # the admin token of the servers over served_llama's bank
LORA = {"method": "lora", "init_lora_weights": False}


def served_llama(root: Path, adapters: dict, loaded: list) -> AdapterBank:
    """For the server's tests: a tiny Llama base saved with SmolLM2's tokenizer under `root`, the
    `adapters` ({name: spec}) saved in root/adapters (plus "foreign", made on another base, and
    root/outside, outside that folder), and a bank over the base holding the `loaded` ones."""
    tokenizer = peftkit.load_tokenizer("smollm2-135m")
    size = {"vocab_size": tokenizer.vocab_size}
    folder = root / "adapters"
    for i, (name, spec) in enumerate(adapters.items()):
        make_adapter(tiny("llama", "lm", **size), spec, folder / name, seed=i)
    make_adapter(tiny("llama", "lm", seed=1, **size), LORA, folder / "foreign")
    make_adapter(tiny("llama", "lm", **size), LORA, root / "outside")
    base = root / "tiny-llama"
    tiny("llama", "lm", **size).save_pretrained(base)
    tokenizer.save_pretrained(base)
    bank = AdapterBank(str(base))
    for name in loaded:
        bank.load(name, folder / name)
    return bank


def full_bank(spec, group):
    arch, task, _ = GROUPS[group]
    bank = AdapterBank(tiny(arch, task))
    names = list(spec[group])
    random.Random(group).shuffle(names)  # load order should not matter either
    for name in names:
        bank.load(name, spec[group][name][0])
    return bank


def assert_row(out, ref, row, what):
    width = ref.shape[-1]
    diff = (out[row, ..., :width] - ref[row]).abs().max().item()
    assert diff <= ATOL, f"{what}: row {row} differs from the fresh-process reference by {diff:.2e}"


@pytest.mark.parametrize("group", list(GROUPS))
def test_matches_fresh_process_alone_after_switches_and_mixed(suite, group):
    spec, ref, _ = suite
    bank = full_bank(spec, group)
    task = GROUPS[group][1]
    names = list(spec[group]) + ([None] if task == "lm" else [])
    rng = random.Random(1)
    inputs = tiny_inputs(batch=4)
    for _ in range(3):  # every adapter alone, after random switch orders
        rng.shuffle(names)
        for name in names:
            out = outputs(bank.forward(name, **inputs))
            for row in range(4):
                assert_row(out, ref[f"{group}/{name or '__base__'}"], row, f"{name} alone")
    for _ in range(6):  # mixed batches: every row against its own adapter's reference
        rows = [rng.choice(names) for _ in range(4)]
        out = outputs(bank.forward(rows, **inputs))
        for row, name in enumerate(rows):
            assert_row(out, ref[f"{group}/{name or '__base__'}"], row, f"{name} in mixed batch {rows}")
    if task == "lm":
        for rows in ([rng.choice(names)] * 4, [rng.choice(names) for _ in range(4)], names[:4]):
            new = bank.generate_ids(rows, **lm_inputs(), max_new_tokens=5, pad_token_id=0)
            for row, name in enumerate(rows):
                assert torch.equal(new[row], ref[f"{group}/{name or '__base__'}/gen"][row]), (rows, row)


@pytest.mark.parametrize("group", ["llama-lm", "bert-cls"])
def test_unload_leaves_the_others_untouched(suite, group):
    spec, ref, _ = suite
    bank = full_bank(spec, group)
    inputs = tiny_inputs(batch=4)
    before = {name: outputs(bank.forward(name, **inputs)) for name in spec[group]}
    order = list(spec[group])
    random.Random(2).shuffle(order)
    for i, gone in enumerate(order[:-1]):
        bank.unload(gone)
        assert gone not in [a["name"] for a in bank.adapters()]
        with pytest.raises(PeftkitError, match="unknown adapter"):
            bank.forward(gone, **inputs)
        for name in order[i + 1:]:
            torch.testing.assert_close(outputs(bank.forward(name, **inputs)), before[name], rtol=0, atol=1e-6)
    bank.load(order[0], spec[group][order[0]][0])  # back again, as it was
    assert_row(outputs(bank.forward(order[0], **inputs)), ref[f"{group}/{order[0]}"], 1, "reloaded")
    bank.unload(order[-1])
    bank.unload(order[0])
    if GROUPS[group][1] == "lm":  # nothing left: the plain base model, with nothing of the adapters
        assert_row(outputs(bank.forward(None, **inputs)), ref[f"{group}/__base__"], 2, "emptied bank")
        assert not bank.lora.hooks and not hasattr(bank.model, "_peftkit_prefix")


def test_base_weights_are_never_copied(suite):
    spec, _, _ = suite
    bank = AdapterBank(tiny("llama", "lm"))
    base = {p.data_ptr() for p in bank.model.parameters()}
    for name, (path, _) in spec["llama-lm"].items():
        bank.load(name, path)
    params = list(bank.model.parameters())
    assert base <= {p.data_ptr() for p in params}  # the same tensors, never a copy
    added = sum(p.numel() * p.element_size() for p in params if p.data_ptr() not in base)
    added += sum(t.numel() * t.element_size() for e in bank.entries.values() for pair in e.lora.values() for t in pair)
    infos = bank.adapters()
    assert added == sum(a["memory_bytes"] for a in infos)
    for info in infos:  # an adapter costs its file's tensors (the file adds a small header)
        assert info["memory_bytes"] <= info["file_bytes"]


def test_another_base_is_refused_and_the_bank_stays_usable(suite, tmp_path):
    spec, ref, _ = suite
    bank = AdapterBank(tiny("llama", "lm"))
    bank.load("lora", spec["llama-lm"]["lora"][0])
    other = make_adapter(tiny("llama", "lm", seed=1), "houlsby", tmp_path / "other")
    with pytest.raises(PeftkitError, match="trained on .* load the adapter onto the base it was trained on"):
        bank.load("other", other)
    wrong_task = make_adapter(tiny("llama", "cls"), "houlsby", tmp_path / "cls")
    with pytest.raises(PeftkitError, match="is a classification adapter .* causal-lm model"):
        bank.load("cls", wrong_task)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text((other / "adapter_config.json").read_text())
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PeftkitError):
        bank.load("broken", tmp_path / "broken")
    with pytest.raises(PeftkitError, match="does not exist"):
        bank.load("missing", tmp_path / "missing")
    assert [a["name"] for a in bank.adapters()] == ["lora"]
    assert not any(isinstance(m, peftkit.tuners.bottleneck.layer.BottleneckWrapper) for m in bank.model.modules())
    assert_row(outputs(bank.forward("lora", **tiny_inputs(batch=4))), ref["llama-lm/lora"], 0, "after refusals")


def test_lora_the_bank_cannot_serve_is_refused(tmp_path):
    bank = AdapterBank(tiny("llama", "lm"))
    dora = make_adapter(tiny("llama", "lm"), {"method": "lora", "use_dora": True}, tmp_path / "dora")
    with pytest.raises(PeftkitError, match="DoRA"):
        bank.load("dora", dora)
    lora = make_adapter(tiny("llama", "lm"), {"method": "lora", "init_lora_weights": False}, tmp_path / "lora")
    from safetensors.torch import load_file, save_file
    state = load_file(lora / "adapter_model.safetensors")
    state = {k.replace("q_proj", "no_such_layer"): v for k, v in state.items()}
    save_file(state, lora / "adapter_model.safetensors")
    with pytest.raises(PeftkitError, match="do not fit this base"):
        bank.load("lora", lora)
    assert not bank.adapters() and not bank.lora.hooks


def test_names_and_rows_are_checked(suite):
    spec, _, _ = suite
    bank = AdapterBank(tiny("llama", "lm"))
    path = spec["llama-lm"]["lora"][0]
    for bad in ("", "a.b", "has space", "items", "LlamaForCausalLM", 3):
        with pytest.raises(PeftkitError):
            bank.load(bad, path)
    bank.load("a", path)
    with pytest.raises(PeftkitError, match="already loaded"):
        bank.load("a", path)
    inputs = tiny_inputs(batch=4)
    with pytest.raises(PeftkitError, match="unknown adapter"):
        bank.forward(["a", "zzz", None, None], **inputs)
    with pytest.raises(PeftkitError, match="one per row"):
        bank.forward(["a", None], **inputs)
    with pytest.raises(PeftkitError, match="unknown adapter"):
        bank.unload("zzz")


# ---------------------------------------------------------------------------- text in, text out

@pytest.fixture(scope="module")
def text_banks(tmp_path_factory):
    """Tiny models with the real embedded tokenizers (vocabularies sized to fit), saved as folders."""
    root = tmp_path_factory.mktemp("text")
    minilm = peftkit.load_tokenizer("minilm-l6")
    folders, adapters = {}, {}
    labels = {"sentiment": ["negative", "positive"], "topic": ["business", "sport", "tech", "politics", "film"]}
    for name, method in (("sentiment", "lora"), ("topic", "pfeiffer")):
        model = tiny("bert", "cls", len(labels[name]), vocab_size=minilm.vocab_size,
                     id2label=dict(enumerate(labels[name])))
        adapters[name] = make_adapter(model, method if method != "lora" else
                                      {"method": "lora", "init_lora_weights": False}, root / name, seed=len(name))
    folders["cls"] = root / "tiny-bert"
    tiny("bert", "cls", vocab_size=minilm.vocab_size).save_pretrained(folders["cls"])
    minilm.save_pretrained(folders["cls"])
    for name, method in (("squad", "lora"), ("squad2", "prefix")):
        model = tiny("bert", "qa", vocab_size=minilm.vocab_size)
        adapters[name] = make_adapter(model, {"method": "lora", "init_lora_weights": False} if method == "lora"
                                      else PREFIX, root / name, seed=len(name))
    return folders, adapters, minilm


def test_classify_and_answer_mixed_rows_match_alone(text_banks):
    folders, adapters, tokenizer = text_banks
    bank = AdapterBank(tiny("bert", "cls", vocab_size=tokenizer.vocab_size), tokenizer=tokenizer)
    bank.load("sentiment", adapters["sentiment"])
    bank.load("topic", adapters["topic"])
    texts = ["a triumph of style", "shares fell sharply in early trading today", "the match ended in a draw",
             "dull", "parliament passed the bill after a long debate about taxes"]
    rows = ["topic", "sentiment", "topic", "sentiment", "topic"]
    mixed = bank.classify(texts, adapter=rows)
    alone = [bank.classify([t], adapter=a)[0] for t, a in zip(texts, rows)]
    for m, a, name in zip(mixed, alone, rows):
        assert m["label"] == a["label"] and m["label"] in bank.describe(name)["labels"]
        assert set(m["scores"]) == set(bank.describe(name)["labels"])
        assert all(abs(m["scores"][k] - a["scores"][k]) <= 1e-4 for k in m["scores"])
    with pytest.raises(PeftkitError, match="needs an adapter"):
        bank.classify(texts[:2], adapter=None)
    with pytest.raises(PeftkitError, match="needs a causal-lm bank"):
        bank.generate(["hello"], adapter="topic")

    qa = AdapterBank(tiny("bert", "qa", vocab_size=tokenizer.vocab_size), tokenizer=tokenizer)
    qa.load("squad", adapters["squad"])
    qa.load("squad2", adapters["squad2"])
    questions = ["who won?", "where was it?", "when did it start?"]
    contexts = ["Arsenal won the cup final at Wembley on Saturday. " * 3, "It was in Paris, in a small hall.",
                "The strike started on Monday and ended on Friday."]
    rows = ["squad", "squad2", "squad"]
    mixed = qa.answer(questions, contexts, adapter=rows)
    alone = [qa.answer([q], [c], adapter=a)[0] for q, c, a in zip(questions, contexts, rows)]
    assert [m["answer"] for m in mixed] == [a["answer"] for a in alone]
    assert all(m["answer"] in c for m, c in zip(mixed, contexts))


def test_cli_predict_with_several_adapters(text_banks, tmp_path, capsys):
    folders, adapters, _ = text_banks
    rows = [{"adapter": "topic", "text": "shares fell"}, {"adapter": "sentiment", "text": "a triumph"},
            {"adapter": "sentiment", "text": "dull and long"}, {"adapter": "topic", "text": "the match ended"}]
    file = tmp_path / "rows.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["predict", "--base", str(folders["cls"]), "--adapter", f"sentiment={adapters['sentiment']}",
            "--adapter", f"topic={adapters['topic']}", "--input", str(file)]
    assert main(args) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    bank = AdapterBank.from_adapters(str(folders["cls"]), {"sentiment": adapters["sentiment"],
                                                            "topic": adapters["topic"]})
    expected = [bank.classify([r["text"]], adapter=r["adapter"])[0] for r in rows]
    assert [p["adapter"] for p in printed] == [r["adapter"] for r in rows]
    assert [p["label"] for p in printed] == [e["label"] for e in expected]

    file.write_text(json.dumps({"text": "no adapter named"}) + "\n")
    assert main(args) == 2
    assert "row 1 does not name its adapter" in capsys.readouterr().err
    assert main(args[:3] + ["--adapter", "topic"] + args[-2:]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


# ---------------------------------------------------------------------------- long prompts: chunked prefill

@pytest.fixture(scope="module")
def decode_bank(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer and adapters of each kind that touches the prompt's
    keys and values differently (prefixes of two lengths move rows' positions differently)."""
    root = tmp_path_factory.mktemp("decode")
    bank = AdapterBank(tiny("llama", "lm"), tokenizer=peftkit.load_tokenizer("smollm2-135m"))
    for i, (name, spec) in enumerate({"lora": {"method": "lora", "init_lora_weights": False}, "houlsby": "houlsby",
                                      "prefix": PREFIX, "prefix6": {"method": "prefix", "num_virtual_tokens": 6}}
                                     .items()):
        bank.load(name, make_adapter(tiny("llama", "lm"), spec, root / name, seed=i))
    return bank


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def decode(bank, rows, lengths, **options):
    """Sequences decoded, with the number of between_steps calls."""
    seqs = [Sequence(p, adapter=a, max_tokens=6, **options) for p, a in zip(prompts(lengths), rows)]
    calls = []
    bank.decode(seqs, between_steps=lambda: calls.append(1))
    return seqs, len(calls)


@pytest.mark.parametrize("options", [{}, {"temperature": 0.9, "seed": 7}], ids=["greedy", "sampled"])
def test_chunked_prefill_gives_the_same_tokens(decode_bank, monkeypatch, options):
    monkeypatch.setattr(decode_bank, "batch_size", 3)  # a long batch (3 x 40 tokens) and a short one (2 x 12)
    rows = ["lora", "prefix", "houlsby", "prefix6", None]
    lengths = [40, 5, 33, 12, 3]
    results = {}
    for limit in (30, 10 ** 9):
        monkeypatch.setattr(bank_generate, "PREFILL_TOKENS", limit)
        seqs, steps = decode(decode_bank, rows, lengths, **options)
        results[limit] = [(s.tokens, s.finish_reason) for s in seqs], steps
    (chunked, chunked_steps), (whole, whole_steps) = results[30], results[10 ** 9]
    assert chunked == whole
    assert all(reason for _, reason in chunked)
    assert chunked_steps > whole_steps  # the long batch did run its prompt in chunks


def test_a_long_prompt_lets_others_use_the_model_before_its_first_token(decode_bank, monkeypatch):
    monkeypatch.setattr(bank_generate, "PREFILL_TOKENS", 8)
    long = Sequence(prompts([40])[0], adapter="lora", max_tokens=4)
    other = {}
    steps_before_first_token = []

    def between_steps():
        if not long.tokens:
            steps_before_first_token.append(1)
        if "thread" not in other:  # another client asks for the model while the long prompt runs
            other["thread"] = threading.Thread(target=lambda: other.update(
                out=decode_bank.forward("houlsby", **tiny_inputs(batch=2)), tokens_then=len(long.tokens)))
            other["thread"].start()
            wait_until(lambda: decode_bank.lock._waiting)
    decode_bank.decode([long], between_steps=between_steps)
    other["thread"].join()
    assert other["tokens_then"] == 0  # served between prefill chunks, not after the first token
    assert len(steps_before_first_token) >= 40 // 8 - 1  # 40 prompt tokens, 8 per chunk
    assert long.finish_reason == "length" and len(long.tokens) == 4


def test_a_row_cancelled_during_prefill_ends_without_its_batch_mates_noticing(decode_bank, monkeypatch):
    monkeypatch.setattr(bank_generate, "PREFILL_TOKENS", 16)
    rows, lengths = ["prefix", "lora", None], [40, 25, 9]
    uncancelled, _ = decode(decode_bank, rows, lengths)
    seqs = [Sequence(p, adapter=a, max_tokens=6) for p, a in zip(prompts(lengths), rows)]
    gone = set()
    seqs[0].cancelled = lambda: 0 in gone
    steps = []

    def between_steps():
        steps.append(1)
        if len(steps) == 2:  # during prefill: 3 rows x 40 columns, 5 columns a chunk
            gone.add(0)
    decode_bank.decode(seqs, between_steps=between_steps)
    assert seqs[0].finish_reason == "cancelled" and seqs[0].tokens == []
    assert [(s.tokens, s.finish_reason) for s in seqs[1:]] == [(s.tokens, s.finish_reason) for s in uncancelled[1:]]

    everyone = [Sequence(p, adapter=a, max_tokens=6, cancelled=lambda: len(steps) >= 2)
                for p, a in zip(prompts(lengths), rows)]
    steps.clear()
    decode_bank.decode(everyone, between_steps=lambda: steps.append(1))
    assert [(s.tokens, s.finish_reason) for s in everyone] == [([], "cancelled")] * 3
    assert len(steps) == 2  # the batch stopped at the chunk after which its last client left


def test_chunked_prefill_on_a_4bit_base_gives_the_same_tokens(decode_bank, tmp_path, monkeypatch):
    tiny("llama", "lm").save_pretrained(tmp_path / "base")
    decode_bank.tokenizer.save_pretrained(tmp_path / "base")
    bank = AdapterBank(str(tmp_path / "base"), quantize="nf4")
    assert type(bank.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    for name in ("lora", "prefix"):
        bank.load(name, decode_bank.describe(name)["path"])
    results = []
    for limit in (10, 10 ** 9):
        monkeypatch.setattr(bank_generate, "PREFILL_TOKENS", limit)
        seqs, steps = decode(bank, ["prefix", "lora", None], [30, 4, 21])
        results.append(([s.tokens for s in seqs], steps))
    assert results[0][0] == results[1][0] and results[0][1] > results[1][1]


# ---------------------------------------------------------------------------- the real embedded models

def test_smollm2_mixed_generation_matches_each_adapter_alone(tmp_path):
    tokenizer = peftkit.load_tokenizer("smollm2-135m")
    lora = peftkit.attach(peftkit.load_model("smollm2-135m"), {"method": "lora", "init_lora_weights": False})
    lora_dir = peftkit.save_adapter(lora, tmp_path / "lora")
    reference = lora.eval()  # peft's PeftModel, the adapter alone
    own = peftkit.attach(peftkit.load_model("smollm2-135m"), "houlsby", name="houlsby")
    own = peftkit.attach(own, {"method": "prefix", "num_virtual_tokens": 8}, name="prefix")
    with torch.no_grad():
        for name, param in own.named_parameters():
            if ".up." in name:
                param.normal_(0, 0.02)
    dirs = {"lora": lora_dir, **{n: peftkit.save_adapter(own, tmp_path / n, name=n) for n in ("houlsby", "prefix")}}
    bank = AdapterBank("smollm2-135m")
    for name, path in dirs.items():
        bank.load(name, path)
    prompts = ["Write a haiku about the sea.", "What is the capital of France?", "List three colours.",
               "Say hello."]
    rows = ["lora", "houlsby", "prefix", None]
    mixed = bank.generate(prompts, adapter=rows, max_new_tokens=8)
    alone = [bank.generate([p], adapter=a, max_new_tokens=8)[0] for p, a in zip(prompts, rows)]
    assert mixed == alone
    assert len(set(bank.generate([prompts[0]] * 4, adapter=rows, max_new_tokens=8))) > 1  # adapters matter
    # Logits: a 30-layer model in fp32 at logit scale ~30 carries ~1e-6 relative rounding noise
    # whenever the arithmetic is grouped differently (another kernel, padding, another batch).
    ids = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = reference(**ids).logits
    tolerance = 3e-6 * want.abs().max()
    assert (bank.forward("lora", **ids).logits - want).abs().max() <= tolerance
    mixed = bank.forward(rows, **ids).logits
    for row, name in enumerate(rows):
        assert (mixed[row] - bank.forward(name, **ids).logits[row]).abs().max() <= tolerance


def test_minilm_classify_matches_load_adapter(tmp_path):
    tokenizer = peftkit.load_tokenizer("minilm-l6")
    dirs = {}
    for name, method, labels in (("sentiment", {"method": "lora", "init_lora_weights": False}, 2),
                                 ("topic", "pfeiffer", 5)):
        model = peftkit.load_model("minilm-l6", task="classification", num_labels=labels)
        dirs[name] = make_adapter(model, method, tmp_path / name)
    bank = AdapterBank.from_adapters("minilm-l6", dirs)
    texts = ["a triumph of style and wit", "shares fell sharply", "a dull, lifeless film", "the match ended 2-2"]
    rows = ["sentiment", "topic", "sentiment", "topic"]
    got = bank.classify(texts, adapter=rows)
    for text, name, result in zip(texts, rows, got):
        model = peftkit.load_adapter(peftkit.load_model("minilm-l6", task="classification",
                                                        num_labels=len(bank.describe(name)["labels"])), dirs[name])
        with torch.no_grad():
            probs = model(**tokenizer([text], return_tensors="pt")).logits.softmax(-1)[0]
        assert [result["scores"][label] for label in bank.describe(name)["labels"]] == \
            pytest.approx(probs.tolist(), abs=1e-4)  # scores are rounded to 4 places


if __name__ == "__main__":
    reference(*sys.argv[1:])
