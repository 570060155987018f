"""Training as practitioners do it: validation passes, the best adapter kept, early stopping,
resume with the best-so-far state, TensorBoard files, bad settings refused, DDP on 2 processes."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import peftkit.tasks.classification as classification
from peftkit.errors import PeftkitError
from peftkit.recipe import load_recipe
from peftkit.train import train
from peftkit.trainer import AdapterTrainer

TINY = ["data.max_train_samples=64", "data.max_eval_samples=16", "train.batch_size=8", "train.max_length=32",
        "train.logging_steps=1", "train.lr=2e-3"]
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def scripted(monkeypatch):
    """Validation accuracy follows a script (one value per pass); the test split is scored for real."""
    real, script = classification.evaluate, []

    def evaluate(model, tokenizer, dataset, recipe, desc="evaluating"):
        scores = real(model, tokenizer, dataset, recipe, desc)
        return {**scores, "accuracy": script.pop(0)} if desc == "validation" else scores
    monkeypatch.setattr(classification, "evaluate", evaluate)
    return script


@pytest.fixture
def checkpoints(monkeypatch, tmp_path):
    """Keeps a copy of each checkpoint's adapter (the run deletes its checkpoints when it ends)."""
    kept, save = tmp_path / "copies", AdapterTrainer._save

    def copy(self, output_dir=None, state_dict=None):
        save(self, output_dir, state_dict)
        shutil.copy(Path(output_dir) / WEIGHTS, kept / f"{self.state.global_step}.safetensors")
    kept.mkdir()
    monkeypatch.setattr(AdapterTrainer, "_save", copy)
    return kept


def _equal(a: Path, b: Path) -> bool:
    left, right = load_file(a), load_file(b)
    return left.keys() == right.keys() and all((left[k] == right[k]).all() for k in left)


def test_the_kept_adapter_is_the_checkpoint_at_the_best_step(tmp_path, scripted, checkpoints):
    scripted += [0.5, 0.9, 0.6, 0.7]
    run = train(load_recipe("sentiment-lora", TINY + ["train.max_steps=4", "train.eval_steps=1",
                                                       f"output_dir={tmp_path / 'best'}"]))
    metrics = json.loads((run / "metrics.json").read_text())
    assert [(row["step"], row["accuracy"]) for row in metrics["validation"]] == [(1, .5), (2, .9), (3, .6), (4, .7)]
    assert metrics["best_step"] == 2 and metrics["kept"] == "best" and metrics["kept_validation"]["accuracy"] == 0.9
    assert metrics["stopped_step"] == 4 and metrics["world_size"] == 1
    assert _equal(run / WEIGHTS, checkpoints / "2.safetensors")
    assert not _equal(run / WEIGHTS, checkpoints / "4.safetensors")  # the steps after it did change the adapter
    # the test scores reported are the kept adapter's
    from peftkit.runs import open_run
    assert open_run(run).evaluate("test") == pytest.approx(metrics["adapted"])
    assert (run / "training.png").read_bytes()[:4] == b"\x89PNG"

    for copy in checkpoints.iterdir():
        copy.unlink()
    scripted += [0.5, 0.9, 0.6, 0.7]
    run = train(load_recipe("sentiment-lora", TINY + ["train.max_steps=4", "train.eval_steps=1", "train.keep=last",
                                                       f"output_dir={tmp_path / 'last'}"]))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kept"] == "last" and metrics["best_step"] == 2 and metrics["kept_validation"]["accuracy"] == 0.7
    assert _equal(run / WEIGHTS, checkpoints / "4.safetensors")


def test_early_stopping_ends_a_run_that_cannot_improve(tmp_path, scripted):
    scripted += [0.6] * 10
    run = train(load_recipe("sentiment-lora", TINY + ["train.max_steps=10", "train.eval_steps=1",
                                                       "train.early_stopping_patience=2", f"output_dir={tmp_path}"]))
    metrics = json.loads((run / "metrics.json").read_text())
    # the first pass sets the best; the next two do not beat it
    assert metrics["stopped_step"] == 3 and metrics["planned_steps"] == 10 and metrics["best_step"] == 1
    assert len(metrics["validation"]) == 3
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in log) == 3


def test_stop_after_steps_trains_the_first_steps_of_the_whole_runs_schedule(tmp_path):
    """A sweep's short run: the same steps, losses and learning rates as the first steps of the whole run
    (max_steps would have decayed the rate over the short run instead)."""
    def logged(run):  # the training steps' rows (the Trainer's closing summary row has no loss)
        rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        return [r for r in rows if "loss" in r]
    settings = TINY + ["train.max_steps=8", "train.eval_steps=0", "train.warmup_ratio=0.25"]
    whole = logged(train(load_recipe("sentiment-lora", settings + [f"output_dir={tmp_path / 'whole'}"])))
    run = train(load_recipe("sentiment-lora", settings + ["train.stop_after_steps=3",
                                                          f"output_dir={tmp_path / 'cut'}"]))
    metrics, cut = json.loads((run / "metrics.json").read_text()), logged(run)
    assert metrics["stopped_step"] == 3 and metrics["planned_steps"] == 8
    assert [r["step"] for r in cut] == [1, 2, 3]
    assert [(r["loss"], r["learning_rate"]) for r in cut] == [(r["loss"], r["learning_rate"]) for r in whole[:3]]
    shortened = logged(train(load_recipe("sentiment-lora", TINY + ["train.max_steps=3", "train.eval_steps=0",
                                                                   "train.warmup_ratio=0.25",
                                                                   f"output_dir={tmp_path / 'short'}"])))
    assert shortened[2]["learning_rate"] < cut[2]["learning_rate"]  # max_steps decays over the short run


def test_a_run_stopped_early_validates_and_saves_its_last_step(tmp_path, scripted, checkpoints):
    """Stopped between passes (every 2 steps, stopped at 3), the last step still gets its pass and its
    checkpoint, as a whole run's last step does: keep: best may keep it."""
    scripted += [0.5, 0.9]
    run = train(load_recipe("sentiment-lora", TINY + ["train.max_steps=8", "train.eval_steps=2",
                                                       "train.stop_after_steps=3", f"output_dir={tmp_path}"]))
    metrics = json.loads((run / "metrics.json").read_text())
    assert [row["step"] for row in metrics["validation"]] == [2, 3]
    assert metrics["best_step"] == 3 and metrics["stopped_step"] == 3 and metrics["kept_validation"]["accuracy"] == 0.9
    assert _equal(run / WEIGHTS, checkpoints / "3.safetensors")


def test_any_trainer_refuses_a_stop_after_past_the_runs_end():
    """The bench's reference scripts plan their own steps; StopAfter checks against them before step 1."""
    from transformers import TrainerControl, TrainerState

    from peftkit.trainer import StopAfter
    with pytest.raises(PeftkitError, match=r"^train.stop_after_steps 5 is longer than the run \(4 optimizer steps\)"):
        StopAfter(5).on_train_begin(None, TrainerState(max_steps=4), TrainerControl())
    StopAfter(4).on_train_begin(None, TrainerState(max_steps=4), TrainerControl())


def test_resume_keeps_the_best_so_far_and_the_patience_count(tmp_path, scripted, checkpoints, monkeypatch):
    settings = TINY + ["train.max_steps=10", "train.eval_steps=1", "train.early_stopping_patience=3",
                       f"output_dir={tmp_path}"]
    scripted += [0.5, 0.9, 0.6, 0.7]
    save = AdapterTrainer._save

    def crash_in_checkpoint_4(self, output_dir=None, state_dict=None):
        save(self, output_dir, state_dict)
        if self.state.global_step == 4:
            raise KeyboardInterrupt  # the machine went away while checkpoint 4 was half written
    monkeypatch.setattr(AdapterTrainer, "_save", crash_in_checkpoint_4)
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe("sentiment-lora", settings))
    assert not (tmp_path / "sentiment-lora").exists()

    monkeypatch.setattr(AdapterTrainer, "_save", save)
    scripted += [0.65, 0.8, 0.9, 0.95]  # resumed from checkpoint 3: passes at 4 and 5 do not beat 0.9
    run = train(load_recipe("sentiment-lora", settings), resume=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_step"] == 2 and metrics["stopped_step"] == 5  # passes at 3, 4, 5 did not improve
    assert [row["step"] for row in metrics["validation"]] == [1, 2, 3, 4, 5]
    assert _equal(run / WEIGHTS, checkpoints / "2.safetensors")
    assert scripted == [0.9, 0.95]


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = train(load_recipe("sentiment-lora", TINY + ["train.max_steps=4", "train.eval_steps=2",
                                                       f"output_dir={tmp_path}"]))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/learning_rate", "eval/accuracy", "eval/macro_f1"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/accuracy")] == [2, 4]
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e.value for e in events.Scalars("eval/accuracy")] == pytest.approx(
        [row["accuracy"] for row in metrics["validation"]])


@pytest.mark.parametrize("settings, message", [
    (["train.max_steps=4", "train.eval_steps=9"], r"train.eval_steps 9 is longer than the run \(4 optimizer steps\)"),
    (["train.eval_steps=0", "train.early_stopping_patience=2"], "early_stopping_patience needs validation"),
    (["train.metric_for_best=rouge_l"], "metric_for_best 'rouge_l' is not a classification metric; choose one of "
                                        "accuracy, macro_f1"),
    (["train.report_to=[wandb]"], "report_to names wandb, but its package is not installed: pip install wandb"),
    (["train.report_to=[tensorbored]"], "unknown tracker 'tensorbored'; choose from tensorboard, wandb"),
    (["train.keep=first"], "train.keep must be best or last"),
    (["train.stop_after_steps=0"], "train.stop_after_steps must be a positive number of optimizer steps"),
    (["train.max_steps=4", "train.stop_after_steps=5"], r"train.stop_after_steps 5 is longer than the run \(4 "
                                                         r"optimizer steps\); set it to at most 4"),
])
def test_bad_training_settings_are_refused_before_training(tmp_path, settings, message, monkeypatch):
    started = []
    monkeypatch.setattr(AdapterTrainer, "train", lambda self, *a, **k: started.append(1))
    with pytest.raises(PeftkitError, match=message):
        train(load_recipe("sentiment-lora", TINY + settings + [f"output_dir={tmp_path}"]))
    assert not started and not (tmp_path / "sentiment-lora").exists()


def _first_logged_step(run: Path) -> dict:
    return json.loads((run / "train_log.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("recipe, settings", [
    ("sentiment-lora", ["data.max_train_samples=16", "data.max_eval_samples=16", "train.max_length=32"]),
    ("headlines-lora", ["data.max_train_samples=8", "data.max_eval_samples=2", "train.max_new_tokens=4"]),
])
def test_two_process_ddp_writes_one_run_with_single_process_losses(tmp_path, recipe, settings):
    """Step 1 takes every training row, in 2 processes x half a batch as in one process x the
    whole: the logged loss is the same per-sample (per-token) mean, not a sum over processes."""
    rows = int(settings[0].split("=")[1])
    common = [*settings, "train.max_steps=2", "train.eval_steps=2", "train.logging_steps=1", "train.seed=3"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "peftkit",
                          "train", recipe, *common, f"train.batch_size={rows // 2}", f"output_dir={tmp_path / 'ddp'}"],
                         capture_output=True, text=True, timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("run          ") == 1  # one summary, from the main process
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [recipe]  # one run folder, no work folder left
    metrics = json.loads((tmp_path / "ddp" / recipe / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["validation"]) == 1
    single = train(load_recipe(recipe, common + [f"train.batch_size={rows}", f"output_dir={tmp_path / 'one'}"]))
    two, one = _first_logged_step(tmp_path / "ddp" / recipe), _first_logged_step(single)
    # equal up to dropout's draws, which differ between the two layouts (a sum over 2 processes is 2x)
    assert two["loss"] == pytest.approx(one["loss"], rel=0.02)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=0.05)


@pytest.fixture
def allocations(monkeypatch):
    """(step, every AdaLoRA singular value has a gradient) per call of peft's update_and_allocate."""
    from peft.tuners.adalora import AdaLoraModel

    calls, real = [], AdaLoraModel.update_and_allocate

    def record(self, global_step):
        grads = [p.grad for n, p in self.model.named_parameters() if "lora_E" in n]
        calls.append((global_step, all(g is not None and g.abs().sum() > 0 for g in grads)))
        return real(self, global_step)
    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", record)
    return calls


def test_adalora_reallocates_its_ranks_after_each_optimizer_step_and_keeps_the_best_steps_ranks(
        tmp_path, scripted, checkpoints, allocations):
    scripted += [0.5, 0.9, 0.6, 0.7]
    run = train(load_recipe("sentiment-lora", TINY + ["method=adalora", "train.max_steps=4", "train.eval_steps=1",
                                                       f"output_dir={tmp_path}"]))
    # once per optimizer step, counted from 1, with the step's gradients still there (before zero_grad)
    assert allocations == [(1, True), (2, True), (3, True), (4, True)]
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["total_step"] == 4  # left out by the preset: the run's steps
    kept = {name: sum(ranks) for name, ranks in config["rank_pattern"].items()}
    assert len(kept) == 12 and sum(kept.values()) < 12 * 12, "no rank was cut from init_r=12"
    assert len(set(kept.values())) > 1, "every layer kept the same rank: nothing was allocated"
    # the kept adapter is step 2's, cut to the ranks it had then (not the ones the run reached by step 4)
    assert json.loads((tmp_path / "sentiment-lora" / "metrics.json").read_text())["best_step"] == 2
    assert _equal(run / WEIGHTS, checkpoints / "2.safetensors")
    from peftkit.runs import open_run
    assert open_run(run).evaluate("test") == pytest.approx(json.loads((run / "metrics.json").read_text())["adapted"])


def test_adalora_runs_are_not_resumed(tmp_path):
    with pytest.raises(PeftkitError, match="--resume: adalora reallocates ranks by importance scores .* start it "
                                           "again without --resume"):
        train(load_recipe("sentiment-lora", TINY + ["method=adalora", f"output_dir={tmp_path}"]), resume=True)


def test_p_tuning_keeps_the_prompt_of_the_best_step(tmp_path, scripted, checkpoints):
    """A p-tuning checkpoint holds the prompt its encoder made, not the encoder: the kept adapter is
    that prompt as it was, and the test scores are the kept prompt's."""
    scripted += [0.5, 0.9, 0.6]
    run = train(load_recipe("sentiment-lora", TINY + ["method=p_tuning", "train.max_steps=3", "train.eval_steps=1",
                                                       f"output_dir={tmp_path}"]))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_step"] == 2
    assert _equal(run / WEIGHTS, checkpoints / "2.safetensors")
    assert not _equal(run / WEIGHTS, checkpoints / "3.safetensors")
    from peftkit.runs import open_run
    assert open_run(run).evaluate("test") == pytest.approx(metrics["adapted"])


def test_p_tuning_runs_are_not_resumed(tmp_path):
    with pytest.raises(PeftkitError, match="--resume: p_tuning saves the prompt its encoder made, not the encoder, "
                                           "so the run cannot go on training it; start it again without --resume"):
        train(load_recipe("sentiment-lora", TINY + ["method=p_tuning", f"output_dir={tmp_path}"]), resume=True)
