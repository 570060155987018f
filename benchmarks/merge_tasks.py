"""Task adapters merged into one: every task's scores before and after, side by side.

    python benchmarks/merge_tasks.py runs/headlines-lora runs/topic-genclass-lora \\
        --variant cat:1,1 --variant svd:1,1 --variant ties:1,1:0.5 --variant linear:0.5,0.5

Each run folder is a trained task adapter on one base. Every adapter below is evaluated on
every run's own test split (its recipe's data, prompt and max_eval_samples), as `peftkit eval`
would: the bare base, each run's adapter alone, and one combination per --variant
(TYPE:WEIGHTS[:DENSITY], as `peftkit merge --combine TYPE --weights W --density D` makes it).
Writes merge-tasks-<device>.{json,md} to --out (default benchmarks/results).
"""
import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftkit.bench.machine import machine_info  # noqa: E402
from peftkit.bench.script_results import script_command, write_result  # noqa: E402
from peftkit.combine import combine, plan_combination  # noqa: E402
from peftkit.runs import Run, adapter_base, compute_as_trained, open_run  # noqa: E402
from peftkit.errors import PeftkitError  # noqa: E402


def main(argv=None) -> int:
    try:
        return _main(argv)
    except PeftkitError as e:
        print(f"merge_tasks.py: error: {e}", file=sys.stderr)
        return 2


def _main(argv) -> int:
    args = _arguments(argv)
    variants = [_variant(text) for text in args.variant]
    for kind, weights, density in variants:  # every request checked before the first evaluation
        plan_combination(args.runs, kind, weights, density)
    runs = [open_run(path) for path in args.runs]  # each computing as its training did
    rows = [_scores("base", _base(runs[0]), runs)]
    rows += [_scores(f"{run.path.name} alone", run.model, runs) for run in runs]
    for kind, weights, density in variants:
        label = f"{kind} {','.join(map(_number, weights))}" + (f" density {_number(density)}" if density else "")
        rows.append(_scores(label, combine(_base(runs[0]), args.runs, kind, weights, density), runs))
    _write(Path(args.out), script_command("merge_tasks.py", argv), runs, rows)
    return 0


def _base(run: Run):
    """The runs' bare base, set to compute as the first run trained (as open_run sets the runs')."""
    base = adapter_base(run.path)
    compute_as_trained(base, run.recipe)
    return base


def _scores(label: str, model, runs: list[Run]) -> dict:
    """`model` evaluated on every run's test split, with that run's recipe and tokenizer."""
    model.eval()
    scores = {}
    for run in runs:
        started = time.perf_counter()
        print(f"{label} on {run.path.name} ...", flush=True)
        scores[run.path.name] = Run(run.path, run.recipe, model, run.tokenizer).evaluate("test")
        scores[run.path.name]["seconds"] = round(time.perf_counter() - started, 1)
    return {"adapter": label, "scores": scores}


def _write(out_dir: Path, command: str, runs: list[Run], rows: list[dict]) -> None:
    machine = machine_info("cpu")
    names = [run.path.name for run in runs]
    metrics = {run.path.name: [k for k in rows[0]["scores"][run.path.name] if k != "seconds"] for run in runs}
    header = ["adapter"] + [f"{name} {metric}" for name in names for metric in metrics[name]]
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" + " ---: |" * (len(header) - 1)]
    for row in rows:
        cells = [f"{row['scores'][name][metric]:.3f}" for name in names for metric in metrics[name]]
        table.append(f"| {row['adapter']} | " + " | ".join(cells) + " |")
    evaluated = ", ".join(f"{run.path.name}: the first {run.recipe.data.max_eval_samples or 'all'} test rows"
                          for run in runs)
    result = {"command": command, "machine": machine, "runs": names,
              "recipes": {run.path.name: run.recipe.name for run in runs}, "rows": rows}
    write_result(out_dir, "merge-tasks-cpu", result, "\n".join([
        "# Task adapters merged into one: every task's scores before and after", "",
        f"Machine: **{machine['machine']}** ({platform.machine()}), torch {machine['torch']}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        f"Regenerate: `{command}` (after training the runs with `peftkit train`). Raw scores:",
        "`merge-tasks-cpu.json` beside this file. Greedy generation, one seed per run; evaluated on "
        f"{evaluated}.", "", *table, ""]))


def _variant(text: str) -> tuple[str, list[float], float | None]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"merge_tasks.py: error: --variant {text!r} is not TYPE:WEIGHTS[:DENSITY]")
    try:
        weights = [float(w) for w in parts[1].split(",")]
        density = float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise SystemExit(f"merge_tasks.py: error: --variant {text!r} has a weight or density that is not a number")
    return parts[0], weights, density


def _number(x: float) -> str:
    return f"{x:g}"


def _arguments(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders of task adapters trained on one base")
    p.add_argument("--variant", action="append", default=[], help="TYPE:WEIGHTS[:DENSITY], e.g. ties:1,1:0.5")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for merge-tasks-cpu.md/.json")
    args = p.parse_args(argv)
    if len(args.runs) < 2 or not args.variant:
        p.error("give at least two run folders and one --variant")
    return args


if __name__ == "__main__":
    sys.exit(main())
