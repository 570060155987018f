"""The reports of `peftkit bench train`: the summary table, the markdown and JSON files, the loss
curves and the trainable-ratio vs metric chart, and each row's MFU.

    meta, rows = with_mfu(meta, rows, peaks)
    write_results(Path("benchmarks/results/train-sentiment-cpu"), meta, rows)   # .md, .json, two .png
"""
import json
import math
from pathlib import Path

from ..plots import pyplot, save, smooth
from .benchfile import SPECIAL, SWEEP_TIE
from .params_report import human_size

SPEED_WARMUP_STEPS = 1  # the Meter's default, which the table states: steps left out of speed and MFU
COLUMNS = [("variant", "variant"), ("base", "base"), ("precision", "compute"), ("ckpt", "grad ckpt"), ("lr", "lr"),
           ("ratio", "trainable"), ("file", "file"), ("sps", "samples/s"), ("tps", "tokens/s"),
           ("vs_tuned", "speed vs tuned ref"), ("vs_ref", "speed vs ref"),
           ("peak", "peak RSS MB"), ("added", "added MB"), ("mem_vs", "mem vs lora"), ("mfu", "MFU"),
           ("score", "metric"), ("loss", "final loss")]


def with_mfu(meta: dict, rows: list[dict], peaks: list[dict]) -> tuple[dict, list[dict]]:
    """The rows with their MFU, against the peak of the dtype each variant's matmuls run in, and the
    meta with the peak used: the higher reading of before and after, so MFU errs low on a shared machine."""
    peak = {dtype: max(reading[dtype] for reading in peaks) for dtype in peaks[0]}
    rows = [row | {"mfu": row["model_flops_per_s"] / peak[row["precision"]] if row.get("model_flops_per_s") else None}
            for row in rows]
    return meta | {"peak_matmul_flops": peak, "peak_readings": list(peaks)}, rows


def summary_table(rows: list[dict]) -> str:
    cells = _cells(rows)
    header = _titles(rows)
    widths = {key: max(len(header[key]), *(len(c[key]) for c in cells)) for key, _ in COLUMNS}
    lines = ["  ".join(header[k].ljust(widths[k]) for k, _ in COLUMNS)]
    lines += ["  ".join(c[k].ljust(widths[k]) for k, _ in COLUMNS) for c in cells]
    return "\n".join(line.rstrip() for line in lines)


def write_results(stem: Path, meta: dict, rows: list[dict]) -> None:
    from ..saving import atomic_write

    rows_text = ",\n".join("  " + json.dumps(row) for row in rows)  # a row a line: short diffs between runs
    atomic_write(stem.with_suffix(".json"), f'{{"meta": {json.dumps(meta)},\n "rows": [\n{rows_text}\n]}}\n')
    atomic_write(stem.with_suffix(".md"), markdown(meta, rows, stem.name))
    plot_losses(rows, stem.parent / f"{stem.name}-loss.png", meta)
    plot_ratio_vs_metric(rows, stem.parent / f"{stem.name}-ratio.png", meta)


def markdown(meta: dict, rows: list[dict], stem: str) -> str:
    cells = _cells(rows)
    r0 = rows[0]
    shared = ", ".join(f"{k}={v}" for k, v in {**meta["overrides"]}.items()) or "none"
    extra = " ".join(meta["extra"] + ([f"--only {','.join(meta['only'])}"] if meta.get("only") else []))
    out = [f"# Training benchmark: {Path(meta['bench']).stem}", "",
           f"Machine: **{meta['machine']}** ({meta['device']}), torch {meta['torch']}, {meta['threads']} threads; "
           f"{meta['date']}.", "",
           f"Regenerate: `peftkit bench train {meta['bench']}{' ' + extra if extra else ''}`", "",
           f"Recipe `{meta['recipe']}` with shared overrides {shared}; every variant: batch {r0['batch_size']}, "
           f"max_length {r0['max_length']}, {r0['steps']} steps, seed as in the recipe; test metric on "
           f"{r0['test_examples']} test examples.", "",
           "Peak matmul: " + ", ".join(
               f"{dtype} **{peak / 1e9:,.1f} GFLOP/s** (readings "
               f"{', '.join(f'{reading[dtype] / 1e9:,.1f}' for reading in meta['peak_readings'])})"
               for dtype, peak in meta["peak_matmul_flops"].items())
           + f", the best of readings before{' and after' if len(meta['peak_readings']) > 1 else ''} the variants.",
           "",
           "| " + " | ".join(_titles(rows).values()) + " |",
           "|" + "|".join(" --- " if k in ("variant", "base", "precision", "ckpt", "lr", "score") else " ---: " for k, _ in COLUMNS) + "|"]
    out += ["| " + " | ".join(c[k] for k, _ in COLUMNS) + " |" for c in cells]
    out += _sweep_table(meta, rows)
    if meta.get("failed"):
        out += ["", "**Failed** (no row): " + ", ".join(f"{f['variant']} (log `{f['log']}`)" for f in meta["failed"])]
    memory = ("*peak GPU* = `torch.cuda.max_memory_allocated` while training (weights included; reset when "
              "training starts); *added* = the same, as the process had nothing on the GPU before"
              if meta["device"] == "cuda" else
              "*peak RSS* = the process's peak resident memory while training (reset when training starts); "
              "*added* = peak RSS minus the RSS before the model was loaded (what the model and training add; "
              "the CPU analogue of `torch.cuda.max_memory_allocated`)")
    out += ["", "Columns: *trainable* = trainable / total parameters; *file* = the saved weights file (adapter and "
            "trained heads; the whole model for full); samples/s and tokens/s (non-padding tokens) over all steps "
            f"but the first {SPEED_WARMUP_STEPS}; *speed vs ref* = samples/s over the reference script's; {memory}; "
            "*mem vs lora* = added memory over fp32 LoRA's; *compute* = what the matmuls run in (bf16: "
            "autocast); *speed vs tuned ref* = samples/s over `reference-tuned`'s (the same script with length "
            "grouping, padding to 8, bf16 where native and fused AdamW); *MFU* = model "
            "FLOPs per second / the peak matmul FLOP/s of the variant's compute dtype, with model FLOPs = (2 forward + 2 backward + 2 per trainable "
            "weight) x the linear layers' weights x the tokens they see (attention score FLOPs not counted); "
            "*final loss* = mean training loss over the last 10% of steps.", "",
            f"![loss curves]({stem}-loss.png)", "", f"![trainable ratio vs metric]({stem}-ratio.png)", ""]
    return "\n".join(out)


def _sweep_table(meta: dict, rows: list[dict]) -> list[str]:
    """The learning-rate sweep's validation scores, a variant a line, the kept rate in bold."""
    swept = [r for r in rows if r.get("lr_sweep")]
    if not swept:
        return []
    sweep = meta["lr_sweep"]
    shorter = ", ".join(f"{k}={v}" for k, v in sweep["overrides"].items())
    out = ["", f"Learning rates marked *swept*: short runs ({shorter}) at each rate, scored by validation "
               f"{rows[0]['metric']} (and, in brackets, the training loss they ended at); the row above trained "
               f"at the best score, or, among scores within {SWEEP_TIE:g} of it, at the lowest loss. "
               "Variants that set their own lr were not swept.", "",
           "| variant | " + " | ".join(f"lr {v:g}" for v in sweep["values"]) + " |",
           "| --- |" + " ---: |" * len(sweep["values"])]
    for r in swept:
        cells = [(f"**{t['validation']:.4f}**" if t["lr"] == r["lr"] else f"{t['validation']:.4f}")
                 + f" ({t['final_loss']:.3f})" for t in r["lr_sweep"]]
        out.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return out


def plot_losses(rows: list[dict], path: Path, meta: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in rows:
        steps, losses = zip(*r["losses"]) if r["losses"] else ((), ())
        ax.plot(steps, smooth(list(losses)), label=r["variant"], linewidth=1.4,
                linestyle="--" if r["method"] in SPECIAL else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title(f"{Path(meta['bench']).stem}: training loss per variant ({meta['machine']})", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    save(fig, path)


def plot_ratio_vs_metric(rows: list[dict], path: Path, meta: dict) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.6), sharey=True)
    names = [r["variant"] for r in rows]
    percents = [100 * r["ratio"] for r in rows]
    floor = 10 ** math.floor(math.log10(min(percents)))  # bars start a decade under the smallest
    left.barh(names, [p - floor for p in percents], left=floor, color="tab:blue")
    left.set_xscale("log")
    left.set_xlim(floor, max(percents) * 8)
    for i, p in enumerate(percents):
        left.text(p, i, f" {p:.3g}%", va="center", fontsize=8)
    left.set_xlabel("trainable parameters (% of total, log scale)")
    right.barh(names, [r["score"] for r in rows], color="tab:green")
    right.set_xlabel(f"test {rows[0]['metric']}")
    for i, r in enumerate(rows):
        right.text(r["score"], i, f" {r['score']:.3f}", va="center", fontsize=8)
    left.invert_yaxis()
    fig.suptitle(f"{Path(meta['bench']).stem}: what each variant trains vs what it scores", fontsize=10)
    save(fig, path)


def one_line(row: dict) -> str:
    """A finished variant in a line of the progress output."""
    return (f"{row['variant']:<14} {row['samples_per_s']:8.2f} samples/s  {row['metric']} {row['score']:.4f}  "
            f"peak {row['peak_mb']:,.0f} MB")


def _cells(rows: list[dict]) -> list[dict]:
    ref = next((r for r in rows if r["method"] == "reference"), None)
    tuned = next((r for r in rows if r["method"] == "reference-tuned"), None)
    lora = next((r for r in rows if r["variant"] == "lora"), None)
    cells = []
    for r in rows:
        cells.append({
            "variant": r["variant"], "base": r["quantize"] or "fp32", "precision": r.get("precision", "fp32"),
            "ckpt": "yes" if r["gradient_checkpointing"] else "no",
            "lr": f"{r['lr']:g}" + (" (swept)" if r.get("lr_sweep") else ""),
            "ratio": f"{100 * r['ratio']:.3f}%", "file": human_size(r["file_bytes"]),
            "sps": f"{r['samples_per_s']:.2f}", "tps": f"{r['tokens_per_s']:,.0f}",
            "vs_ref": f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x" if ref else "",
            "vs_tuned": f"{r['samples_per_s'] / tuned['samples_per_s']:.2f}x" if tuned else "",
            "peak": f"{r['peak_mb']:,.0f}", "added": f"{r['peak_mb'] - r['baseline_mb']:,.0f}",
            "mem_vs": f"{(r['peak_mb'] - r['baseline_mb']) / (lora['peak_mb'] - lora['baseline_mb']):.2f}x"
            if lora else "",
            "mfu": _two_digits(r["mfu"]) if r.get("mfu") is not None else "",
            "score": f"{r['metric']} {r['score']:.4f}", "loss": f"{r['final_loss']:.3f}",
        })
    return cells


def _two_digits(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"  # 0.51, and a GPU's 0.0068 rather than 0.01


def _titles(rows: list[dict]) -> dict:
    on_gpu = rows[0]["peak_source"].startswith("torch.cuda")
    return {key: "peak GPU MB" if key == "peak" and on_gpu else title for key, title in COLUMNS}
