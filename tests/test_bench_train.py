"""`peftkit bench train`: the benchmark files, the Meter's counts, and a short run of every shipped table."""
import json
import math
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.bench.benchfile import LrSweep, load_bench, recipe_for, selected
from peftkit.bench.train import run
from peftkit.errors import PeftkitError
from peftkit.compiling import blocks_of
from peftkit.meter import Meter
from conftest import BERT, make_tiny, tiny_inputs

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "benchmarks").glob("train-*.yaml"))
# A handful of steps on a few rows: every variant trains, is evaluated and is measured.
SMOKE = {
    "sentiment": ["data.max_train_samples=48", "data.max_eval_samples=16", "train.max_steps=3",
                  "train.batch_size=8", "train.max_length=32"],
    "headlines": ["data.max_train_samples=24", "data.max_eval_samples=4", "train.max_steps=3",
                  "train.batch_size=4", "train.max_length=96", "train.max_new_tokens=4"],
}


def test_shipped_tables_cover_every_method_base_and_reference():
    assert {p.stem for p in SHIPPED} == {"train-sentiment", "train-headlines"}
    for path in SHIPPED:
        bench = load_bench(path)
        kinds = {(v.method, v.quantize) for v in bench.variants}
        for method in ("lora", "houlsby", "pfeiffer", "parallel", "prefix", "full", "reference"):
            assert (method, None) in kinds, (path.name, method)
        for method in ("lora", "houlsby"):
            assert {(method, "nf4"), (method, "8bit")} <= kinds, (path.name, method)
        for variant in bench.variants:  # every variant's recipe loads
            recipe_for(bench, variant)


def _bench_file(tmp_path, text: str) -> Path:
    path = tmp_path / "b.yaml"
    path.write_text(text)
    return path


def test_bench_file_errors_name_the_problem(tmp_path):
    head = "name: x\nrecipe: recipes/sentiment-lora.yaml\n"
    cases = [
        (head + "variants: {lora: {}}\ncolour: red\n", "unknown key colour; allowed: lr_sweep, name, overrides"),
        (head + "variants: {lora: {method: lorra}}\n", "unknown preset 'lorra'"),
        (head + "variants: {full: {quantize: nf4}}\n", "full runs on the unquantized base"),
        (head + "variants: {reference: {}}\n", "a reference variant needs `reference: path/to/script.py`"),
        (head + "variants: {reference: {}}\nreference: nowhere.py\n", "reference script .*nowhere.py does not exist"),
        ("name: x\nvariants: {lora: {}}\n", "missing key recipe"),
        (head + "variants: []\n", "variants must be a mapping"),
    ]
    for text, message in cases:
        with pytest.raises(PeftkitError, match=message):
            load_bench(_bench_file(tmp_path, text))
    with pytest.raises(PeftkitError, match="does not exist; shipped: .*train-sentiment.yaml"):
        load_bench(ROOT / "benchmarks" / "train-nothing.yaml")


def test_bad_variant_name_or_override_fails_before_anything_trains(tmp_path):
    bench = load_bench(SHIPPED[-1])
    with pytest.raises(PeftkitError, match="--only: no variant 'lorra'.*variants: lora, lora-attn-dropout, houlsby"):
        run(bench, only=["lorra"], out_dir=tmp_path, log_dir=tmp_path)
    with pytest.raises(PeftkitError, match="unknown key train.stepz"):
        run(bench, extra=["train.stepz=3"], out_dir=tmp_path, log_dir=tmp_path)
    assert not any(tmp_path.glob("*.md"))


def test_overrides_after_options_on_the_command_line_reach_every_variant(tmp_path, capsys):
    from peftkit.cli import main

    path = str(SHIPPED[-1])
    # the override comes after --only, as the README writes it; it must be read, not refused
    assert main(["bench", "train", path, "--only", "lora", "--out", str(tmp_path), "train.stepz=4"]) == 2
    assert "unknown key train.stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "train", path, "--only", "lora", "--bogus", "train.max_steps=4"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_meter_counts_model_flops_of_real_tokens_only_during_training_forwards():
    """FLOPs per the issue's formula, checked against a count from the tiny BERT's config: every
    token through 4 h^2 + 2 h i frozen weights and LoRA's 2 x 2 h r trainable ones per layer; the
    pooler and classifier see one row per sample. Padding is not counted; eval passes and
    recomputation after the forward (gradient checkpointing) are not either."""
    model = peftkit.attach(make_tiny("bert", "cls"), "lora")
    meter = Meter()
    meter.watch(model)
    # no hook inside a transformer block, where it would sit in train.compile's compiled code
    assert not any(m._forward_hooks or m._forward_pre_hooks for block in blocks_of(model)
                   for m in block.modules() if m is not block)
    batch = tiny_inputs(batch=2, length=10)  # one row has 3 padding positions
    model.train()
    model(**batch)
    h, i, layers, r, labels = BERT["hidden_size"], BERT["intermediate_size"], BERT["num_hidden_layers"], 8, 3
    tokens = int(batch["attention_mask"].sum())
    assert tokens == 17
    frozen, trainable = 4 * h * h + 2 * h * i, 2 * (h * r + r * h)  # LoRA on query and value
    pooler_trains = model.base_model.model.bert.pooler.dense.weight.requires_grad
    expected = (tokens * layers * (4 * frozen + 6 * trainable)
                + 2 * (4 + 2 * pooler_trains) * h * h + 2 * 6 * h * labels)
    assert meter.flops == expected
    assert (meter.samples, meter.tokens) == (2, 17)
    model.base_model.model.bert.pooler.dense(torch.zeros(1, h))  # as in a recomputation after the forward
    model.eval()
    model(**batch)
    assert meter.flops == expected and meter.samples == 2
    meter.unwatch()
    model.train()
    model(**batch)
    assert meter.flops == expected


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_variant_of_a_shipped_table_runs_and_is_measured(tmp_path, path):
    bench = load_bench(path)
    name = bench.name
    rows = run(bench, extra=SMOKE[name], out_dir=tmp_path, log_dir=tmp_path / "logs")
    assert [r["variant"] for r in rows] == [v.name for v in bench.variants]
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        assert r["steps"] == 3 and len(r["losses"]) == 3 and math.isfinite(r["final_loss"])
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["mfu"] < 1, r  # more than the measured peak would mean FLOPs counted that did not run
        assert r["peak_mb"] > r["baseline_mb"] > 0
        assert r["file_bytes"] > 0 and 0 < r["ratio"] <= 1
        assert 0.0 <= r["score"] <= 1.0
    lora, full, reference = by_name["lora"], by_name["full"], by_name["reference"]
    assert reference["trainable"] == lora["trainable"]  # the reference trains exactly what peftkit's LoRA does
    assert full["ratio"] == 1.0 and full["file_bytes"] > 50 * lora["file_bytes"]
    assert by_name["lora-nf4"]["quantize"] == "nf4" and by_name["houlsby-8bit"]["quantize"] == "8bit"
    stem = tmp_path / f"train-{name}-cpu"
    table = stem.with_suffix(".md").read_text()
    assert all(f"| {r['variant']} |" in table for r in rows) and "GFLOP/s" in table
    assert json.loads(stem.with_suffix(".json").read_text())["rows"][0]["variant"] == rows[0]["variant"]
    for plot in ("loss", "ratio"):
        assert (tmp_path / f"{stem.name}-{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_variant_keeps_the_others_results_and_is_named(tmp_path, monkeypatch):
    from peftkit.bench import train

    real = train.run_child

    def child(bench, variant, extra, log):
        if variant.name == "houlsby":
            log.write_text("Traceback: out of memory\n")
            raise PeftkitError(f"variant {variant.name} failed (exit 1); log {log}")
        return real(bench, variant, extra, log)

    monkeypatch.setattr(train, "run_child", child)
    bench = load_bench(ROOT / "benchmarks" / "train-sentiment.yaml")
    with pytest.raises(PeftkitError, match=r"1 of 3 variants failed: houlsby \(log .*houlsby"):
        run(bench, extra=SMOKE["sentiment"], only=["lora", "houlsby", "pfeiffer"], out_dir=tmp_path,
            log_dir=tmp_path / "logs")
    saved = json.loads((tmp_path / "train-sentiment-cpu.json").read_text())
    assert [r["variant"] for r in saved["rows"]] == ["lora", "pfeiffer"]
    assert saved["meta"]["failed"][0]["variant"] == "houlsby" and len(saved["meta"]["peak_readings"]) == 2
    table = (tmp_path / "train-sentiment-cpu.md").read_text()
    assert "| pfeiffer |" in table and "**Failed** (no row): houlsby" in table


def test_the_methods_tables_cover_every_registered_method_and_sweep_their_rates():
    from peftkit.methods import METHODS
    from peftkit.presets import resolve_spec

    for task in ("sentiment", "topic"):
        bench = load_bench(ROOT / "benchmarks" / f"methods-{task}.yaml")
        assert {resolve_spec(v.method).method for v in bench.variants} == set(METHODS), task
        assert all(bench.lr_sweep.swept(v) for v in bench.variants)
        assert [v.name for v in selected(bench, None, [])] == [v.name for v in bench.variants]  # every recipe loads


def test_a_swept_variant_trains_its_row_at_the_rate_that_scored_best_on_validation(tmp_path):
    path = _bench_file(tmp_path, "name: sw\nrecipe: recipes/sentiment-lora.yaml\n"
                                 "lr_sweep: {values: [1.0e-6, 3.0e-2], overrides: {train.max_steps: 2}}\n"
                                 "variants: {lora: {}, pfeiffer: {train.lr: 1.0e-3}}\n")
    rows = run(load_bench(path), extra=SMOKE["sentiment"], out_dir=tmp_path, log_dir=tmp_path / "logs")
    lora, pfeiffer = rows
    trials = lora["lr_sweep"]
    assert [t["lr"] for t in trials] == [1e-6, 3e-2] and all(t["steps"] == 2 for t in trials)
    assert lora["lr"] == LrSweep.best(trials)["lr"] and lora["steps"] == 3
    assert len({t["validation"] for t in trials}) == 2, "two rates 4 decades apart scored the same"
    assert "lr_sweep" not in pfeiffer and pfeiffer["lr"] == 1e-3  # a variant's own rate is kept
    table = (tmp_path / "train-sw-cpu.md").read_text()
    assert f"| no | {lora['lr']:g} (swept) |" in table and f"| {pfeiffer['precision']} | no | 0.001 |" in table
    assert "| variant | lr 1e-06 | lr 0.03 |" in table and "| lora | " in table.split("| variant | lr 1e-06")[1]
    assert sorted((tmp_path / "logs").glob("sw-lora-cpu.lr*.log"))  # each short run kept its log


def test_a_sweep_takes_the_best_score_and_breaks_near_ties_by_the_training_loss():
    def trials(*scores_and_losses):
        return [{"lr": lr, "validation": s, "final_loss": loss}
                for lr, (s, loss) in zip((3e-4, 3e-3, 3e-2), scores_and_losses)]
    # short runs that all predict the majority class: the loss tells the rates apart, a NaN ranks last
    assert LrSweep.best(trials((0.5792, 0.69), (0.5792, 0.61), (0.5807, math.nan)))["lr"] == 3e-3
    assert LrSweep.best(trials((0.5792, 0.69), (0.5792, 0.61), (0.5800, 0.55)))["lr"] == 3e-2
    # a clear lead in score wins over a lower loss
    assert LrSweep.best(trials((0.60, 0.69), (0.75, 0.65), (0.70, 0.40)))["lr"] == 3e-3
    # within the tie width, a slightly lower score with the lower loss wins; just outside it, it does not
    assert LrSweep.best(trials((0.75, 0.69), (0.745, 0.30), (0.70, 0.20)))["lr"] == 3e-3
    assert LrSweep.best(trials((0.75, 0.69), (0.739, 0.30), (0.70, 0.20)))["lr"] == 3e-4


def test_a_bad_lr_sweep_is_refused_naming_what_is_valid(tmp_path):
    head = "name: x\nrecipe: recipes/sentiment-lora.yaml\nvariants: {lora: {}}\n"
    cases = [("lr_sweep: [1.0e-3]\n", "lr_sweep must map values"),
             ("lr_sweep: {values: [1.0e-3], overrides: {}}\n", "two or more positive learning rates"),
             ("lr_sweep: {values: [1.0e-3, -1], overrides: {}}\n", "two or more positive"),
             ("lr_sweep: {values: [1.0e-3, 1.0e-2], overrides: {train.lr: 1}}\n", "other than train.lr"),
             ("lr_sweep: {values: [1.0e-3, 1.0e-2], overrides: {train.max_stepz: 4}}\n", "max_stepz")]
    for text, message in cases:
        with pytest.raises(PeftkitError, match=message):
            selected(load_bench(_bench_file(tmp_path, head + text)), None, [])
