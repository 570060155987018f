"""Samples/s and peak memory against sequence length and batch size, peftkit LoRA vs reference-tuned.

    python benchmarks/scaling.py [--lengths 64,128,256,512] [--batches 8,16,32,64] [--out DIR]

Two sweeps through benchmarks/scaling.yaml: the length at batch 16, the batch at
128 tokens. Each point trains both variants for a few steps, each in its own process (as
`peftkit bench train`), with every batch cut to the full length so that the length is what
is measured. Writes scaling-DEVICE.md and .json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftkit.bench.benchfile import load_bench, selected  # noqa: E402
from peftkit.bench.machine import default_device, machine_info  # noqa: E402
from peftkit.bench.train import run_child, warm_up  # noqa: E402
from peftkit.saving import atomic_write  # noqa: E402

VARIANTS = ["lora", "reference-tuned"]


def points(lengths: list[int], batches: list[int]) -> list[tuple[int, int]]:
    sweep = [(length, 16) for length in lengths] + [(128, batch) for batch in batches]
    return list(dict.fromkeys(sweep))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="64,128,256,512")
    p.add_argument("--batches", default="8,16,32,64")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    bench = load_bench(ROOT / "benchmarks" / "scaling.yaml")
    device = default_device()
    grid = points([int(x) for x in args.lengths.split(",")], [int(x) for x in args.batches.split(",")])
    variants = selected(bench, VARIANTS, [])
    log_dir = ROOT / "runs" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    warm_up(bench, variants[0], [], log_dir / f"scaling-warmup-{device}.log")
    meta = machine_info(device) | {
        "command": "python benchmarks/scaling.py --lengths " + args.lengths + " --batches " + args.batches,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows = []
    for length, batch in grid:
        # the padding collator pads each batch to its longest row: truncating BBC articles to `length`
        # makes every row exactly that long
        extra = [f"train.max_length={length}", f"train.batch_size={batch}"]
        for variant in variants:
            log = log_dir / f"scaling-{variant.name}-L{length}-B{batch}-{device}.log"
            row = run_child(bench, variant, extra, log)
            rows.append({k: row[k] for k in ("variant", "precision", "samples_per_s", "tokens_per_s", "peak_mb",
                                              "baseline_mb", "timed_steps")} | {"length": length, "batch": batch})
            print(f"L={length:<4} B={batch:<3} {variant.name:<16} {row['samples_per_s']:8.2f} samples/s  "
                  f"peak {row['peak_mb']:,.0f} MB", flush=True)
            write(args.out / f"scaling-{device}", meta, rows)
    return 0


def write(stem: Path, meta: dict, rows: list[dict]) -> None:
    atomic_write(stem.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    by = {(r["variant"], r["length"], r["batch"]): r for r in rows}
    out = ["# Training cost against sequence length and batch size", "",
           f"Machine: **{meta['machine']}** ({meta['device']}), torch {meta['torch']}, {meta['threads']} threads; "
           f"{meta['date']}.", "", f"Regenerate: `{meta['command']}`", "",
           "peftkit LoRA (the topic recipe's, at its defaults) and `reference-tuned` (peft + Trainer with length "
           "grouping, padding to 8, bf16 where native, fused AdamW) on BBC articles cut to the length, "
           f"{rows[0]['timed_steps']} timed steps each; peak RSS while training.", "",
           "| tokens | batch | peftkit samples/s | reference-tuned samples/s | speed x | peftkit peak MB | "
           "reference-tuned peak MB | memory x |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for length, batch in dict.fromkeys((r["length"], r["batch"]) for r in rows):
        ours, ref = by.get(("lora", length, batch)), by.get(("reference-tuned", length, batch))
        if not (ours and ref):
            continue
        out.append(f"| {length} | {batch} | {ours['samples_per_s']:.1f} | {ref['samples_per_s']:.1f} | "
                   f"{ours['samples_per_s'] / ref['samples_per_s']:.2f}x | {ours['peak_mb']:,.0f} | "
                   f"{ref['peak_mb']:,.0f} | {ours['peak_mb'] / ref['peak_mb']:.2f}x |")
    atomic_write(stem.with_suffix(".md"), "\n".join(out) + "\n")


if __name__ == "__main__":
    sys.exit(main())
