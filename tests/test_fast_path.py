"""The machine's fast path: bf16 where native, the frozen base stored in bf16, the cheap CPU
dropout, the attention kernel choice. Each stays close to fp32, and switched off, leaves the
fp32 path exactly as it was."""
import statistics
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit import precision
from peftkit.bench.seeds import paired, parse_seeds
from peftkit.dropout import FastDropout, keep_mask, swap_in_fast_dropout
from peftkit.errors import PeftkitError
from peftkit.methods import METHODS
from peftkit.recipe import load_recipe

from conftest import make_tiny, tiny_inputs
from test_methods_registry import spec_of

TINY = ["data.max_train_samples=48", "data.max_eval_samples=16", "train.max_steps=3", "train.batch_size=8",
        "train.max_length=32", "train.logging_steps=1"]


# ---------------------------------------------------------------------------- precision

def test_auto_takes_bf16_exactly_where_the_hardware_has_it(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert precision.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert precision.resolve_precision("auto") == "fp32"
    assert precision.resolve_precision("bf16") == "bf16"  # asked for: honoured (emulated, and said so)
    assert "no native bf16" in precision.describe("fp32")


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16 avx2\n")
    monkeypatch.setattr(precision, "Path", lambda _: info)
    precision.cpu_bf16_flags.cache_clear()  # it reads the file once per process
    try:
        assert precision.cpu_bf16_flags() == ["avx512_bf16"]
        info.write_text("processor : 0\nflags : fpu sse avx2\n")
        precision.cpu_bf16_flags.cache_clear()
        assert precision.cpu_bf16_flags() == []
    finally:
        precision.cpu_bf16_flags.cache_clear()  # later tests read the real CPU


def test_bad_precision_is_refused_before_any_work():
    with pytest.raises(PeftkitError, match="train.precision must be one of auto, fp32, bf16, got 'fp16'"):
        load_recipe("sentiment-lora", ["train.precision=fp16"])
    with pytest.raises(PeftkitError, match="train.fast_dropout must be bool"):
        load_recipe("sentiment-lora", ["train.fast_dropout=sometimes"])
    with pytest.raises(PeftkitError, match="train.precision must be one of"):
        precision.resolve_precision("half")


def _lora_bert():
    model = peftkit.attach(make_tiny("bert", "cls"), "lora")
    return model


def test_storing_the_frozen_base_in_bf16_leaves_what_trains_in_fp32():
    model = _lora_bert()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert precision.store_frozen_in_bf16(model, "fp32") == 0
    changed = precision.store_frozen_in_bf16(model, "bf16")
    assert changed == sum(1 for p in model.parameters() if not p.requires_grad)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if name in trainable else torch.bfloat16), name
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)


def test_bf16_logits_and_training_stay_close_to_fp32():
    batch = tiny_inputs(batch=4, length=12) | {"labels": torch.tensor([0, 1, 2, 1])}
    runs = {}
    for mode in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = _lora_bert()
        for module in model.modules():  # dropout off: the two runs must see the same computation
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        precision.store_frozen_in_bf16(model, mode)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        model.train()
        for _ in range(5):
            with precision.compute(mode):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad(), precision.compute(mode):
            runs[mode] = (losses, model(**batch).logits.float())
    (fp32_losses, fp32_logits), (bf16_losses, bf16_logits) = runs["fp32"], runs["bf16"]
    assert fp32_losses[-1] < fp32_losses[0]  # it learns, so the comparison means something
    torch.testing.assert_close(torch.tensor(bf16_losses), torch.tensor(fp32_losses), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(bf16_logits, fp32_logits, rtol=5e-2, atol=5e-2)


def test_leaving_peft_inputs_in_bf16_changes_no_loss_or_gradient():
    """Under autocast, LoRA's matmuls run in bf16 either way; peft's cast to fp32 and back only costs.
    Without dropout, loss and gradients are the same bit for bit."""
    model = peftkit.attach(make_tiny("bert", "cls"), "lora").eval()  # no dropout: the same graph twice
    precision.store_frozen_in_bf16(model, "bf16")
    torch.manual_seed(0)
    with torch.no_grad():  # as after some training: with B at its zero init, A's gradients are only noise
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    batch = {**tiny_inputs(), "labels": torch.tensor([0, 2])}
    runs = []
    for cast in (True, False):
        model.zero_grad()
        with precision.compute("bf16"), precision.inputs_as_they_come([] if cast else precision.input_cast_switches(model)):
            loss = model(**batch).loss
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (cast_loss, cast_grads), (kept_loss, kept_grads) = runs
    torch.testing.assert_close(kept_loss, cast_loss, rtol=0, atol=0)
    for kept, cast in zip(kept_grads, cast_grads):
        torch.testing.assert_close(kept, cast, rtol=0, atol=0)


@pytest.mark.parametrize("name", [m.name for m in METHODS.values() if m.peft_native])
def test_every_peft_method_trains_a_step_in_bf16_with_its_inputs_left_as_they_come(name):
    """peft's own disable_input_dtype_casting raised on IA3's layers, which lack its switch; a step of
    every peft method under bf16 autocast (as the trainer runs it) works, and the switches come back."""
    model = peftkit.attach(make_tiny("bert", "cls"), spec_of(name))
    precision.store_frozen_in_bf16(model, "bf16")
    switches = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    with precision.compute("bf16", model):
        assert not any(m.cast_input_dtype_enabled for m in switches)
        loss = model(**tiny_inputs(), labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert all(m.cast_input_dtype_enabled for m in switches)
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- dropout

def test_fast_dropout_drops_with_probability_p_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(1_000_003)  # not a multiple of 4: the last 64-bit draw is cut
    for p in (0.05, 0.1, 0.5):
        out = FastDropout(p).train()(x)
        dropped = (out == 0).float().mean().item()
        assert abs(dropped - p) < 0.002, (p, dropped)
        assert abs(out.mean().item() - 1.0) < 0.005
        values = out.unique()
        assert len(values) == 2 and values[0] == 0.0 and values[1].item() == pytest.approx(1 / (1 - p))


def test_fast_dropout_masks_are_independent_across_the_four_cuts_of_a_draw():
    torch.manual_seed(1)
    mask = keep_mask(torch.ones(400_000), 0.5).view(-1, 4)
    kept = mask.mean(0)
    assert torch.all((kept - 0.5).abs() < 0.01)
    together = (mask[:, 0] * mask[:, 1]).mean().item()  # independent halves: a quarter kept in both
    assert abs(together - 0.25) < 0.01


def test_fast_dropout_is_seeded_differentiable_and_the_identity_in_eval():
    x = torch.randn(6, 7, 9, dtype=torch.bfloat16, requires_grad=True)
    layer = FastDropout(0.2).train()
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)
    first.float().sum().backward()
    expected = (first != 0).to(x.dtype) * (1 / 0.8)
    torch.testing.assert_close(x.grad, expected)
    assert first.dtype == torch.bfloat16
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.count_nonzero(FastDropout(1.0).train()(x)) == 0


def test_swapping_in_fast_dropout_changes_no_evaluation_output():
    model = make_tiny("bert", "cls")
    inputs = tiny_inputs()
    with torch.no_grad():
        before = model(**inputs).logits
    count = swap_in_fast_dropout(model)
    assert count == sum(1 for m in model.modules() if isinstance(m, FastDropout)) > 0
    assert not any(type(m) is nn.Dropout for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


# ---------------------------------------------------------------------------- the recipe path

def _trained_lora_weights(overrides, plain: bool = False) -> dict:
    """Train TINY steps through make_trainer, or (`plain`) through AdapterTrainer built as it was
    before the fast path existed; the LoRA weights after."""
    from peftkit.train import _arguments, make_trainer, set_up
    from peftkit.trainer import AdapterTrainer

    recipe = load_recipe("sentiment-lora", TINY + overrides)
    setup = set_up(recipe)
    model = peftkit.attach(setup.model, recipe.method)
    with tempfile.TemporaryDirectory() as work:
        if plain:
            trainer = AdapterTrainer(model=model, args=_arguments(recipe, Path(work), "fp32", save=False),
                                     data_collator=setup.prepared.collator, train_dataset=setup.prepared.train)
        else:
            trainer = make_trainer(recipe, setup, model, Path(work), save=False)
            assert trainer.args.bf16 == (setup.precision == "bf16")
        trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_with_every_default_off_training_is_the_fp32_path_bit_for_bit():
    off = ["train.precision=fp32", "train.fast_dropout=false"]
    fast_path_off = _trained_lora_weights(off)
    before = _trained_lora_weights(off, plain=True)
    assert fast_path_off.keys() == before.keys()
    for name in before:
        assert torch.equal(fast_path_off[name], before[name]), name


def test_the_bf16_recipe_path_trains_close_to_fp32():
    fp32 = _trained_lora_weights(["train.precision=fp32", "train.fast_dropout=false",
                                  "model_config.hidden_dropout_prob=0.0"])
    bf16 = _trained_lora_weights(["train.precision=bf16", "train.fast_dropout=false",
                                  "model_config.hidden_dropout_prob=0.0"])
    assert any("lora_B" in name for name in fp32)
    for name in fp32:
        assert bf16[name].dtype == torch.float32  # master weights stay fp32
        # Adam's steps are sign-like for tiny gradients: compare whole tensors, not single elements
        gap = (bf16[name] - fp32[name]).norm() / fp32[name].norm()
        assert gap < 0.15, (name, gap.item())  # a wrong bf16 path lands near 1


# ---------------------------------------------------------------------------- paired seeds

def test_seed_lists_parse_and_bad_ones_are_refused():
    assert parse_seeds("1-4") == [1, 2, 3, 4]
    assert parse_seeds("42,1-2,42") == [42, 1, 2]
    for bad in ("a-b", "1-", ""):
        with pytest.raises(PeftkitError, match="--seeds"):
            parse_seeds(bad)


def test_the_paired_interval_is_a_t_interval_over_seed_differences():
    rows = []
    for seed, (a, b) in enumerate([(0.80, 0.79), (0.82, 0.80), (0.81, 0.815), (0.79, 0.78)], start=1):
        rows += [{"variant": "lora", "seed": seed, "score": a, "samples_per_s": 150.0 + seed, "peak_mb": 1000.0},
                 {"variant": "ref", "seed": seed, "score": b, "samples_per_s": 100.0, "peak_mb": 1100.0}]
    p = paired(rows, "lora", "ref")
    diffs = [0.01, 0.02, -0.005, 0.01]
    assert p["diffs"] == pytest.approx(diffs)
    half = 3.182 * statistics.stdev(diffs) / 2  # t(0.975, 3 df) * sd / sqrt(4)
    assert (p["low"], p["high"]) == (pytest.approx(statistics.fmean(diffs) - half),
                                     pytest.approx(statistics.fmean(diffs) + half))
    assert p["speed"] == pytest.approx([1.51, 1.52, 1.53, 1.54])
    assert p["memory"] == pytest.approx([1000 / 1100] * 4)
    assert paired(rows, "lora", "nobody") is None


def test_a_seeds_run_reports_mfu_against_the_best_peak_of_each_rows_compute_dtype(tmp_path, monkeypatch):
    import json

    from peftkit.bench import machine, train
    from peftkit.bench.benchfile import load_bench, selected
    from peftkit.bench.seeds import run_seeds

    readings = iter([{"fp32": 100e9, "bf16": 400e9}, {"fp32": 90e9, "bf16": 500e9}])  # before, after
    monkeypatch.setattr(machine, "matmul_peaks", lambda device: next(readings))

    def child(bench, variant, extra, log):  # no training: the rows a child would report
        seed = int(extra[-1].split("=")[1])
        precision = "bf16" if variant.name == "lora" else "fp32"
        return {"variant": variant.name, "precision": precision, "model_flops_per_s": 50e9 * seed,
                "samples_per_s": 10.0, "peak_mb": 1000.0, "score": 0.8, "metric": "accuracy"}

    monkeypatch.setattr(train, "run_child", child)
    bench = load_bench(Path(__file__).resolve().parent.parent / "benchmarks" / "train-sentiment.yaml")
    variants = selected(bench, ["lora", "reference"], [])
    run_seeds(bench, [1, 2], [], variants, tmp_path, tmp_path / "logs", against="reference")
    saved = json.loads((tmp_path / "train-sentiment-cpu-seeds.json").read_text())
    mfu = {(r["variant"], r["seed"]): r["mfu"] for r in saved["rows"]}
    assert mfu == pytest.approx({("lora", 1): 0.1, ("lora", 2): 0.2, ("reference", 1): 0.5, ("reference", 2): 1.0})
    assert saved["meta"]["peak_matmul_flops"] == {"fp32": 100e9, "bf16": 500e9}
    table = (tmp_path / "train-sentiment-cpu-seeds.md").read_text()
    assert "| lora | 0.15 | 0.10-0.20 |" in table and "bf16 500.0 GFLOP/s" in table
