"""Where a recipe's training steps spend their time: torch.profiler over a short run, by operator.

    python benchmarks/profile_step.py recipes/headlines-lora.yaml train.max_steps=8 --out benchmarks/results/xeon-amx

Trains the recipe as `peftkit train` would (its fast path included) for the steps the overrides
allow, without validation or files, and writes profile-<recipe>.{md,json} into --out: each
operator's share of the CPU time, its calls and mean time. The first step (warm-up) is counted too,
so run enough steps that it does not dominate.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torch.profiler import ProfilerActivity, profile  # noqa: E402

import peftkit  # noqa: E402
from peftkit.bench.machine import machine_info  # noqa: E402
from peftkit.bench.script_results import script_command, write_result  # noqa: E402
from peftkit.recipe import load_recipe  # noqa: E402
from peftkit.train import make_trainer, set_up  # noqa: E402

TOP = 25


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. train.max_steps=8")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe, [*args.overrides, "train.eval_steps=0"])
    setup = set_up(recipe)
    model = peftkit.attach(setup.model, setup.spec)
    with tempfile.TemporaryDirectory() as work, profile(activities=[ProfilerActivity.CPU]) as prof:
        make_trainer(recipe, setup, model, Path(work), save=False).train()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [{"op": e.key, "share": round(e.self_cpu_time_total / total, 4), "calls": e.count,
             "mean_us": round(e.self_cpu_time_total / e.count, 1)} for e in events[:TOP]]
    result = {"command": script_command("profile_step.py", argv),
              "machine": machine_info("cpu"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "recipe": recipe.name, "steps": setup.steps, "precision": setup.precision,
              "attention": setup.attention, "self_cpu_seconds": round(total / 1e6, 2), "ops": rows}
    write_result(args.out, f"profile-{recipe.name}", result, markdown(result))
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Where a training step's time goes: {r['recipe']}", "",
             f"Machine: **{m['machine']}**, torch {m['torch']}, {m['threads']} threads; {r['date']}.", "",
             f"Regenerate: `{r['command']}`", "",
             f"{r['steps']} steps in {r['precision']} with {r['attention']} attention, warm-up included; "
             f"{r['self_cpu_seconds']} s of operator CPU time. The {TOP} operators with the most self time:", "",
             "| operator | share | calls | mean µs |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| `{o['op']}` | {o['share']:.1%} | {o['calls']:,} | {o['mean_us']:,} |" for o in r["ops"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
