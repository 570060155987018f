"""merge --combine: one adapter of several, as peft's add_weighted_adapter makes it for LoRA and as a
weighted sum of the weights for bottleneck adapters; bad requests refused before anything is written."""
import pytest
import torch
from peft import LoraConfig, LoraModel, get_peft_model
from safetensors.torch import load_file

import peftkit
from peftkit.cli import main
from peftkit.methods import method
from peftkit.saving import WEIGHTS

from conftest import logits, make_tiny, randomized, tiny_inputs


def _saved(tmp_path, folder: str, spec: dict, seed: int, arch="llama", task="lm", base_seed=0, base=None):
    base = base if base is not None else make_tiny(arch, task, seed=base_seed)
    return peftkit.save_adapter(randomized(peftkit.attach(base, spec), seed, scale=0.1), tmp_path / folder)


def _lora(r=4, **options):
    return {"method": "lora", "r": r, **options}


def _loaded(path, arch="llama", task="lm"):
    return peftkit.load_adapter(make_tiny(arch, task), path)


@pytest.mark.parametrize("combination, ranks, density", [
    ("linear", (4, 4), None), ("ties", (4, 4), 0.5), ("dare_linear", (4, 4), 0.5), ("cat", (4, 8), None),
    ("svd", (4, 8), None)])
def test_lora_combination_loads_as_peft_makes_it(tmp_path, monkeypatch, combination, ranks, density):
    a, b = (_saved(tmp_path, f"a{n}", _lora(r), seed=n) for n, r in enumerate(ranks))
    weights = [0.7, 0.3]
    unseeded = LoraModel.add_weighted_adapter

    def seeded(*args, **kwargs):  # DARE's random drops, the same in both
        torch.manual_seed(0)
        return unseeded(*args, **kwargs)

    monkeypatch.setattr(LoraModel, "add_weighted_adapter", seeded)
    peftkit.save_adapter(peftkit.combine(make_tiny("llama", "lm"), [a, b], combination, weights, density),
                         tmp_path / "combined")

    reference = peftkit.load_adapter(make_tiny("llama", "lm"), a, name="a")
    reference.load_adapter(str(b), adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=combination, density=density)
    reference.set_adapter("ab")

    combined = logits(_loaded(tmp_path / "combined"))
    torch.testing.assert_close(combined, logits(reference), rtol=0, atol=1e-5)
    assert (combined - logits(_loaded(a))).abs().max() > 1e-2  # the second adapter counted


def test_the_combined_adapter_keeps_the_first_adapters_head(tmp_path):
    a, b = (_saved(tmp_path, f"a{n}", _lora(), seed=n, task="cls") for n in range(2))
    # weights 1, 0 under linear give adapter a's LoRA exactly: the outputs are a's only if its head came too
    peftkit.save_adapter(peftkit.combine(make_tiny("llama", "cls"), [a, b], "linear", [1.0, 0.0]),
                         tmp_path / "combined")
    torch.testing.assert_close(logits(_loaded(tmp_path / "combined", task="cls")),
                               logits(_loaded(a, task="cls")), rtol=0, atol=1e-5)
    saved, first = load_file(tmp_path / "combined" / WEIGHTS), load_file(a / WEIGHTS)
    heads = [key for key in first if ".score." in key]
    assert heads and all(torch.equal(saved[key], first[key]) for key in heads)


def test_the_bank_serves_a_combined_adapter_as_load_adapter_does(tmp_path):
    a, b = (_saved(tmp_path, f"a{n}", _lora(r), seed=n, task="cls") for n, r in enumerate((4, 8)))
    peftkit.save_adapter(peftkit.combine(make_tiny("llama", "cls"), [a, b], "cat", [0.5, 0.5]), tmp_path / "cat")
    bank = peftkit.AdapterBank(make_tiny("llama", "cls"))
    bank.load("cat", tmp_path / "cat")
    torch.testing.assert_close(bank.forward("cat", **tiny_inputs()).logits,
                               logits(_loaded(tmp_path / "cat", task="cls")), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["houlsby", "pfeiffer", "parallel", "compacter"])
def test_bottleneck_linear_is_the_weighted_sum_of_the_weights(tmp_path, name):
    spec = {"method": name, "bottleneck_size": 8}
    a, b = (_saved(tmp_path, f"a{n}", spec, seed=n, arch="bert", task="cls") for n in range(2))
    weights = [0.25, 0.75]
    peftkit.save_adapter(peftkit.combine(make_tiny("bert", "cls"), [a, b], "linear", weights),
                         tmp_path / "combined")

    first, second = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    by_hand = {key: first[key] if key.startswith("classifier.") else 0.25 * first[key] + 0.75 * second[key]
               for key in first}
    saved = load_file(tmp_path / "combined" / WEIGHTS)
    assert saved.keys() == by_hand.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], by_hand[key], rtol=0, atol=1e-7)

    expected = peftkit.load_adapter(make_tiny("bert", "cls"), a)
    method(name).tuner.load_adapter_state_dict(
        expected, "default", {k: v for k, v in by_hand.items() if not k.startswith("classifier.")})
    torch.testing.assert_close(logits(_loaded(tmp_path / "combined", "bert", "cls")), logits(expected),
                               rtol=0, atol=1e-6)


def _labels_of_two(tmp_path):
    """A classifier with two labels on the same body as make_tiny's three-label one."""
    base = make_tiny("llama", "cls")
    base.score = torch.nn.Linear(base.config.hidden_size, 2, bias=False)
    base.config.num_labels = 2
    base.config.id2label = {0: "no", 1: "yes"}
    return _saved(tmp_path, "labels", _lora(), seed=1, base=base)


def _stock_peft(tmp_path):
    model = get_peft_model(make_tiny("llama", "lm"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "stock")
    return tmp_path / "stock"


# (what to combine, the combine arguments, the words the error must hold)
BAD = {
    "other base": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", _lora(), 1, base_seed=1)],
                   ["--combine", "linear", "--weights", "1,1"], "another base"),
    "other task": (lambda t: [_saved(t, "a", _lora(), 0, task="cls"), _labels_of_two(t)],
                   ["--combine", "linear", "--weights", "1,1"], "one task"),
    "other kind of task": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", _lora(), 1, task="cls")],
                           ["--combine", "linear", "--weights", "1,1"], "one task"),
    "ia3": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", {"method": "ia3"}, 1)],
            ["--combine", "linear", "--weights", "1,1"], "IA3 (ia3), which cannot be combined"),
    "prefix": (lambda t: [_saved(t, "a", {"method": "prefix"}, 0), _saved(t, "b", {"method": "prefix"}, 1)],
               ["--combine", "linear", "--weights", "1,1"], "prefix tuning (prefix), which cannot be combined"),
    "mixed methods": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", {"method": "houlsby"}, 1)],
                      ["--combine", "linear", "--weights", "1,1"], "one method"),
    "weights count": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", _lora(), 1)],
                      ["--combine", "linear", "--weights", "1,1,1"], "2 adapters, 3 weights"),
    "no weights": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", _lora(), 1)],
                   ["--combine", "linear"], "2 adapters, 0 weights"),
    "weights not numbers": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", _lora(), 1)],
                            ["--combine", "linear", "--weights", "half,half"], "numbers separated by commas"),
    "combine type": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", _lora(), 1)],
                     ["--combine", "average", "--weights", "1,1"],
                     "unknown combine type 'average'; valid: linear, svd, cat, ties, dare_ties, dare_linear"),
    "density zero": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", _lora(), 1)],
                     ["--combine", "ties", "--weights", "1,1", "--density", "0"], "density must be in (0, 1]"),
    "density above one": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", _lora(), 1)],
                          ["--combine", "dare_ties", "--weights", "1,1", "--density", "1.5"],
                          "density must be in (0, 1]"),
    "density missing": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", _lora(), 1)],
                        ["--combine", "ties", "--weights", "1,1"], "ties needs a density"),
    "density unused": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", _lora(), 1)],
                       ["--combine", "svd", "--weights", "1,1", "--density", "0.5"], "not svd"),
    "ranks": (lambda t: [_saved(t, "a", _lora(4), 0), _saved(t, "b", _lora(8), 1)],
              ["--combine", "linear", "--weights", "1,1"], "linear needs adapters of one rank"),
    "rslora": (lambda t: [_saved(t, "a", _lora(use_rslora=True), 0), _saved(t, "b", _lora(), 1)],
               ["--combine", "cat", "--weights", "1,1"], "rsLoRA"),
    "dora": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", _lora(use_dora=True), 1)],
             ["--combine", "cat", "--weights", "1,1"], "DoRA"),
    "one adapter": (lambda t: [_saved(t, "a", _lora(), 0)], ["--combine", "linear", "--weights", "1"],
                    "two or more adapters"),
    "stock peft folder": (lambda t: [_saved(t, "a", _lora(), 0), _stock_peft(t)],
                          ["--combine", "linear", "--weights", "1,1"], "not saved by peftkit"),
    "bottleneck configs": (lambda t: [_saved(t, "a", {"method": "pfeiffer", "bottleneck_size": 8}, 0),
                                      _saved(t, "b", {"method": "pfeiffer", "bottleneck_size": 4}, 1)],
                           ["--combine", "linear", "--weights", "1,1"], "differ in bottleneck_size"),
    "bottleneck ties": (lambda t: [_saved(t, "a", {"method": "houlsby"}, 0), _saved(t, "b", {"method": "houlsby"}, 1)],
                        ["--combine", "ties", "--weights", "1,1", "--density", "0.5"], "linear only"),
    "several runs, no --combine": (lambda t: [_saved(t, "a", _lora(), 0), _saved(t, "b", _lora(), 1)],
                                   ["--weights", "1,1"], "give --combine"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_get_one_error_line_and_write_nothing(tmp_path, capsys, case):
    folders, arguments, words = BAD[case]
    paths = [str(p) for p in folders(tmp_path)]
    before = sorted(tmp_path.iterdir())
    capsys.readouterr()
    assert main(["merge", *paths, *arguments, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit: error: ") and err.count("\n") == 1 and words in err, err
    assert sorted(tmp_path.iterdir()) == before


def test_the_command_combines_on_the_base_the_adapters_name(tmp_path, capsys):
    make_tiny("llama", "lm").save_pretrained(tmp_path / "base")
    load = lambda: peftkit.load_model(str(tmp_path / "base"))  # noqa: E731
    a, b = (_saved(tmp_path, f"a{n}", _lora(), seed=n, base=load()) for n in range(2))
    out = tmp_path / "combined"
    assert main(["merge", str(a), str(b), "--combine", "linear", "--weights", "0.5,0.5", "--out", str(out)]) == 0
    assert f"saved to {out}" in capsys.readouterr().out
    expected = peftkit.combine(load(), [a, b], "linear", [0.5, 0.5])
    torch.testing.assert_close(logits(peftkit.load_adapter(load(), out)), logits(expected), rtol=0, atol=1e-6)
