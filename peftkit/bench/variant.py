"""One variant of a benchmark file trained and measured in this process: what the driver (train.py)
runs in a fresh process per variant, so that each variant's peak memory is its own.

    python -m peftkit.bench.variant --variant lora --out result.json [--split validation] \
        benchmarks/train-sentiment.yaml train.max_steps=4
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

from ..errors import PeftkitError
from .benchfile import REFERENCES, SPECIAL, Bench, Variant, load_bench, recipe_for


def run_variant(bench: Bench, variant: Variant, extra: list[str] = (), split: str = "test") -> dict:
    """Train one variant in this process and measure it, scored on `split` (a learning-rate sweep's
    short runs are judged on validation); the driver runs this in a fresh process."""
    import peft  # noqa: F401  every variant's libraries are in memory before the baseline is read
    import torch
    from transformers import Trainer  # noqa: F401

    from ..compiling import share_libstdcxx
    share_libstdcxx()  # the reference's torch_compile loads inductor's cached kernels as compiled blocks do

    from ..meter import Meter, rss_mb
    from ..precision import compute
    from ..report import param_report

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
        scores = task.evaluate(model, tokenizer, splits[split], recipe, desc=split)
    metric = recipe.best_metric
    return {
        "variant": variant.name, "method": variant.method, "quantize": variant.quantize, "precision": precision,
        "gradient_checkpointing": bool(getattr(model, "is_activation_checkpointing", False)),
        "lr": recipe.train.lr, "batch_size": recipe.train.batch_size, "max_length": recipe.train.max_length,
        "trainable": report["trainable"], "total": report["total"], "ratio": report["ratio"],
        "file_bytes": _saved_bytes(model, variant.method), "baseline_mb": baseline_mb,
        **meter.result(), "metric": metric, "score": scores[metric], "scores": scores,
        "test_examples": min(len(splits[split]), recipe.data.max_eval_samples or len(splits[split])),
    }


def main(argv=None) -> int:
    """`python -m peftkit.bench.variant --variant NAME --out FILE BENCH [overrides]`: one variant."""
    p = argparse.ArgumentParser(prog="python -m peftkit.bench.variant")
    p.add_argument("bench")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--variant", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=("validation", "test"), default="test", help="the split the row is scored on")
    args = p.parse_args(argv)
    bench = load_bench(args.bench)
    variant = next((v for v in bench.variants if v.name == args.variant), None)
    if variant is None:
        raise PeftkitError(f"no variant {args.variant!r} in {args.bench}")
    result = run_variant(bench, variant, args.overrides, args.split)
    Path(args.out).write_text(json.dumps(result))
    return 0


def _trainer(bench: Bench, variant: Variant, recipe, work: Path, meter) -> tuple:
    """(trainer, tokenizer, splits, task, precision) for a variant: peftkit's recipe path, full fine-tuning
    on that same path, or the reference script."""
    import torch
    from transformers import set_seed

    from ..attach import attach
    from ..datasource import load_splits
    from ..embedded import resolve_model
    from ..loading import load_tokenizer
    from ..precision import native_bf16
    from ..tasks import task_module
    from ..train import make_trainer, set_up

    if variant.method in REFERENCES:
        set_seed(recipe.train.seed)
        splits = load_splits(recipe)
        tuned = variant.method == "reference-tuned"
        # bf16 autocast: the plain script as users write it turns it on for bf16 GPUs only; the
        # tuned one wherever the hardware computes bf16 natively (a CPU with AVX512-BF16 or AMX too)
        bf16 = native_bf16() if tuned else torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        from ..trainer import stop_after  # train.stop_after_steps holds for the reference's Trainer too
        stop = stop_after(recipe.train.stop_after_steps)
        trainer = _import_script(bench.reference).build(resolve_model(recipe.model), splits, str(work),
                                                        callbacks=[meter, *stop], bf16=bf16, tuned=tuned,
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
    trainer = make_trainer(recipe, setup, model, work, save=False, callbacks=[meter],
                           method="full" if variant.method == "full" else None)
    return trainer, setup.tokenizer, setup.splits, setup.task, setup.precision


def _hyperparameters(recipe) -> dict:
    """What the reference script is told: the recipe's training settings (and instruction, and
    model config changes, so both sides train the same model)."""
    t = recipe.train
    return {"lr": t.lr, "batch_size": t.batch_size, "epochs": t.epochs, "max_steps": t.max_steps,
            "max_length": t.max_length, "warmup_ratio": t.warmup_ratio, "seed": t.seed,
            "logging_steps": t.logging_steps, "instruction": recipe.data.instruction, "torch_compile": t.compile is True,
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
    from ..saving import write_adapter_files

    with tempfile.TemporaryDirectory() as tmp:
        if method in SPECIAL:  # a PeftModel (reference) or a plain model (full): their own save_pretrained
            model.save_pretrained(tmp)
        else:
            write_adapter_files(model, Path(tmp))
        return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))


if __name__ == "__main__":
    sys.exit(main())
