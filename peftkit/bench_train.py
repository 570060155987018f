"""`peftkit bench train`: every method trained on one recipe, side by side, in one run.

    peftkit bench train benchmarks/train-sentiment.yaml
    peftkit bench train benchmarks/train-headlines.yaml --only lora,reference train.max_steps=4

A benchmark file names a recipe, overrides shared by every variant (same data,
seed, steps and batch shape) and the variants: a method preset (optionally on a
4-bit/8-bit base), `full` (every weight trains), `reference` (peft's LoRA
through a plain Trainer script, benchmarks/reference/, the way users write it
today) or `reference-tuned` (the same script with what a knowledgeable Trainer
user adds: length grouping, padding to 8, bf16 where native, fused AdamW). Each
variant trains in its own process, so its peak memory is its own.

Per variant: trainable ratio, adapter file size, samples/s and tokens/s (real,
non-padding tokens), peak memory while training, the recipe's test metric, and
model FLOP utilization (MFU): the step's model FLOPs (forward 2*N*tokens,
backward through frozen weights 2*N*tokens, weight gradients 2*N_trainable*tokens,
N summed over the linear layers a token passes through) per second, over the
peak matmul FLOP/s measured on this machine in this run in the dtype the variant
computes in (fp32, or bf16 under autocast). Results: a markdown
table, a JSON file, the loss curves and a trainable-ratio vs metric chart.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .bench import human_size
from .errors import PeftkitError
from .plots import pyplot, save, smooth
from .presets import read_yaml, resolve_spec
from .shipped import CHECKOUT, shipped_root

ROOT = shipped_root()  # benchmark files name paths under it (recipes/..., benchmarks/reference/...)
# the repository's results folder in a checkout; from an installed wheel, one under the current folder
RESULTS_DIR = ROOT / "benchmarks" / "results" if ROOT == CHECKOUT else Path("benchmarks") / "results"
REFERENCES = ("reference", "reference-tuned")  # peft + a plain Trainer script: as is, and tuned
SPECIAL = ("full", *REFERENCES)
SPEED_WARMUP_STEPS = 1  # the first step (allocator warm-up, lazy init) is left out of speed and MFU
WARMUP_STEPS = 20  # the untimed run before the table: enough batch shapes to load the common kernels


# ---------------------------------------------------------------------------- the benchmark file

@dataclass
class Variant:
    name: str
    method: str  # a preset name or path, "full", "reference" or "reference-tuned"
    quantize: str | None = None
    overrides: dict = field(default_factory=dict)  # dotted recipe keys, this variant only


@dataclass
class Bench:
    name: str
    path: Path
    recipe: str
    reference: Path
    overrides: dict
    variants: list[Variant]


def load_bench(path) -> Bench:
    path = Path(path)
    if not path.is_file():
        raise PeftkitError(f"benchmark file {path} does not exist; shipped: "
                           + ", ".join(str(p) for p in sorted(path.parent.glob("train-*.yaml"))))
    data = read_yaml(path)
    allowed = {"name", "recipe", "reference", "overrides", "variants"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PeftkitError(f"{path}: unknown key {unknown[0]}; allowed: {', '.join(sorted(allowed))}")
    for key in ("name", "recipe", "variants"):
        if key not in data:
            raise PeftkitError(f"{path}: missing key {key}")
    if not isinstance(data["variants"], dict) or not data["variants"]:
        raise PeftkitError(f"{path}: variants must be a mapping of name -> settings")
    variants = [_variant(name, settings or {}, path) for name, settings in data["variants"].items()]
    reference = data.get("reference")
    if any(v.method in REFERENCES for v in variants) and not reference:
        raise PeftkitError(f"{path}: a reference variant needs `reference: path/to/script.py`")
    reference = Path(_repo_path(str(reference))) if reference else None
    if reference is not None and not reference.is_file():
        raise PeftkitError(f"{path}: reference script {reference} does not exist")
    return Bench(str(data["name"]), path, str(data["recipe"]), reference, dict(data.get("overrides") or {}),
                 variants)


def _variant(name: str, settings: dict, path: Path) -> Variant:
    if not isinstance(settings, dict):
        raise PeftkitError(f"{path}: variant {name} must map settings (method, quantize, dotted recipe keys)")
    settings = dict(settings)
    method = str(settings.pop("method", name))
    quantize = settings.pop("quantize", None)
    if method not in SPECIAL:
        resolve_spec(method)  # an unknown preset fails here, before anything trains
    elif quantize is not None:
        raise PeftkitError(f"{path}: variant {name}: {method} runs on the unquantized base; drop quantize")
    return Variant(name, method, quantize, settings)


def recipe_for(bench: Bench, variant: Variant, extra: list[str] = ()):
    """The recipe a variant trains: the bench's recipe with the shared overrides, the variant's
    method/quantize and own overrides, then the command line's."""
    from .recipe import load_recipe

    # Timed training only: no validation passes inside the timed loop, no tracker files.
    items = ["train.eval_steps=0", "train.report_to=[]"]
    items += [f"{k}={json.dumps(v)}" for k, v in bench.overrides.items()]
    if variant.method not in SPECIAL:
        items.append(f"method={variant.method}")
    if variant.quantize:
        items.append(f"quantize={variant.quantize}")
    items += [f"{k}={json.dumps(v)}" for k, v in variant.overrides.items()]
    recipe = load_recipe(_repo_path(bench.recipe), items + list(extra))
    recipe.name = f"bench-{bench.name}-{variant.name}"
    return recipe


def _shown(path: Path) -> str:
    """A path as a reader of the results should type it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _repo_path(name: str) -> str:
    path = Path(name)
    return str(ROOT / path) if not path.is_absolute() and (ROOT / path).is_file() else name


# ---------------------------------------------------------------------------- the driver

def run(bench: Bench, extra: list[str] = (), only: list[str] | None = None, out_dir: Path = RESULTS_DIR,
        log_dir: Path = Path("runs") / "bench") -> list[dict]:
    """Train every variant (each in a fresh process, its output in log_dir), then write the table and plots."""
    from tqdm.auto import tqdm

    variants = selected(bench, only, extra)
    device = "cuda" if _cuda() else "cpu"
    peaks = [matmul_peaks(device)]
    meta = _machine(device) | {"bench": _shown(bench.path), "only": list(only or []), "recipe": bench.recipe,
                               "overrides": bench.overrides, "extra": list(extra),
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    stem = out_dir / f"train-{bench.name}-{device}"
    rows, failed = [], []
    log_dir.mkdir(parents=True, exist_ok=True)
    _warm_up(bench, variants[0], extra, log_dir / f"{bench.name}-warmup-{device}.log")
    for variant in tqdm(variants, desc=f"bench {bench.name}", unit="variant"):
        log = log_dir / f"{bench.name}-{variant.name}-{device}.log"
        try:
            rows.append(_run_child(bench, variant, extra, log))
            tqdm.write(_one_line(rows[-1]))
        except PeftkitError as error:  # one broken variant must not cost the others' results
            failed.append({"variant": variant.name, "log": str(log)})
            tqdm.write(str(error))
        if rows:  # the table so far is on disk after every variant: an interrupted run keeps it
            _finish(stem, meta, rows, failed, peaks)
    peaks.append(matmul_peaks(device))
    if rows:
        rows = _finish(stem, meta, rows, failed, peaks)
        print(summary_table(rows))
        print(f"\nresults: {stem}.md, {stem}.json, {stem}-loss.png, {stem}-ratio.png")
    if failed:
        raise PeftkitError(f"{len(failed)} of {len(variants)} variants failed: "
                           + ", ".join(f"{f['variant']} (log {f['log']})" for f in failed))
    return rows


def selected(bench: Bench, only: list[str] | None, extra: list[str]) -> list[Variant]:
    """The variants `--only` names (all without it), each recipe loaded once to fail before any training."""
    variants = bench.variants
    if only:
        names = [v.name for v in variants]
        missing = [n for n in only if n not in names]
        if missing:
            raise PeftkitError(f"--only: no variant {missing[0]!r} in {bench.path}; variants: {', '.join(names)}")
        variants = [v for v in variants if v.name in only]
    for variant in variants:
        recipe_for(bench, variant, extra)
    return variants


def _warm_up(bench: Bench, variant: Variant, extra: list[str], log: Path) -> None:
    """A short untimed run first, so that no timed variant pays for the machine's cold start.

    On an H200 the first variant of a table spent ~15 s on its first 40 steps, the sixth ~4 s, and
    from step 100 on they ran equally fast. The likely cause is CUDA loading kernels lazily from the
    libraries' files: from disk the first time, from the page cache after. Without a warm-up the
    table's order shows in its speeds.
    """
    planned = recipe_for(bench, variant, extra).train.max_steps  # -1: epochs decide
    steps = WARMUP_STEPS if planned <= 0 else min(planned, WARMUP_STEPS)
    try:
        _run_child(bench, variant, [*extra, f"train.max_steps={steps}", "data.max_eval_samples=8"], log)
    except PeftkitError as error:  # the timed run of this variant will fail the same way and be reported
        print(f"warm-up run failed; going on: {str(error).splitlines()[0]}", file=sys.stderr)


def _finish(stem: Path, meta: dict, rows: list[dict], failed: list[dict], peaks: list[dict]) -> list[dict]:
    meta, rows = with_mfu(meta, rows, peaks)
    write_results(stem, meta | {"failed": failed}, rows)
    return rows


def with_mfu(meta: dict, rows: list[dict], peaks: list[dict]) -> tuple[dict, list[dict]]:
    """The rows with their MFU, against the peak of the dtype each variant's matmuls run in, and the
    meta with the peak used: the higher reading of before and after, so MFU errs low on a shared machine."""
    peak = {dtype: max(reading[dtype] for reading in peaks) for dtype in peaks[0]}
    rows = [row | {"mfu": row["model_flops_per_s"] / peak[row["precision"]] if row.get("model_flops_per_s") else None}
            for row in rows]
    return meta | {"peak_matmul_flops": peak, "peak_readings": list(peaks)}, rows


def _run_child(bench: Bench, variant: Variant, extra: list[str], log: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "peftkit.bench_train", "--variant", variant.name, "--out", str(out),
                   str(bench.path), *extra]
        with open(log, "w") as handle:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
        if code != 0 or not out.is_file():
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise PeftkitError(f"variant {variant.name} failed (exit {code}); log {log}:\n{tail}")
        return json.loads(out.read_text())


def _one_line(row: dict) -> str:
    return (f"{row['variant']:<14} {row['samples_per_s']:8.2f} samples/s  {row['metric']} {row['score']:.4f}  "
            f"peak {row['peak_mb']:,.0f} MB")


def matmul_peaks(device: str) -> dict:
    """{"fp32": FLOP/s, "bf16": FLOP/s}: this machine's matmul peak in each dtype a variant can compute in."""
    import torch

    return {name: peak_matmul_flops(device, dtype) for name, dtype in (("fp32", torch.float32),
                                                                        ("bf16", torch.bfloat16))}


def peak_matmul_flops(device: str, dtype, seconds: float = 3.0) -> float:
    """The best FLOP/s of large square matmuls in `dtype`, over several timed windows."""
    import torch

    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - start))
    return best


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _machine(device: str) -> dict:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor() or platform.machine()) \
            if Path("/proc/cpuinfo").is_file() else platform.machine()
        name = f"{model}, {os.cpu_count()} cores"
    return {"device": device, "machine": name, "torch": torch.__version__, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------- one variant (child process)

def run_variant(bench: Bench, variant: Variant, extra: list[str] = ()) -> dict:
    """Train one variant in this process and measure it; the driver runs this in a fresh process."""
    import peft  # noqa: F401  every variant's libraries are in memory before the baseline is read
    import torch
    from transformers import Trainer  # noqa: F401

    from .meter import Meter, rss_mb
    from .precision import compute
    from .report import param_report

    # RSS with the libraries loaded and no model yet; CUDA's counter starts at 0 with the process
    baseline_mb = 0.0 if torch.cuda.is_available() else rss_mb()
    recipe = recipe_for(bench, variant, extra)
    meter = Meter()
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-work-") as work:
        trainer, tokenizer, splits, task, precision = _trainer(bench, variant, recipe, Path(work), meter)
        model = trainer.model
        report = param_report(model)
        meter.watch(model)
        trainer.train()
        meter.unwatch()
    with compute(precision, model):  # every variant is tested as it trained
        scores = task.evaluate(model, tokenizer, splits["test"], recipe, desc="test")
    metric = recipe.best_metric
    return {
        "variant": variant.name, "method": variant.method, "quantize": variant.quantize, "precision": precision,
        "gradient_checkpointing": bool(getattr(model, "is_activation_checkpointing", False)),
        "lr": recipe.train.lr, "batch_size": recipe.train.batch_size, "max_length": recipe.train.max_length,
        "trainable": report["trainable"], "total": report["total"], "ratio": report["ratio"],
        "file_bytes": _saved_bytes(model, variant.method), "baseline_mb": baseline_mb,
        **meter.result(), "metric": metric, "score": scores[metric], "scores": scores,
        "test_examples": min(len(splits["test"]), recipe.data.max_eval_samples or len(splits["test"])),
    }


def _trainer(bench: Bench, variant: Variant, recipe, work: Path, meter) -> tuple:
    """(trainer, tokenizer, splits, task, precision) for a variant: peftkit's recipe path, full fine-tuning
    on that same path, or the reference script."""
    import torch
    from transformers import set_seed

    from .attach import attach
    from .datasource import load_splits
    from .embedded import resolve_model
    from .loading import load_tokenizer
    from .precision import native_bf16
    from .tasks import task_module
    from .train import make_trainer, set_up

    if variant.method in REFERENCES:
        set_seed(recipe.train.seed)
        splits = load_splits(recipe)
        tuned = variant.method == "reference-tuned"
        # bf16 autocast: the plain script as users write it turns it on for bf16 GPUs only; the
        # tuned one wherever the hardware computes bf16 natively (a CPU with AVX512-BF16 or AMX too)
        bf16 = native_bf16() if tuned else torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        trainer = _import_script(bench.reference).build(resolve_model(recipe.model), splits, str(work),
                                                        callbacks=[meter], bf16=bf16, tuned=tuned,
                                                        **_hyperparameters(recipe))
        return trainer, load_tokenizer(recipe.model), splits, task_module(recipe.task), "bf16" if bf16 else "fp32"
    setup = set_up(recipe)
    if variant.method == "full":
        model = setup.model
        model.requires_grad_(True)
        if recipe.train.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = attach(setup.model, setup.spec, gradient_checkpointing=recipe.train.gradient_checkpointing)
    trainer = make_trainer(recipe, setup, model, work, save=False, callbacks=[meter])
    return trainer, setup.tokenizer, setup.splits, setup.task, setup.precision


def _hyperparameters(recipe) -> dict:
    """What the reference script is told: the recipe's training settings (and instruction, and
    model config changes, so both sides train the same model)."""
    t = recipe.train
    return {"lr": t.lr, "batch_size": t.batch_size, "epochs": t.epochs, "max_steps": t.max_steps,
            "max_length": t.max_length, "warmup_ratio": t.warmup_ratio, "seed": t.seed,
            "logging_steps": t.logging_steps, "instruction": recipe.data.instruction,
            "model_config": recipe.model_config}


def _import_script(path: Path):
    """The reference script as a module (it is our own file under benchmarks/reference/)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saved_bytes(model, method: str) -> int:
    """Bytes of the weights file a user keeps: the adapter (with trained heads), or the whole model for full."""
    from .saving import write_adapter_files

    with tempfile.TemporaryDirectory() as tmp:
        if method in SPECIAL:  # a PeftModel (reference) or a plain model (full): their own save_pretrained
            model.save_pretrained(tmp)
        else:
            write_adapter_files(model, Path(tmp))
        return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))


# ---------------------------------------------------------------------------- reports

COLUMNS = [("variant", "variant"), ("base", "base"), ("precision", "compute"), ("ckpt", "grad ckpt"),
           ("ratio", "trainable"), ("file", "file"), ("sps", "samples/s"), ("tps", "tokens/s"),
           ("vs_tuned", "speed vs tuned ref"), ("vs_ref", "speed vs ref"),
           ("peak", "peak RSS MB"), ("added", "added MB"), ("mem_vs", "mem vs lora"), ("mfu", "MFU"),
           ("score", "metric"), ("loss", "final loss")]


def _cells(rows: list[dict]) -> list[dict]:
    ref = next((r for r in rows if r["method"] == "reference"), None)
    tuned = next((r for r in rows if r["method"] == "reference-tuned"), None)
    lora = next((r for r in rows if r["variant"] == "lora"), None)
    cells = []
    for r in rows:
        cells.append({
            "variant": r["variant"], "base": r["quantize"] or "fp32", "precision": r.get("precision", "fp32"),
            "ckpt": "yes" if r["gradient_checkpointing"] else "no",
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


def summary_table(rows: list[dict]) -> str:
    cells = _cells(rows)
    header = _titles(rows)
    widths = {key: max(len(header[key]), *(len(c[key]) for c in cells)) for key, _ in COLUMNS}
    lines = ["  ".join(header[k].ljust(widths[k]) for k, _ in COLUMNS)]
    lines += ["  ".join(c[k].ljust(widths[k]) for k, _ in COLUMNS) for c in cells]
    return "\n".join(line.rstrip() for line in lines)


def write_results(stem: Path, meta: dict, rows: list[dict]) -> None:
    from .saving import atomic_write

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
           "|" + "|".join(" --- " if k in ("variant", "base", "precision", "ckpt", "score") else " ---: " for k, _ in COLUMNS) + "|"]
    out += ["| " + " | ".join(c[k] for k, _ in COLUMNS) + " |" for c in cells]
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


# ---------------------------------------------------------------------------- command line

def add_parser(kinds) -> None:
    p = kinds.add_parser("train", help="train every method on a recipe side by side: speed, memory, MFU, metric",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", help="a benchmark file, e.g. benchmarks/train-sentiment.yaml")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides for every variant, e.g. train.max_steps=4")
    p.add_argument("--only", help="comma-separated variant names to run")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for the results (default benchmarks/results)")
    p.add_argument("--seeds", help="train every variant at each of these seeds (e.g. 1-8) and pair them "
                                   "seed by seed: metric difference with its interval, speed and memory ratios")
    p.add_argument("--against", help="with --seeds: the variant the others are paired with "
                                     "(default reference-tuned)")


def run_command(args) -> int:
    from .bench_seeds import parse_seeds, run_seeds

    bench = load_bench(_repo_path(args.bench))
    only = args.only.split(",") if args.only else None
    if args.seeds:
        seeds = parse_seeds(args.seeds)
        if any(item.startswith("train.seed=") for item in args.overrides):
            raise PeftkitError("--seeds sets train.seed for every run; drop the train.seed override")
        run_seeds(bench, seeds, args.overrides, selected(bench, only, args.overrides), Path(args.out),
                  Path("runs") / "bench", args.against)
    elif args.against:
        raise PeftkitError("--against pairs seeds: use it with --seeds")
    else:
        run(bench, args.overrides, only, Path(args.out))
    return 0


def _child_main(argv=None) -> int:
    """`python -m peftkit.bench_train --variant NAME --out FILE BENCH [overrides]`: one variant."""
    p = argparse.ArgumentParser(prog="python -m peftkit.bench_train")
    p.add_argument("bench")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--variant", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    bench = load_bench(args.bench)
    variant = next((v for v in bench.variants if v.name == args.variant), None)
    if variant is None:
        raise PeftkitError(f"no variant {args.variant!r} in {args.bench}")
    result = run_variant(bench, variant, args.overrides)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
