"""Recipes: validation before work, a real end-to-end run, the CLI, resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from peftkit.errors import PeftkitError
from peftkit.recipe import RECIPES_DIR, load_recipe
from peftkit.train import train

TINY = ["data.max_train_samples=48", "data.max_eval_samples=16", "train.max_steps=3", "train.batch_size=8",
        "train.max_length=32", "train.logging_steps=1"]


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    from peftkit.presets import resolve_spec
    from peftkit.tasks import task_module
    recipe = load_recipe(str(path))
    assert recipe.name == path.stem
    resolve_spec(recipe.method)
    assert task_module(recipe.task).MODEL_TASK


def test_recipe_errors_name_the_problem(tmp_path):
    with pytest.raises(PeftkitError, match=r"unknown key train.epoch; allowed at this level: epochs, max_steps"):
        load_recipe("sentiment-lora", ["train.epoch=2"])
    with pytest.raises(PeftkitError, match="unknown key colour; allowed at this level: name, task"):
        load_recipe("sentiment-lora", ["colour=red"])
    with pytest.raises(PeftkitError, match="train.batch_size must be int, got 'many'"):
        load_recipe("sentiment-lora", ["train.batch_size=many"])
    with pytest.raises(PeftkitError, match="key=value"):
        load_recipe("sentiment-lora", ["train.epochs"])
    with pytest.raises(PeftkitError, match=r"override 'method=\{method: lora,': the value is not valid YAML"):
        load_recipe("sentiment-lora", ["method={method: lora,"])
    (tmp_path / "r.yaml").write_text("name: x\ntask: classification\nmethod: lora\ndata: {dataset: rotten_tomatoes}\n")
    with pytest.raises(PeftkitError, match="missing required key model"):
        load_recipe(str(tmp_path / "r.yaml"))
    with pytest.raises(PeftkitError, match="task must be one of classification, qa, generation"):
        load_recipe("sentiment-lora", ["task=translation"])
    with pytest.raises(PeftkitError, match="recipe nope does not exist; shipped recipes: .*sentiment-lora"):
        load_recipe("nope")
    assert load_recipe("sentiment-lora", ["train.lr=5e-4", "method=houlsby"]).train.lr == 5e-4


def test_data_errors_come_before_training(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"review": f"text {i}", "label": "good" if i % 2 else "bad"}) + "\n"
                            for i in range(30)))
    base = ["output_dir=" + str(tmp_path / "runs")]
    with pytest.raises(PeftkitError, match="has no column 'text'; its columns: review, label"):
        train(load_recipe("sentiment-lora", base + [f"data.dataset={rows}"]))
    with pytest.raises(PeftkitError, match=r"labels \['good'\] occur in .* but not in data.labels \['bad'\]"):
        train(load_recipe("sentiment-lora", base + [f"data.dataset={rows}", "data.text=review",
                                                    "data.labels=[bad]"]))
    with pytest.raises(PeftkitError, match="data file ./missing.csv does not exist"):
        train(load_recipe("sentiment-lora", base + ["data.dataset=./missing.csv"]))
    with pytest.raises(PeftkitError, match="model 'no such model' is neither a local path"):
        train(load_recipe("sentiment-lora", base + ["model=no such model"]))
    with pytest.raises(PeftkitError, match="model_config.attention_dropout is not a setting of minilm-l6's config "
                                           r"\(bert\); did you mean attention_probs_dropout_prob"):
        train(load_recipe("sentiment-lora", base + ["model_config.attention_dropout=0.0"]))
    with pytest.raises(PeftkitError, match="model_config.hidden_dropout_prob must be a float like the config's "
                                           "own value 0.1, got 'none'"):
        train(load_recipe("sentiment-lora", base + ["model_config.hidden_dropout_prob=none"]))
    with pytest.raises(PeftkitError, match="model_config.num_labels is set by the classification task"):
        train(load_recipe("sentiment-lora", base + ["model_config.num_labels=3"]))
    assert not (tmp_path / "runs" / "sentiment-lora").exists()


def test_train_eval_predict_end_to_end(tmp_path):
    from peftkit.runs import open_run
    run_dir = train(load_recipe("sentiment-lora", TINY + [f"output_dir={tmp_path}"]))
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "metrics.json", "peftkit.json",
                     "recipe.yaml", "tensorboard", "train_log.jsonl", "training.png"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["base"]) == set(metrics["adapted"]) == {"accuracy", "macro_f1"}
    assert 0 < metrics["trainable_ratio"] < 0.01 and metrics["train_samples_per_second"] > 0
    # Seeds are fixed before the head is built: the same recipe gives the same run.
    again_dir = train(load_recipe("sentiment-lora", TINY + [f"output_dir={tmp_path / 'again'}"]))
    assert (again_dir / "adapter_model.safetensors").read_bytes() == (run_dir / "adapter_model.safetensors").read_bytes()
    assert json.loads((again_dir / "metrics.json").read_text())["adapted"] == metrics["adapted"]
    run = open_run(run_dir)
    again = run.evaluate("test")
    assert again == pytest.approx(metrics["adapted"])
    out = run.predict([{"text": "a wonderful, moving film"}, {"text": "dull and lifeless"}])
    assert [set(r) for r in out] == [{"label", "score"}] * 2 and out[0]["label"] in ("rotten", "fresh")

    # A failed run leaves the finished one as it was.
    before = (run_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(PeftkitError):
        train(load_recipe("sentiment-lora", TINY + [f"output_dir={tmp_path}", "data.text=nope"]))
    assert (run_dir / "adapter_model.safetensors").read_bytes() == before

    cli = [sys.executable, "-m", "peftkit.cli"]
    done = subprocess.run(cli + ["predict", str(run_dir), "--input", "-"], input='{"text": "great fun"}\n',
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip())["label"] in ("rotten", "fresh")
    bad = subprocess.run(cli + ["predict", str(run_dir), "--input", "-"], input="not json\n",
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "input line 1 is not JSON" in bad.stderr
    listing = subprocess.run(cli + ["presets"], capture_output=True, text=True, check=True).stdout
    assert "houlsby" in listing and "qlora" in listing


def test_model_config_reaches_training_and_the_reopened_run(tmp_path):
    from peftkit.attach import attach
    from peftkit.runs import open_run
    from peftkit.train import set_up
    no_dropout = ["model_config={attention_probs_dropout_prob: 0.0, hidden_dropout_prob: 0.0}",
                  "method={method: lora, lora_dropout: 0.0}"]

    def train_mode_outputs(model, tokenizer):
        batch = tokenizer(["a fine, moving film", "flat"], padding=True, return_tensors="pt")
        model.train()
        with torch.no_grad():
            return model(**batch).logits, model(**batch).logits

    default = set_up(load_recipe("sentiment-lora", TINY))
    first, second = train_mode_outputs(attach(default.model, "lora"), default.tokenizer)
    assert not torch.equal(first, second)  # dropout draws differ from pass to pass
    recipe = load_recipe("sentiment-lora", TINY + no_dropout + [f"output_dir={tmp_path}"])
    setup = set_up(recipe)
    first, second = train_mode_outputs(attach(setup.model, recipe.method), setup.tokenizer)
    assert torch.equal(first, second)  # nothing left to drop: the settings reached every layer
    run = open_run(train(recipe))
    assert run.recipe.model_config == {"attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0}
    with run.computing():  # as it trained: a bf16 run's base is stored in bf16
        first, second = train_mode_outputs(run.model, run.tokenizer)
    assert torch.equal(first, second)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    steps = ["data.max_train_samples=96", "data.max_eval_samples=32", "train.max_steps=12", "train.eval_steps=4",
             "train.batch_size=8", "train.max_length=32", "train.logging_steps=1", "train.lr=2e-3"]
    cli = [sys.executable, "-m", "peftkit.cli", "train", "sentiment-lora"]
    whole = tmp_path / "whole"
    subprocess.run(cli + steps + [f"output_dir={whole}"], check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli + steps + [f"output_dir={killed}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoint = killed / ".sentiment-lora.work" / "checkpoints" / "checkpoint-8"
    deadline = time.time() + 300
    while not (checkpoint / "trainer_state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "sentiment-lora").exists(), "the run finished before it could be killed"
    assert "base_model" not in " ".join(p.name for p in checkpoint.iterdir())  # adapter + optimizer only
    subprocess.run(cli + steps + [f"output_dir={killed}", "--resume"], check=True, capture_output=True)
    resumed = json.loads((killed / "sentiment-lora" / "metrics.json").read_text())
    reference = json.loads((whole / "sentiment-lora" / "metrics.json").read_text())
    # Same data order, optimizer and schedule state; dropout draws after the restart
    # differ, so the result agrees within noise (two of the 32 test examples), not bit for bit.
    assert resumed["adapted"]["accuracy"] == pytest.approx(reference["adapted"]["accuracy"], abs=2 / 32 + 1e-9)
    log = [json.loads(line) for line in (killed / "sentiment-lora" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "loss" in row] == list(range(1, 13))  # one history, no step twice


def test_trainer_trains_peftkit_adapters_on_a_quantized_base(tmp_path):
    """transformers' Trainer accepts a quantized model only with peft adapters; peftkit's own
    (bottleneck, prefix) train through it too, and only they change."""
    import torch
    from transformers import TrainingArguments

    import peftkit
    from peftkit.train import AdapterTrainer
    from conftest import make_tiny

    make_tiny("llama", "cls").save_pretrained(tmp_path / "tiny")
    model = peftkit.attach(peftkit.load_model(str(tmp_path / "tiny"), task="classification", quantize="nf4"),
                           "houlsby", gradient_checkpointing=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"input_ids": [5 + i, 9, 11 + i], "labels": i % 3} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no")
    AdapterTrainer(model=model, args=args, train_dataset=rows).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not model._hf_peft_config_loaded  # the flag was only lent for transformers' check
