"""The commands print nothing a user cannot act on: no dependency noise on stderr, and the
listings answer without importing torch."""
import json
import subprocess
import sys

TINY = ["data.max_train_samples=32", "data.max_eval_samples=16", "train.max_steps=2", "train.batch_size=8",
        "train.max_length=32"]
NOISE = ["kernels-community", "LOAD REPORT", "FutureWarning", "Unexpected keyword arguments", "Traceback",
         "newly initialized"]


def peftkit(*args, stdin=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "peftkit", *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd)


def test_help_and_listings_are_quiet_and_need_no_torch():
    for args in (["--help"], ["presets"], ["recipes"], ["train", "--help"]):
        done = peftkit(*args)
        assert done.returncode == 0 and done.stderr == "", (args, done.stderr)
    check = "import sys, peftkit.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.strip() == "[]"


def test_train_eval_and_predict_print_no_known_noise(tmp_path):
    trained = peftkit("train", "sentiment-lora", *TINY, f"output_dir={tmp_path}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    run = tmp_path / "sentiment-lora"
    evaluated = peftkit("eval", str(run))
    predicted = peftkit("predict", str(run), "--input", "-", stdin='{"text": "a fine film", "id": 1}\n')
    assert json.loads(predicted.stdout)["id"] == 1
    for done in (trained, evaluated, predicted):
        assert done.returncode == 0
        assert not [noise for noise in NOISE if noise in done.stderr], done.stderr[-2000:]
        # progress bars into a file or pipe: none left half-drawn, the output ends with its line
        assert done.stderr == "" or done.stderr.endswith("\n"), repr(done.stderr[-300:])
