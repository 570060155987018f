"""`peftkit bench params`: counts from configs on the meta device, checked against
independent formulas, real (non-meta) attach, peft's own count and real adapter files."""
import argparse
import csv
import io
import json
import resource

import pytest
import torch
from conftest import BERT, GPT2, LLAMA
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save, save_file
from transformers import AutoConfig, AutoModel

import peftkit
from peftkit.bench import add_bench_parser, main, run_bench
from peftkit.bench.params import load_config, meta_model, param_table, safetensors_size, shipped_configs
from peftkit.loading import model_class
from peftkit.methods import METHODS as REGISTRY
from peftkit.presets import resolve_spec
from peftkit.tuners.peft_layers import NO_CONV1D
from peftkit.errors import PeftkitError

ARCHS = {"bert": BERT, "llama": LLAMA, "gpt2": GPT2}
METHODS = ["lora", "houlsby", "pfeiffer", "parallel", "prefix", "prompt_tuning", "p_tuning"]  # the methods
# with a closed-form count below


@pytest.fixture
def config_file(tmp_path):
    """config_file("llama") -> path of a tiny JSON config of that architecture."""
    def write(arch, **extra):
        path = tmp_path / f"tiny-{arch}.json"
        path.write_text(json.dumps({"model_type": arch, **ARCHS[arch], **extra}))
        return path
    return write


# ---------------------------------------------------------------------------- independent formulas

def lora_count(r, shapes):
    """LoRA adds A (r x in) and B (out x r) per targeted layer: r * (in + out)."""
    return sum(r * (i + o) for i, o in shapes)


def bottleneck_count(hidden, b, sites):
    """down (hidden x b, + b bias) and up (b x hidden, + hidden bias) per insertion."""
    return sites * (hidden * b + b + b * hidden + hidden)


def prefix_count(tokens, layers, token_dim, projection, encoder_hidden=None):
    """peft's PrefixEncoder: an embedding of P x (layers*2*token_dim), or with projection an
    embedding P x token_dim and an MLP token_dim -> hidden -> layers*2*token_dim (with biases)."""
    out = layers * 2 * token_dim
    if not projection:
        return tokens * out
    h = encoder_hidden or token_dim
    return tokens * token_dim + (token_dim * h + h) + (h * out + out)


def prompt_count(tokens, width, encoder_hidden=None):
    """peft's prompt: tokens x width embeddings; p-tuning's MLP encoder width -> h -> h -> width (with biases)."""
    h = encoder_hidden
    return tokens * width + ((width * h + h) + (h * h + h) + (h * width + width) if h else 0)


def expected_tiny(arch, method):
    """Trainable parameters of a preset on the tiny conftest models (default task)."""
    c = ARCHS[arch]
    if arch == "llama":
        hidden, layers, heads, kv = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], \
            c["num_key_value_heads"]
        kv_dim, head = kv * hidden // heads, 0  # causal LM: no task head
        lora_shapes = [(hidden, hidden), (hidden, kv_dim)] * layers  # q_proj, v_proj
        token_dim = kv_dim
    elif arch == "bert":
        hidden, layers = c["hidden_size"], c["num_hidden_layers"]
        head = hidden * 2 + 2  # classifier, 2 labels (the default task is classification)
        lora_shapes = [(hidden, hidden), (hidden, hidden)] * layers  # query, value
        token_dim = hidden
    else:  # gpt2
        hidden, layers, head = c["n_embd"], c["n_layer"], 0
        lora_shapes = [(hidden, 3 * hidden)] * layers  # c_attn
        token_dim = hidden
    b = hidden // 16  # presets: reduction_factor 16
    return head + {
        "lora": lora_count(8, lora_shapes),
        "houlsby": bottleneck_count(hidden, b, 2 * layers),
        "pfeiffer": bottleneck_count(hidden, b, layers),
        "parallel": bottleneck_count(hidden, b, layers),
        "prefix": prefix_count(20, layers, token_dim, projection=True),
        "prompt_tuning": prompt_count(20, hidden),  # the presets: 20 tokens, p-tuning's encoder 128 wide
        "p_tuning": prompt_count(20, hidden, encoder_hidden=128),
    }[method]


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_counts_match_formulas(arch, config_file):
    rows = param_table(config_file(arch), METHODS)
    assert [r["method"] for r in rows] == METHODS
    base = rows[0]["base_params"]
    head = ARCHS["bert"]["hidden_size"] * 2 + 2 if arch == "bert" else 0
    for row in rows:
        assert row["trainable"] == expected_tiny(arch, row["method"]), row
        assert row["ratio"] == row["trainable"] / row["total"]
        # the head is part of the base; peft (LoRA, prompt learning) trains a copy of it beside the frozen original
        assert row["total"] == base + row["trainable"] - (0 if REGISTRY[row["method"]].peft_native else head)


def test_prefix_without_projection_and_gqa(config_file, tmp_path):
    preset = tmp_path / "flat-prefix.yaml"
    preset.write_text("method: prefix\nnum_virtual_tokens: 10\nprefix_projection: false\n")
    (row,) = param_table(config_file("llama"), [str(preset)])
    kv_dim = LLAMA["num_key_value_heads"] * LLAMA["hidden_size"] // LLAMA["num_attention_heads"]
    assert row["trainable"] == prefix_count(10, LLAMA["num_hidden_layers"], kv_dim, projection=False)
    assert row["tensors"] == 1


@pytest.mark.parametrize("arch,task", [("bert", "classification"), ("bert", "qa"), ("llama", "causal-lm"),
                                       ("llama", "classification"), ("gpt2", "causal-lm")])
@pytest.mark.parametrize("method", list(REGISTRY) + ["dora", "lora-all"])
def test_meta_counts_equal_real_attach_and_real_files(arch, task, method, config_file, tmp_path):
    """The meta-device row equals sum(numel) over trainable parameters of a real attach,
    and the predicted file sizes equal the bytes save_adapter writes (fp32) and a bf16 copy."""
    path = config_file(arch)
    if method in NO_CONV1D and arch == "gpt2":  # peft's LyCORIS and OFT layers take no Conv1D
        with pytest.raises(PeftkitError, match=f"{method} cannot adapt .*Conv1D"):
            param_table(path, [method], task=task)
        return
    if REGISTRY.get(method) and REGISTRY[method].prepends_tokens and (task == "qa" or arch != "bert" and
                                                                       task == "classification"):
        with pytest.raises(PeftkitError, match=f"cannot attach '{method}' .*: {method} does not work on a "):
            param_table(path, [method], task=task)
        return
    if method == "boft":
        with pytest.raises(PeftkitError, match="cannot count 'boft' from a config: peft computes values as it "
                                               "builds its layers .*meta"):
            param_table(path, [method], task=task)
        return
    if method == "fusion":  # fuses adapters trained before: none to count on a config alone
        with pytest.raises(PeftkitError, match="cannot attach 'fusion' .*: fusion needs 'adapters'"):
            param_table(path, [method], task=task)
        return
    (row,) = param_table(path, [method], task=task)

    config, _ = load_config(path)
    torch.manual_seed(0)
    model = model_class(task).from_config(config)
    spec = resolve_spec(method)  # the preset, with a rank schedule's length set as bench params sets it
    model = peftkit.attach(model, {"method": spec.method, **spec.about.for_run(spec.options, 1)})
    params = list(model.parameters())
    assert all(p.device.type == "cpu" for p in params)
    assert row["trainable"] == sum(p.numel() for p in params if p.requires_grad)
    assert row["total"] == sum(p.numel() for p in params)

    folder = peftkit.save_adapter(model, tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    assert row["fp32_bytes"] == weights.stat().st_size
    with safe_open(str(weights), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert row["tensors"] == len(state)
    # VeRA's file also holds the frozen random projections its layers share (save_projection), so that
    # loading needs no replay of its PRNG
    shared = sum(t.numel() for k, t in state.items() if k.rsplit(".", 1)[-1] in ("vera_A", "vera_B"))
    assert shared > 0 if method == "vera" else shared == 0
    # p-tuning's file holds the prompt its encoder made (virtual tokens x width), not the encoder it trains
    encoder = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "_head." in n
                  and n.startswith("prompt_encoder."))
    assert encoder > 0 if method == "p_tuning" else encoder == 0
    assert sum(t.numel() for t in state.values()) - shared == row["trainable"] - encoder
    bf16 = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(bf16), metadata={"format": "pt"})
    assert row["bf16_bytes"] == bf16.stat().st_size


@pytest.mark.parametrize("arch,task,peft_task,heads", [("llama", "causal-lm", "CAUSAL_LM", None),
                                                        ("bert", "classification", "SEQ_CLS", ["classifier"]),
                                                        ("gpt2", "causal-lm", "CAUSAL_LM", None)])
def test_lora_agrees_with_peft(arch, task, peft_task, heads, config_file):
    """peft alone (no peftkit.attach) on a real model gives the same trainable and total."""
    path = config_file(arch)
    targets = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt2": ["c_attn"]}[arch]
    for preset, options in [("lora", dict(r=8, lora_alpha=16, target_modules=targets)),
                            ("lora-all", dict(r=16, lora_alpha=32, target_modules="all-linear")),
                            ("dora", dict(r=8, lora_alpha=16, target_modules=targets, use_dora=True))]:
        (row,) = param_table(path, [preset], task=task)
        config, _ = load_config(path)
        model = model_class(task).from_config(config)
        peft_model = get_peft_model(model, LoraConfig(task_type=peft_task, modules_to_save=heads, **options))
        assert peft_model.get_nb_trainable_parameters() == (row["trainable"], row["total"]), preset


# ---------------------------------------------------------------------------- big configs on the meta device

PUBLISHED_TOTALS = {  # exact counts of the published checkpoints (bare encoders; decoders with their LM head)
    "bert-base-uncased": 109_482_240,  # "110M"
    "roberta-large": 355_359_744,  # "355M"
    "gpt2": 124_439_808,  # "124M" (LM head tied to the embeddings)
    "llama-2-7b": 6_738_415_616,  # "6.74B"
    "mistral-7b": 7_241_732_096,  # "7.24B"
    "llama-3-8b": 8_030_261_248,  # "8.03B"
    "llama-2-70b": 68_976_648_192,  # "69B"
}


def test_shipped_configs_have_published_sizes():
    assert set(PUBLISHED_TOTALS) <= set(shipped_configs())
    for name, expected in PUBLISHED_TOTALS.items():
        config, _ = load_config(name)
        encoder = config.model_type in ("bert", "roberta")
        model = meta_model(config, AutoModel if encoder else model_class("causal-lm"))
        assert all(p.is_meta for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) == expected, name


def test_llama_2_70b_is_counted_on_the_meta_device_without_memory():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    rows = {r["method"]: r for r in param_table("llama-2-70b")}
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 1024, f"peak memory grew by {grown_mib:.0f} MiB"  # 70B in fp32 would be 276 GB

    hidden, layers, kv_dim = 8192, 80, 8 * 128  # GQA: 8 key/value heads of 128
    assert rows["lora"]["base_params"] == 68_976_648_192
    assert rows["lora"]["trainable"] == lora_count(8, [(hidden, hidden), (hidden, kv_dim)] * layers) == 16_384_000
    assert rows["houlsby"]["trainable"] == bottleneck_count(hidden, 512, 2 * layers)
    assert rows["pfeiffer"]["trainable"] == rows["parallel"]["trainable"] == bottleneck_count(hidden, 512, layers)
    assert rows["prefix"]["trainable"] == prefix_count(20, layers, kv_dim, projection=True)
    shared = {"vera": 256 * (hidden + hidden)}  # VeRA's file also holds its shared projections, r x in and out x r
    frozen = {"adalora": 2 * layers}  # AdaLoRA keeps each layer's rank count as a frozen parameter
    # p-tuning saves the 20 x 8192 prompt its encoder made, not the encoder
    encoder = {"p_tuning": prompt_count(20, hidden, encoder_hidden=128) - prompt_count(20, hidden)}
    assert rows["prompt_tuning"]["trainable"] == prompt_count(20, hidden)
    assert rows["p_tuning"]["trainable"] == prompt_count(20, hidden, encoder_hidden=128)
    for method, row in rows.items():
        assert row["total"] == row["base_params"] + row["trainable"] + frozen.get(method, 0)
        saved = row["trainable"] + shared.get(method, 0) - encoder.get(method, 0)
        header = row["fp32_bytes"] - 4 * saved  # 8-byte length + JSON header
        assert 8 < header < 200 * row["tensors"] and header % 8 == 0
        assert 8 < row["bf16_bytes"] - 2 * saved < 200 * row["tensors"]


def test_lora_on_70b_agrees_with_peft_on_meta():
    config, _ = load_config("llama-2-70b")
    (row,) = param_table("llama-2-70b", ["lora"])
    with torch.device("meta"):
        model = get_peft_model(meta_model(config, model_class("causal-lm")),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"))
    assert model.get_nb_trainable_parameters() == (row["trainable"], row["total"])


# ---------------------------------------------------------------------------- safetensors size

def test_safetensors_size_is_byte_exact():
    g = torch.Generator().manual_seed(0)
    for n in range(1, 40):
        names = [f"layer.{i}.w{'x' * int(torch.randint(0, 5, (1,), generator=g))}" for i in range(n)]
        dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool]
        state = {}
        for name in names:
            shape = tuple(int(d) for d in torch.randint(0, 7, (int(torch.randint(0, 4, (1,), generator=g)),),
                                                        generator=g))
            dtype = dtypes[int(torch.randint(0, len(dtypes), (1,), generator=g))]
            state[name] = torch.zeros(shape, dtype=dtype)
        described = {k: (tuple(v.shape), {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                                          torch.int64: "I64", torch.int8: "I8", torch.bool: "BOOL"}[v.dtype])
                     for k, v in state.items()}
        assert safetensors_size(described, metadata={"format": "pt"}) == len(save(state, metadata={"format": "pt"}))
        assert safetensors_size(described, metadata={}) == len(save(state))


# ---------------------------------------------------------------------------- model specs

def test_folder_and_embedded_specs(tmp_path):
    folder = tmp_path / "model"
    AutoConfig.for_model("llama", **LLAMA).save_pretrained(folder)
    (row,) = param_table(str(folder), ["lora"])
    assert row["trainable"] == expected_tiny("llama", "lora") and row["model"] == str(folder)

    rows = param_table("minilm-l6", ["pfeiffer"])  # 6-layer BERT, hidden 384
    assert rows[0]["task"] == "classification"
    assert rows[0]["trainable"] == bottleneck_count(384, 24, 6) + 384 * 2 + 2


def test_presets_with_quantize_count_like_their_lora(config_file):
    qlora, lora_all = param_table(config_file("llama"), ["qlora", "lora-all"])
    assert qlora["trainable"] == lora_all["trainable"] and qlora["total"] == lora_all["total"]
    assert qlora["setting"].endswith("base nf4")


def test_bare_encoder_task_base(config_file):
    (row,) = param_table(config_file("bert"), ["houlsby"], task="base")
    assert row["trainable"] == bottleneck_count(32, 2, 4)


def test_errors(config_file, tmp_path):
    path = config_file("llama")
    with pytest.raises(PeftkitError, match=r"unknown preset 'lorax'.*presets: .*houlsby.*methods: lora"):
        param_table(path, ["lora", "lorax"])
    with pytest.raises(PeftkitError, match="config file .*missing.json does not exist"):
        param_table(tmp_path / "missing.json")
    with pytest.raises(PeftkitError, match="not a JSON config file.*llama-2-70b"):
        param_table("no-such-model")
    with pytest.raises(PeftkitError, match="unknown task 'regression'"):
        param_table(path, task="regression")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "not-an-architecture", "hidden_size": 8}))
    with pytest.raises(PeftkitError, match="unsupported architecture"):
        param_table(bad)
    bad.write_text("{not json")
    with pytest.raises(PeftkitError, match="not valid JSON"):
        param_table(bad)
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(PeftkitError, match="model_type"):
        param_table(bad)
    neox = tmp_path / "neox.json"  # transformers knows it; peftkit has no default placement for it
    neox.write_text(json.dumps({"model_type": "gpt_neox", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "intermediate_size": 64}))
    with pytest.raises(PeftkitError, match=r"cannot attach 'houlsby'.*gpt_neox.*supported: bert"):
        param_table(neox, ["houlsby"])


# ---------------------------------------------------------------------------- the command

def run(argv, capsys, notes: list | None = None):
    """The command's stdout; its stderr notes appended to `notes` when given."""
    parser = argparse.ArgumentParser(prog="peftkit")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    assert run_bench(parser.parse_args(["bench", *argv])) == 0
    captured = capsys.readouterr()
    if notes is not None:
        notes.append(captured.err)
    return captured.out


def test_cli_formats(config_file, capsys):
    path = str(config_file("llama"))
    notes = []
    rows = json.loads(run(["params", "--model", path, "--format", "json"], capsys, notes))
    # every registered method by default, but BOFT: its layers compute permutations the meta device cannot;
    # and AdapterFusion, which is built over other adapters
    assert [r["method"] for r in rows] == [m for m in REGISTRY if m not in ("boft", "fusion")]
    assert "peftkit: note: boft left out: cannot count 'boft' from a config" in notes[0]
    assert "peftkit: note: fusion left out: " in notes[0] and "fusion needs 'adapters'" in notes[0]
    assert rows[0]["trainable"] == expected_tiny("llama", "lora")

    out = run(["params", "--model", path, "--method", "lora", "--method", "dora", "--format", "csv"], capsys)
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["method"] for r in table] == ["lora", "dora"]
    assert int(table[0]["trainable"]) == expected_tiny("llama", "lora")

    out = run(["params", "--model", path, "--method", "houlsby"], capsys)
    lines = out.splitlines()
    assert "LlamaForCausalLM" in lines[0] and lines[1].split()[:3] == ["method", "setting", "trainable"]
    assert f"{expected_tiny('llama', 'houlsby'):,}" in lines[2]
    assert len({len(line) for line in lines[1:3]}) == 1  # aligned columns

    out = run(["params", "--model", path, "--model", str(config_file("bert")), "--format", "markdown"], capsys)
    assert out.startswith("# ") and out.count("\n| method |") == 2 and "--format markdown" in out


def test_cli_errors_exit_2(capsys, tmp_path):
    assert main(["params", "--model", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["params"]) == 2
    assert "--shipped" in capsys.readouterr().err
    assert main(["params", "--model", "gpt2", "--method", "nope"]) == 2
    assert "presets:" in capsys.readouterr().err
