"""Train shipped recipes at their defaults and write benchmarks/results/recipes-current-cpu.{md,json}.

    python benchmarks/recipes.py topic-lora qa-lora      # any shipped recipe names, one run each

Each recipe runs as a user runs it, `peftkit train recipes/NAME.yaml`, under `/usr/bin/time -v`,
into a temporary output folder. The table holds each run's metrics.json figures (test split;
"base" is the same model before training), its training speed and peak memory as the run
measured them, and the whole process's wall time and peak RSS.
"""
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftkit.bench.machine import machine_info  # noqa: E402
from peftkit.saving import atomic_write  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "recipes-current-cpu"


def main(names: list[str]) -> int:
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            done = subprocess.run(["/usr/bin/time", "-v", str(Path(sys.executable).parent / "peftkit"), "train",
                                   str(ROOT / "recipes" / f"{name}.yaml"), f"output_dir={tmp}"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
                return done.returncode
            metrics = json.loads((Path(tmp) / name / "metrics.json").read_text())
            metrics["whole_run_seconds"] = _wall_seconds(done.stderr)
            metrics["whole_run_peak_rss_mb"] = round(_kbytes(done.stderr, "Maximum resident set size") / 1024, 1)
            runs[name] = metrics
            print(name, json.dumps({k: metrics[k] for k in ("base", "adapted", "train_seconds")}), flush=True)
    machine = machine_info("cpu")
    atomic_write(OUT.with_suffix(".json"), json.dumps({"machine": machine, "runs": runs}, indent=1) + "\n")
    lines = ["# Shipped recipes at their defaults, current code", "",
             f"Machine: **{machine['machine']}**, torch {machine['torch']}, {machine['threads']} threads; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"Regenerate: `python benchmarks/recipes.py {' '.join(names)}` (raw: `{OUT.name}.json`). One run "
             "each at the recipe's seed; test split; *train* speed and memory as the run measured them, "
             "*whole run* from `/usr/bin/time -v` (evaluation before and after training included).", "",
             "| recipe | method | precision | metric: base → adapted | train s | samples/s | train peak MB "
             "| whole run s | whole-run peak RSS MB |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in runs.items():
        scores = ", ".join(f"{k} {m['base'][k]:.3f} → **{m['adapted'][k]:.3f}**" for k in m["adapted"]
                           if isinstance(m["adapted"][k], float))
        method = m["method"]["method"] if isinstance(m["method"], dict) else m["method"]  # an inline spec
        lines.append(f"| {name} | {method} | {m['precision']} | {scores} | {m['train_seconds']} | "
                     f"{m['train_samples_per_second']} | {m['peak_memory_mb']} | {m['whole_run_seconds']} | "
                     f"{m['whole_run_peak_rss_mb']} |")
    atomic_write(OUT.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _wall_seconds(timing: str) -> float:
    clock = re.search(r"Elapsed \(wall clock\) time.*: (.+)", timing).group(1).strip()
    seconds = 0.0
    for part in clock.split(":"):
        seconds = seconds * 60 + float(part)
    return round(seconds, 1)


def _kbytes(timing: str, label: str) -> int:
    return int(re.search(rf"{label}.*: (\d+)", timing).group(1))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["topic-lora", "qa-lora"]))
