"""Time `make demo` on a warm cache and write benchmarks/results/demo-cpu.{md,json}.

    python benchmarks/demo.py      # after one `make demo` has filled the embedded-model cache

It removes runs/sentiment-lora, runs `/usr/bin/time -v make demo`, and writes the run's
metrics.json as demo-cpu.json and, beside it, the run's printed summary with the timing lines.
"""
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftkit.bench.machine import machine_info  # noqa: E402
from peftkit.bench.script_results import script_command  # noqa: E402
from peftkit.saving import atomic_write  # noqa: E402

RUN = ROOT / "runs" / "sentiment-lora"
TIMING = ("Command being timed", "Percent of CPU", "Elapsed (wall clock)", "Maximum resident set size")


def main(argv=None) -> int:
    out_dir = Path(_arguments(argv).out)
    command = script_command("demo.py", argv)
    subprocess.run(["rm", "-rf", str(RUN)], check=True)
    done = subprocess.run(["/usr/bin/time", "-v", "make", "demo"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        return done.returncode
    summary = done.stdout[re.search(r"^run {4,}", done.stdout, re.M).start():].strip()  # the run's summary
    timing = [line.strip() for line in done.stderr.splitlines() if line.strip().startswith(TIMING)]
    machine = machine_info("cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "demo-cpu"
    atomic_write(out.with_suffix(".json"), (RUN / "metrics.json").read_text())
    atomic_write(out.with_suffix(".md"), "\n".join([
        "# `make demo` on a warm cache", "",
        f"Machine: **{machine['machine']}** ({platform.machine()}), torch {machine['torch']}, "
        f"{machine['threads']} threads; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        f"Regenerate: `{command}` (after one `make demo` has filled the cache). The run's",
        "`metrics.json` is `demo-cpu.json` beside this file; below, the summary the run printed and the",
        "timing lines of `/usr/bin/time -v`.", "", "```", summary, "```", "", "```", *timing, "```", ""]))
    print(summary, *timing, sep="\n")
    return 0


def _arguments(argv):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for demo-cpu.md and .json (default benchmarks/results)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
