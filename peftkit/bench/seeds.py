"""`peftkit bench train B --seeds 1-8`: the variants trained at every seed, paired.

    peftkit bench train benchmarks/train-sentiment.yaml --seeds 1-8 --only lora,reference-tuned

For each seed, each variant trains in its own process (as in a single table), one
after the other, so a seed's runs share the machine's state of that minute. The
paired table gives, for every variant against `--against` (default
`reference-tuned` when it runs): the metric difference per seed with its mean and
95% t-interval, and the speed and peak-memory ratios per seed with their median and
range. Ratios taken seed by seed are what a noisy, shared machine can measure well;
one long run of each is not. Raw rows go to `train-NAME-DEVICE-seeds.json`, the
table to `.md` beside it, both rewritten after every run.
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from ..errors import PeftkitError
from . import machine, train  # called through the modules, so that a test's stand-ins there are used
from .benchfile import shown_path
from .train_report import with_mfu

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond, the normal's
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def parse_seeds(text: str) -> list[int]:
    """"1-8", "42,1,2" or "1-4,42" -> the seeds in order, each once."""
    seeds = []
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            seeds += range(int(low), int(high) + 1) if dash else [int(low)]
    except ValueError:
        raise PeftkitError(f"--seeds {text!r}: give seeds like 1-8, 42,1,2 or 1-4,42") from None
    if not seeds:
        raise PeftkitError(f"--seeds {text!r} names no seed")
    return list(dict.fromkeys(seeds))


def run_seeds(bench, seeds: list[int], extra: list[str], variants, out_dir: Path, log_dir: Path,
              against: str | None = None) -> list[dict]:
    from tqdm.auto import tqdm

    names = [v.name for v in variants]
    against = against or ("reference-tuned" if "reference-tuned" in names else names[-1])
    if against not in names:
        raise PeftkitError(f"--against {against}: not among the variants run ({', '.join(names)})")
    device = machine.default_device()
    stem = out_dir / f"train-{bench.name}-{device}-seeds"
    meta = machine.machine_info(device) | {
        "bench": shown_path(bench.path), "variants": names, "seeds": seeds, "against": against,
        "extra": list(extra), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    log_dir.mkdir(parents=True, exist_ok=True)
    peaks = [machine.matmul_peaks(device)]
    train.warm_up(bench, variants[0], extra, log_dir / f"{bench.name}-warmup-{device}.log")
    rows = []
    with tqdm(total=len(seeds) * len(variants), desc=f"bench {bench.name} seeds", unit="run") as bar:
        for seed in seeds:
            for variant in variants:
                log = log_dir / f"{bench.name}-{variant.name}-seed{seed}-{device}.log"
                row = train.run_child(bench, variant, [*extra, f"train.seed={seed}"], log)
                rows.append(row | {"seed": seed})
                write_seeds(stem, *with_mfu(meta, rows, peaks))
                bar.update()
    peaks.append(machine.matmul_peaks(device))
    meta, rows = with_mfu(meta, rows, peaks)
    write_seeds(stem, meta, rows)
    print(paired_table(rows, meta))
    print(f"\nresults: {stem}.md, {stem}.json")
    return rows


def write_seeds(stem: Path, meta: dict, rows: list[dict]) -> None:
    from ..saving import atomic_write

    slim = [{k: v for k, v in row.items() if k != "losses"} for row in rows]
    rows_text = ",\n".join("  " + json.dumps(row) for row in slim)
    atomic_write(stem.with_suffix(".json"), f'{{"meta": {json.dumps(meta)},\n "rows": [\n{rows_text}\n]}}\n')
    atomic_write(stem.with_suffix(".md"), markdown(rows, meta))


def paired(rows: list[dict], variant: str, against: str) -> dict | None:
    """Seed-by-seed comparison of `variant` with `against` over the seeds both finished."""
    by = {(r["variant"], r["seed"]): r for r in rows}
    seeds = [s for s in dict.fromkeys(r["seed"] for r in rows) if (variant, s) in by and (against, s) in by]
    if not seeds:
        return None
    diffs = [by[variant, s]["score"] - by[against, s]["score"] for s in seeds]
    speed = [by[variant, s]["samples_per_s"] / by[against, s]["samples_per_s"] for s in seeds]
    memory = [by[variant, s]["peak_mb"] / by[against, s]["peak_mb"] for s in seeds]
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    half = (T95[len(diffs) - 2] if len(diffs) - 1 <= len(T95) else 1.96) * sd / math.sqrt(len(diffs)) \
        if len(diffs) > 1 else float("nan")
    return {"variant": variant, "against": against, "seeds": seeds, "diffs": diffs, "mean": mean, "sd": sd,
            "low": mean - half, "high": mean + half, "speed": speed, "memory": memory}


def paired_table(rows: list[dict], meta: dict) -> str:
    metric = rows[0]["metric"]
    lines = [f"{'variant':<20} {'seeds':>5}  {metric + ' diff (points)':>24}  {'95% interval':>16}  "
             f"{'speed x (median, range)':>26}  {'peak mem x (median, max)':>25}"]
    for name in meta["variants"]:
        if name == meta["against"]:
            continue
        p = paired(rows, name, meta["against"])
        if p is None:
            continue
        lines.append(f"{name:<20} {len(p['seeds']):>5}  {100 * p['mean']:>+24.2f}  "
                     f"{100 * p['low']:>+7.2f}..{100 * p['high']:<+7.2f}  "
                     f"{_median_range(p['speed']):>26}  {statistics.median(p['memory']):>17.2f}, {max(p['memory']):.2f}")
    return "\n".join(lines) + f"\n(against {meta['against']}; differences are variant minus it)"


def markdown(rows: list[dict], meta: dict) -> str:
    metric = rows[0]["metric"]
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    by = {(r["variant"], r["seed"]): r for r in rows}
    only = f" --only {','.join(meta['variants'])}"
    extra = " " + " ".join(meta["extra"]) if meta["extra"] else ""
    out = [f"# Paired seeds: {Path(meta['bench']).stem}", "",
           f"Machine: **{meta['machine']}** ({meta['device']}), torch {meta['torch']}, {meta['threads']} threads; "
           f"{meta['date']}.", "",
           f"Regenerate: `peftkit bench train {meta['bench']} --seeds {','.join(map(str, meta['seeds']))}"
           f"{only}{extra}`", "",
           f"Each seed trains every variant in its own process, one after the other; every figure below "
           f"is from this one run. Test {metric} per seed:", "",
           "| variant | " + " | ".join(map(str, seeds)) + " | mean |",
           "| --- |" + " ---: |" * (len(seeds) + 1)]
    for name in meta["variants"]:
        scores = [by[name, s]["score"] if (name, s) in by else None for s in seeds]
        done = [x for x in scores if x is not None]
        mean = f"{statistics.fmean(done):.4f}" if done else ""
        out.append(f"| {name} | " + " | ".join(f"{x:.4f}" if x is not None else "" for x in scores) + f" | {mean} |")
    out += ["", "Samples/s per seed:", "", "| variant | " + " | ".join(map(str, seeds)) + " |",
            "| --- |" + " ---: |" * len(seeds)]
    for name in meta["variants"]:
        out.append(f"| {name} | " + " | ".join(f"{by[name, s]['samples_per_s']:.1f}" if (name, s) in by else ""
                                                for s in seeds) + " |")
    if any(r.get("mfu") for r in rows):
        peak = ", ".join(f"{dtype} {flops / 1e9:,.1f} GFLOP/s" for dtype, flops in meta["peak_matmul_flops"].items())
        out += ["", f"MFU (model FLOP/s over the peak matmul FLOP/s of the variant's compute dtype, best of the "
                    f"readings before and after the seeds: {peak}):", "",
                "| variant | median | range |", "| --- | ---: | ---: |"]
        for name in meta["variants"]:
            mfu = [by[name, s]["mfu"] for s in seeds if (name, s) in by and by[name, s].get("mfu")]
            if mfu:
                out.append(f"| {name} | {statistics.median(mfu):.2f} | {min(mfu):.2f}-{max(mfu):.2f} |")
    out += ["", f"Paired against `{meta['against']}` (variant minus it; 95% t-interval over seeds):", "",
            f"| variant | seeds | {metric} diff (points) | 95% interval | speed (median, range) | "
            "peak memory (median, max) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in meta["variants"]:
        p = paired(rows, name, meta["against"]) if name != meta["against"] else None
        if p:
            out.append(f"| {name} | {len(p['seeds'])} | {100 * p['mean']:+.2f} | "
                       f"{100 * p['low']:+.2f} .. {100 * p['high']:+.2f} | {_median_range(p['speed'])} | "
                       f"{statistics.median(p['memory']):.2f}x, {max(p['memory']):.2f}x |")
    return "\n".join(out) + "\n"


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main(argv=None) -> int:
    """`python -m peftkit.bench.seeds RESULTS.json [--against VARIANT]`: the paired table of a finished
    (or interrupted) seeds run again, against another variant if asked; nothing is retrained."""
    p = argparse.ArgumentParser(prog="python -m peftkit.bench.seeds", description=main.__doc__)
    p.add_argument("results", type=Path, help="a train-NAME-DEVICE-seeds.json file")
    p.add_argument("--against", help="the variant the others are paired with (default: the run's own)")
    args = p.parse_args(argv)
    if not args.results.is_file():
        p.exit(2, f"peftkit: error: {args.results} does not exist; `bench train ... --seeds` writes it\n")
    saved = json.loads(args.results.read_text())
    meta = saved["meta"] | ({"against": args.against} if args.against else {})
    if meta["against"] not in meta["variants"]:
        p.exit(2, f"peftkit: error: --against {meta['against']}: the run's variants are "
                  f"{', '.join(meta['variants'])}\n")
    print(paired_table(saved["rows"], meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
