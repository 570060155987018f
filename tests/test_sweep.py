"""`peftkit sweep`: a grid picks its best by validation and tests only that trial; bad input fails
before anything trains; an interrupted sweep resumes where it stopped; an optuna search runs its
trials and keeps its study for --resume. The embedded MiniLM sentiment recipe, tiny."""
import json
import math
from types import SimpleNamespace

import pytest

import peftkit.tasks.classification as classification
import peftkit.train
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.sweep import sweep
from peftkit.train import AdapterTrainer

TINY = ["data.max_train_samples=64", "data.max_eval_samples=16", "train.batch_size=8", "train.max_length=32",
        "train.max_steps=4", "train.eval_steps=2", "train.report_to=[]"]
GRID = {(1e-3, 8): 0.6, (1e-3, 16): 0.9, (2e-3, 8): 0.7, (2e-3, 16): 0.5}  # validation accuracy by (lr, rank)


@pytest.fixture
def scored(monkeypatch):
    """Validation accuracy follows a rule of the trial's settings; the test split is scored for
    real. Every evaluation is logged as (desc, run name)."""
    real = classification.evaluate
    log = SimpleNamespace(calls=[], rule=lambda recipe: GRID[(recipe.train.lr, recipe.method["r"])])

    def evaluate(model, tokenizer, dataset, recipe, desc="evaluating"):
        log.calls.append((desc, recipe.name))
        if desc == "validation":
            return {"accuracy": log.rule(recipe), "macro_f1": 0.5}
        return real(model, tokenizer, dataset, recipe, desc)
    monkeypatch.setattr(classification, "evaluate", evaluate)
    return log


@pytest.fixture
def trained(monkeypatch):
    """Each train() call as (run name, resume, test), and its recipe; `stop_at` n raises
    KeyboardInterrupt on call n, before it trains."""
    real, log = peftkit.train.train, SimpleNamespace(calls=[], recipes=[], stop_at=None)

    def train(recipe, resume=False, test=True):
        log.calls.append((recipe.name, resume, test))
        log.recipes.append(recipe)
        if len(log.calls) == log.stop_at:
            raise KeyboardInterrupt
        return real(recipe, resume=resume, test=test)
    monkeypatch.setattr(peftkit.train, "train", train)
    return log


def on_test(scored) -> list:
    return [call for call in scored.calls if call[0] != "validation"]


def test_a_grid_picks_the_best_by_validation_and_tests_only_it(tmp_path, scored, trained, capsys):
    assert main(["sweep", "sentiment-lora", *TINY, f"output_dir={tmp_path}", "train.lr=1e-3,2e-3",
                 "method.r=8,16"]) == 0
    folder = tmp_path / "sentiment-lora-sweep"
    result = json.loads((folder / "sweep.json").read_text())
    assert [(r["trial"], r["settings"], r["score"]) for r in result["trials"]] == [
        ("trial-000", {"train.lr": 1e-3, "method.r": 8}, 0.6), ("trial-001", {"train.lr": 1e-3, "method.r": 16}, 0.9),
        ("trial-002", {"train.lr": 2e-3, "method.r": 8}, 0.7), ("trial-003", {"train.lr": 2e-3, "method.r": 16}, 0.5)]
    assert result["best"] == "trial-001" and result["validation"] == 0.9 and result["metric"] == "accuracy"
    # every trial trained without a test; the best one alone was tested, once
    assert trained.calls == [(f"trial-00{i}", False, False) for i in range(4)]
    assert on_test(scored) == [("evaluating", "trial-001")]
    assert set(result["test"]) == {"accuracy", "macro_f1"} and result["test_examples"] == 16
    for i in range(4):
        assert json.loads((folder / f"trial-00{i}" / "metrics.json").read_text())["adapted"] is None
    kept = (folder / "trial-001" / "recipe.yaml").read_text()
    assert "r: 16" in kept and "lr: 0.001" in kept and "lora_alpha: 16" in kept  # the preset, rank changed
    assert sorted(p.name for p in folder.iterdir()) == ["plan.json", "sweep.json", "sweep.md", "trial-000",
                                                        "trial-001", "trial-002", "trial-003"]
    table = (folder / "sweep.md").read_text()
    assert result["command"] in table and result["machine"]["machine"] in table
    assert table.index("| **trial-001** | 0.001 | 16 | 0.9000 |") < table.index("| trial-002 | 0.002 | 8 | 0.7000 |")
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("[") and "validation" in line] == \
        [[f"[{i + 1}/4]", f"trial-00{i}"] for i in range(4)]  # a line per trial
    assert "best         trial-001 (train.lr=0.001 method.r=16): validation accuracy 0.9000" in out


@pytest.mark.parametrize("settings, message", [
    (["train.lrr=1e-4,3e-4"], "unknown key train.lrr; allowed at this level: epochs"),
    (["train.lr=1e-4,[3e-4"], "the values are not a YAML list"),
    (["train.lr=abc,1e-4"], "train.lr must be float, got 'abc'"),
    (["train.lr=1e-5:1e-3"], "train.lr=1e-5:1e-3 is a range, which needs --trials N"),
    (["train.lr=1e-5:abc", "--trials", "2"], "'abc' is not a number; a range is LOW:HIGH"),
    (["train.lr=1e-3:1e-5", "--trials", "2"], "the low end 0.001 must be below the high end 1e-05"),
    (["method.rank=4,8"], "unknown LoRA option 'rank'; LoraConfig accepts: "),
    (["method=lora,houlsby", "method.r=8,16"], "unknown bottleneck option 'r'; bottleneck accepts: method, "),
    (["train.lr=1e-4,3e-4", "train.lr=1e-3"], "sweep key train.lr is given twice"),
    (["train.lr=1e-4,3e-4", "--trials", "2"], "drop --trials to train the whole grid (2 trials)"),
    (["train.lr=1e-4"], "nothing to sweep"),
])
def test_bad_sweeps_fail_in_one_line_before_anything_trains(tmp_path, trained, capsys, settings, message):
    assert main(["sweep", "sentiment-lora", *TINY, f"output_dir={tmp_path}", *settings]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit: error: ") and message in err and err.count("\n") == 1
    assert not trained.calls and not any(tmp_path.iterdir())


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path, scored, trained, monkeypatch):
    settings = [*TINY, f"output_dir={tmp_path}", "train.lr=1e-3,2e-3", "method.r=16"]
    folder, save = tmp_path / "sentiment-lora-sweep", AdapterTrainer._save

    def crash_in_the_second_trials_last_checkpoint(self, output_dir=None, state_dict=None):
        save(self, output_dir, state_dict)
        if self.args.learning_rate == 2e-3 and self.state.global_step == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(AdapterTrainer, "_save", crash_in_the_second_trials_last_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        sweep("sentiment-lora", settings)
    assert (folder / "trial-000" / "metrics.json").is_file() and not (folder / "trial-001").exists()
    assert (folder / ".trial-001.work" / "checkpoints" / "checkpoint-2").is_dir() and not on_test(scored)
    with pytest.raises(PeftkitError, match="already holds a sweep; continue it with --resume"):
        sweep("sentiment-lora", settings)
    with pytest.raises(PeftkitError, match="holds another sweep"):
        sweep("sentiment-lora", [*settings[:-1], "method.r=8"], resume=True)

    monkeypatch.setattr(AdapterTrainer, "_save", save)
    trained.calls.clear()
    sweep("sentiment-lora", settings, resume=True)
    assert trained.calls == [("trial-001", True, False)]  # the finished trial kept, the cut one continued
    assert [row["step"] for row in json.loads((folder / "trial-001" / "metrics.json").read_text())["validation"]] \
        == [2, 4]
    result = json.loads((folder / "sweep.json").read_text())
    assert result["best"] == "trial-000" and [r["score"] for r in result["trials"]] == [0.9, 0.5]
    assert on_test(scored) == [("evaluating", "trial-000")]

    # a finished sweep resumed trains and tests nothing again
    trained.calls.clear()
    sweep("sentiment-lora", settings, resume=True)
    assert not trained.calls and len(on_test(scored)) == 1


def test_an_optuna_search_runs_its_trials_and_keeps_its_study(tmp_path, scored, trained):
    import optuna  # a test dependency (pyproject [test])
    scored.rule = lambda recipe: round(1 - abs(math.log10(recipe.train.lr) + 3) / 10, 4)  # best at 1e-3
    tiny = [s.replace("max_steps=4", "max_steps=2") for s in TINY]
    settings = [*tiny, f"output_dir={tmp_path}", "train.lr=1e-4:1e-2", "method.r=4,8"]
    trained.stop_at = 3
    with pytest.raises(KeyboardInterrupt):
        sweep("sentiment-lora", settings, trials=3)
    assert [call[0] for call in trained.calls] == ["trial-000", "trial-001", "trial-002"]
    cut = trained.recipes[2]

    trained.calls.clear()
    folder = sweep("sentiment-lora", settings, trials=3, resume=True)
    assert trained.calls == [("trial-002", False, False)]  # only the interrupted trial trains, as it was asked
    assert (trained.recipes[3].train.lr, trained.recipes[3].method) == (cut.train.lr, cut.method)
    result = json.loads((folder / "sweep.json").read_text())
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{folder / 'optuna.db'}")
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted(t.user_attrs["trial"] for t in done) == [r["trial"] for r in result["trials"]] \
        == ["trial-000", "trial-001", "trial-002"]
    assert {t.user_attrs["trial"]: t.value for t in done} == {r["trial"]: r["score"] for r in result["trials"]}
    for t, r in zip(sorted(done, key=lambda t: t.user_attrs["trial"]), result["trials"]):
        assert t.params["train.lr"] == r["settings"]["train.lr"] and 1e-4 <= r["settings"]["train.lr"] <= 1e-2
        assert r["settings"]["method.r"] in (4, 8) and t.distributions["train.lr"].log  # two decades: log scale
    assert result["best"] == max(result["trials"], key=lambda r: r["score"])["trial"]
    assert on_test(scored) == [("evaluating", result["best"])]
    assert result["search"] == "optuna TPE (seed 42)"


def test_a_method_option_changes_the_recipes_preset():
    from peftkit.recipe import load_recipe
    assert load_recipe("sentiment-lora", ["method.r=16"]).method == {"method": "lora", "r": 16, "lora_alpha": 16,
                                                                     "lora_dropout": 0.05}
    assert load_recipe("sentiment-lora", ["method={method: lora, r: 4}", "method.r=16"]).method == \
        {"method": "lora", "r": 16}
