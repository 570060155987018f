"""The driver of `peftkit bench train`: each variant of a benchmark file trained in a fresh process
(so its peak memory is its own), one after the other, then the table, JSON and plots written.

    rows = run(load_bench("benchmarks/train-sentiment.yaml"), ["train.max_steps=4"], only=["lora"])

What a row measures is in TRAIN_DESCRIPTION (peftkit/bench/__init__.py, the command's --help);
the child process is variant.py, the reports train_report.py.
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import PeftkitError
from . import machine  # called through the module, so that a test's stand-in there is used
from .benchfile import RESULTS_DIR, Bench, Variant, recipe_for, selected, shown_path, sweep_trial
from .train_report import one_line, summary_table, with_mfu, write_results

WARMUP_STEPS = 20  # the untimed run before the table: enough batch shapes to load the common kernels


def run(bench: Bench, extra: list[str] = (), only: list[str] | None = None, out_dir: Path = RESULTS_DIR,
        log_dir: Path = Path("runs") / "bench") -> list[dict]:
    """Train every variant (each in a fresh process, its output in log_dir), then write the table and plots."""
    from tqdm.auto import tqdm

    variants = selected(bench, only, extra)
    device = machine.default_device()
    peaks = [machine.matmul_peaks(device)]
    meta = machine.machine_info(device) | {
        "bench": shown_path(bench.path), "only": list(only or []), "recipe": bench.recipe,
        "overrides": bench.overrides, "extra": list(extra), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "lr_sweep": bench.lr_sweep and {"values": bench.lr_sweep.values, "overrides": bench.lr_sweep.overrides}}
    stem = out_dir / f"train-{bench.name}-{device}"
    rows, failed = [], []
    log_dir.mkdir(parents=True, exist_ok=True)
    warm_up(bench, variants[0], extra, log_dir / f"{bench.name}-warmup-{device}.log")
    for variant in tqdm(variants, desc=f"bench {bench.name}", unit="variant"):
        log = log_dir / f"{bench.name}-{variant.name}-{device}.log"
        try:
            rows.append(run_swept(bench, variant, extra, log))
            tqdm.write(one_line(rows[-1]))
        except PeftkitError as error:  # one broken variant must not cost the others' results
            failed.append({"variant": variant.name, "log": str(log)})
            tqdm.write(str(error))
        if rows:  # the table so far is on disk after every variant: an interrupted run keeps it
            _finish(stem, meta, rows, failed, peaks)
    peaks.append(machine.matmul_peaks(device))
    if rows:
        rows = _finish(stem, meta, rows, failed, peaks)
        print(summary_table(rows))
        print(f"\nresults: {stem}.md, {stem}.json, {stem}-loss.png, {stem}-ratio.png")
    if failed:
        raise PeftkitError(f"{len(failed)} of {len(variants)} variants failed: "
                           + ", ".join(f"{f['variant']} (log {f['log']})" for f in failed))
    return rows


def warm_up(bench: Bench, variant: Variant, extra: list[str], log: Path) -> None:
    """A short untimed run first, so that no timed variant pays for the machine's cold start.

    On an H200 the first variant of a table spent ~15 s on its first 40 steps, the sixth ~4 s, and
    from step 100 on they ran equally fast. The likely cause is CUDA loading kernels lazily from the
    libraries' files: from disk the first time, from the page cache after. Without a warm-up the
    table's order shows in its speeds.
    """
    planned = recipe_for(bench, variant, extra).train.max_steps  # -1: epochs decide
    steps = WARMUP_STEPS if planned <= 0 else min(planned, WARMUP_STEPS)
    try:
        run_child(bench, variant, [*extra, f"train.max_steps={steps}", "data.max_eval_samples=8"], log)
    except PeftkitError as error:  # the timed run of this variant will fail the same way and be reported
        print(f"warm-up run failed; going on: {str(error).splitlines()[0]}", file=sys.stderr)


def run_swept(bench: Bench, variant: Variant, extra: list[str], log: Path) -> dict:
    """The variant's row, at the learning rate LrSweep.best picks from its short sweep runs when the
    file sweeps it, else at its recipe's."""
    sweep = bench.lr_sweep
    if sweep is None or not sweep.swept(variant):
        return run_child(bench, variant, extra, log)
    trials = []
    for lr in sweep.values:
        row = run_child(bench, variant, [*extra, *sweep_trial(sweep, lr)], log.with_suffix(f".lr{lr:g}.log"),
                        split="validation")
        trials.append({"lr": lr, "validation": row["score"], "steps": row["steps"], "final_loss": row["final_loss"]})
    best = sweep.best(trials)
    return run_child(bench, variant, [*extra, f"train.lr={best['lr']!r}"], log) | {"lr_sweep": trials}


def run_child(bench: Bench, variant: Variant, extra: list[str], log: Path, split: str = "test") -> dict:
    """One variant trained by variant.py in a fresh process, its output in `log`: its result row, scored
    on `split`."""
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "peftkit.bench.variant", "--variant", variant.name, "--out", str(out),
                   "--split", split, str(bench.path), *extra]
        with open(log, "w") as handle:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
        if code != 0 or not out.is_file():
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise PeftkitError(f"variant {variant.name} failed (exit {code}); log {log}:\n{tail}")
        return json.loads(out.read_text())


def _finish(stem: Path, meta: dict, rows: list[dict], failed: list[dict], peaks: list[dict]) -> list[dict]:
    meta, rows = with_mfu(meta, rows, peaks)
    write_results(stem, meta | {"failed": failed}, rows)
    return rows
