"""A pip-installed peftkit works outside the repository: the wheel carries every package folder
and the presets, recipes and benchmark tables, and the commands find them from any folder."""
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_folder():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = [".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "peftkit").rglob("__init__.py")]
    assert sorted(p for p in listed if not p.startswith("peftkit.share.")) == sorted(folders)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed into a folder of its own; the throwaway
    environment borrows this venv's dependencies (torch, transformers, ...), not its peftkit."""
    tmp = tmp_path_factory.mktemp("installed")
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next((tmp / "dist").glob("peftkit-*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True,
                   capture_output=True)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()

    def run(*args, cwd=elsewhere, stdin=None):
        env = {**os.environ, "PYTHONPATH": str(tmp / "site")}
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, input=stdin, capture_output=True,
                              text=True)
    return wheel, run, elsewhere


def test_the_wheel_carries_presets_recipes_and_benchmark_tables(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for path in ["peftkit/share/adapters/lora.yaml", "peftkit/share/recipes/sentiment-lora.yaml",
                 "peftkit/share/recipes/launch/fsdp-qlora.yaml", "peftkit/share/recipes/launch/deepspeed-zero3.yaml",
                 "peftkit/share/benchmarks/train-sentiment.yaml", "peftkit/share/benchmarks/configs/gpt2.json",
                 "peftkit/share/benchmarks/reference/sentiment_peft_trainer.py", "peftkit/tuners/prefix/layer.py"]:
        assert path in names


def test_the_installed_commands_work_from_another_folder(installed):
    _, run, elsewhere = installed
    where = run("-c", "import peftkit, peftkit.shipped as s; print(peftkit.__file__); print(s.shipped_root())")
    package, root = where.stdout.split()
    assert "site" in Path(package).parts and root.endswith("peftkit/share")  # not this checkout's copy
    presets = run("-m", "peftkit", "presets")
    assert presets.returncode == 0 and "lora " in presets.stdout and "qlora" in presets.stdout
    recipes = run("-m", "peftkit", "recipes")
    assert recipes.returncode == 0 and "sentiment-lora" in recipes.stdout and "headlines-qlora" in recipes.stdout
    assert "fsdp-qlora" not in recipes.stdout  # recipes/launch/ holds accelerate configs
    attached = run("-c", "import peftkit\n"
                         "from transformers import BertConfig, BertForSequenceClassification\n"
                         "model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,"
                         " num_attention_heads=2, intermediate_size=64, vocab_size=128))\n"
                         "print(peftkit.param_report(peftkit.attach(model, 'lora'))['trainable'])")
    assert attached.returncode == 0, attached.stderr
    assert int(attached.stdout.split()[-1]) > 0

    rows = elsewhere / "rows.jsonl"  # relative to the folder it trains in
    rows.write_text("".join(json.dumps({"review": f"a film, take {i}", "label": ["bad", "good"][i % 2]}) + "\n"
                            for i in range(40)))
    trained = run("-m", "peftkit", "train", "sentiment-lora", "data.dataset=rows.jsonl", "data.text=review",
                  "train.max_steps=2", "train.batch_size=4", "train.max_length=32", "output_dir=runs")
    assert trained.returncode == 0, trained.stderr[-2000:]
    run_dir = elsewhere / "runs" / "sentiment-lora"
    assert (run_dir / "adapter_model.safetensors").is_file()
    evaluated = run("-m", "peftkit", "eval", str(run_dir), cwd=elsewhere.parent)  # the data path was stored absolute
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert set(json.loads(evaluated.stdout)) == {"accuracy", "macro_f1"}

    # rows give the recipe's column or "text"; their other fields come back with the prediction
    predicted = run("-m", "peftkit", "predict", str(run_dir), "--input", "-", cwd=elsewhere.parent,
                    stdin='{"id": 7, "text": "great fun"}\n{"review": "dull", "id": 8}\n')
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    out = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [row["id"] for row in out] == [7, 8] and all(row["label"] in ("bad", "good") for row in out)
    missing = run("-m", "peftkit", "predict", str(run_dir), "--input", "-", stdin='{"body": "x"}\n')
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "input row 1 needs a string 'review' (or \"text\")" in missing.stderr
