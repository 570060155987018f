"""`peftkit train`: one recipe in, one evaluated, exported adapter out.

The loop is transformers' Trainer (so accelerate, multi-GPU and resuming come
with it); peftkit adds only what it lacks: checkpoints that hold the adapter
rather than the base, and a run folder that appears only when complete.
"""
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from peft.helpers import disable_input_dtype_casting
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .attach import attach
from .batching import LengthBucketSampler
from .datasource import load_splits
from .dropout import swap_in_fast_dropout
from .errors import PeftkitError
from .loading import check_config_overrides, load_model, load_tokenizer
from .meter import peak_memory_mb
from .precision import choose_attention, compute, describe, resolve_precision, store_frozen_in_bf16
from .presets import describe_spec, resolve_spec
from .recipe import Recipe
from .report import param_report
from .saving import restore_adapter_weights, staged_dir, write_adapter_files
from .tasks import task_module


class AdapterTrainer(Trainer):
    """Checkpoints hold the adapter and trained heads (plus optimizer state), never the base.
    A task may bring its own loss (generation computes logits for the answer tokens only)."""

    def __init__(self, model=None, *args, task_loss=None, bf16_inputs=False, **kwargs):
        # transformers refuses to train a quantized model unless peft (or its own adapter mixin)
        # attached the adapters; peftkit's bottleneck and prefix adapters are neither, so the
        # check sees trainable parameters on a quantized base as "no adapters". Vouch for them
        # while the check runs, then put the flag back.
        vouch = (getattr(model, "is_quantized", False) and not isinstance(model, PeftModel)
                 and not getattr(model, "_hf_peft_config_loaded", False)
                 and any(p.requires_grad for p in model.parameters()))
        if vouch:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if vouch:
                model._hf_peft_config_loaded = False
        self.task_loss = task_loss
        # Under bf16 autocast peft's LoRA layers cast their bf16 input to the fp32 adapter weights,
        # and autocast casts it straight back for the matmul: two copies per layer, each way, for
        # nothing. peft's own switch leaves the input as it comes (a no-op for our own methods).
        self.bf16_inputs = bf16_inputs

    def training_step(self, model, *args, **kwargs):
        with disable_input_dtype_casting(model, active=self.bf16_inputs):
            return super().training_step(model, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.task_loss is None or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Normalized over the whole accumulated batch when the Trainer counted its tokens
        # (as transformers' own causal-LM loss is); a per-batch mean otherwise.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        return self.task_loss(model, inputs, num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        return LengthBucketSampler([len(ids) for ids in dataset["input_ids"]], self.args.train_batch_size,
                                   seed=self.args.data_seed)

    def _save(self, output_dir=None, state_dict=None):
        if isinstance(self.model, PeftModel):
            return super()._save(output_dir, state_dict)
        os.makedirs(output_dir, exist_ok=True)
        write_adapter_files(self.model, Path(output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if isinstance(self.model, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapter_weights(self.model, Path(resume_from_checkpoint))


@dataclass
class Setup:
    """What a run needs before its adapter is attached: data prepared, base model loaded."""
    task: object
    tokenizer: object
    splits: object
    prepared: dict
    model: object
    quantize: str | None
    precision: str  # fp32 or bf16, resolved for this machine
    attention: str  # the attention implementation the model runs ("eager" where plain matmuls are faster)


def set_up(recipe: Recipe) -> Setup:
    task = task_module(recipe.task)
    precision = resolve_precision(recipe.train.precision)
    _, _, preset_quantize = resolve_spec(recipe.method)
    quantize = recipe.quantize or preset_quantize
    check_config_overrides(recipe.model, recipe.model_config)
    set_seed(recipe.train.seed)  # before the model is built: new heads and adapters draw their init from it
    tokenizer = load_tokenizer(recipe.model)
    splits = load_splits(recipe)
    prepared = task.prepare(recipe, splits, tokenizer)  # every data check happens here, before training
    taken = sorted(set(recipe.model_config) & set(prepared["model_kwargs"]))
    if taken:
        raise PeftkitError(f"model_config.{taken[0]} is set by the {recipe.task} task from the data and "
                           f"tokenizer ({', '.join(prepared['model_kwargs'])}); remove it from model_config")
    model = load_model(recipe.model, task=task.MODEL_TASK, quantize=quantize,
                       matmul_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                       **prepared["model_kwargs"], **recipe.model_config)
    attention = choose_attention(model, precision, recipe.train.batch_size, recipe.train.max_length)
    return Setup(task, tokenizer, splits, prepared, model, quantize, precision, attention)


def make_trainer(recipe: Recipe, setup: Setup, model, work: Path, save: bool = True,
                 callbacks=()) -> AdapterTrainer:
    """The Trainer for `model` (adapters attached), after the machine's fast path is set up on it:
    the frozen base stored in bf16 when training in bf16, and the cheap CPU dropout."""
    store_frozen_in_bf16(model, setup.precision)
    if recipe.train.fast_dropout:
        swap_in_fast_dropout(model)
    return AdapterTrainer(model=model, args=_arguments(recipe, work, setup.precision, save),
                          data_collator=setup.prepared["collator"], train_dataset=setup.prepared["train"],
                          task_loss=setup.prepared.get("loss"), callbacks=list(callbacks),
                          bf16_inputs=setup.precision == "bf16")


def train(recipe: Recipe, resume: bool = False) -> Path:
    run_dir = Path(recipe.output_dir) / recipe.name
    work = run_dir.parent / f".{recipe.name}.work"  # checkpoints live here until the run ends
    checkpoint = _checkpoint_to_resume(work, resume)

    setup = set_up(recipe)
    task, tokenizer, splits, quantize, precision = setup.task, setup.tokenizer, setup.splits, setup.quantize, \
        setup.precision
    with compute(precision):  # evaluation computes as training does
        before = task.evaluate(setup.model, tokenizer, splits["test"], recipe, desc="base model")
    baseline = task.baseline_scores(splits["test"], recipe) if hasattr(task, "baseline_scores") else None
    model = attach(setup.model, recipe.method, gradient_checkpointing=recipe.train.gradient_checkpointing)
    report = param_report(model)

    trainer = make_trainer(recipe, setup, model, work)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - start
    with compute(precision):
        after = task.evaluate(model, tokenizer, splits["test"], recipe, desc="adapted")

    metrics = {
        "task": recipe.task, "model": recipe.model, "method": recipe.method, "quantize": quantize,
        "precision": precision, "precision_detail": describe(precision, quantize, setup.attention),
        "fast_dropout": recipe.train.fast_dropout,
        "test_examples": len(splits["test"]), "base": before, "adapted": after,
        **({"baseline": baseline} if baseline else {}),
        "train_seconds": round(train_seconds, 1),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "trainable_params": report["trainable"], "total_params": report["total"],
        "trainable_ratio": report["ratio"],
    }
    _write_run(run_dir, model, recipe, metrics, trainer.state.log_history)
    shutil.rmtree(work, ignore_errors=True)
    print(summary(run_dir, metrics))
    return run_dir


def summary(run_dir: Path, metrics: dict) -> str:
    rows = [f"run          {run_dir}",
            f"model        {metrics['model']}  method {describe_spec(metrics['method'])}  "
            f"quantize {metrics['quantize']}",
            f"precision    {metrics['precision_detail']}"
            + ("; fast CPU dropout" if metrics["fast_dropout"] and not torch.cuda.is_available() else ""),
            f"trainable    {metrics['trainable_params']:,} of {metrics['total_params']:,} "
            f"({metrics['trainable_ratio']:.3%})",
            f"train        {metrics['train_seconds']} s, {metrics['train_samples_per_second']} samples/s, "
            f"peak memory {metrics['peak_memory_mb']} MB",
            f"test ({metrics['test_examples']} examples)"]
    for key in metrics["adapted"]:
        rows.append(f"  {key:<11} base {metrics['base'][key]:.4f}  ->  adapted {metrics['adapted'][key]:.4f}")
    rows.append(f"load it      peftkit.load_adapter(base_model, '{run_dir}')  or  peftkit predict {run_dir} --input -")
    return "\n".join(rows)


def _checkpoint_to_resume(work: Path, resume: bool) -> str | None:
    if not resume:
        shutil.rmtree(work, ignore_errors=True)  # a new run starts clean; a finished run's folder is untouched
        return None
    last = get_last_checkpoint(str(work / "checkpoints")) if (work / "checkpoints").is_dir() else None
    if last is None:
        raise PeftkitError(f"--resume: no checkpoint under {work / 'checkpoints'}; start the run without --resume")
    return last


def _arguments(recipe: Recipe, work: Path, precision: str, save: bool = True) -> TrainingArguments:
    t = recipe.train
    gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(work / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.schedule,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        logging_steps=t.logging_steps,
        save_strategy="steps" if save else "no",
        save_steps=t.save_steps,
        save_total_limit=2,
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        bf16=precision == "bf16",  # autocast; adapters and heads keep fp32 weights
        use_cpu=not gpu,
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def _write_run(run_dir: Path, model, recipe: Recipe, metrics: dict, log: list) -> None:
    with staged_dir(run_dir) as tmp:
        write_adapter_files(model, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(_saved_recipe(recipe), sort_keys=False))
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
        (tmp / "README.md").write_text(_model_card(run_dir, recipe, metrics))


def _saved_recipe(recipe: Recipe) -> dict:
    """The recipe as the run keeps it: a local model folder or data path made absolute, so the run
    reopens (`peftkit eval RUN`, `predict`) from any folder."""
    from .data import EMBEDDED_DATASETS

    saved = asdict(recipe)
    if Path(recipe.model).expanduser().is_dir():
        saved["model"] = str(Path(recipe.model).expanduser().resolve())
    dataset = Path(recipe.data.dataset).expanduser()
    if recipe.data.dataset not in EMBEDDED_DATASETS and dataset.exists():
        saved["data"]["dataset"] = str(dataset.resolve())
    return saved


def _model_card(run_dir: Path, recipe: Recipe, metrics: dict) -> str:
    scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics["adapted"].items())
    method, spec = resolve_spec(recipe.method)[0], describe_spec(recipe.method)
    adapter = f"{method} adapter" if spec == method else f"{method} adapter (`{spec}`)"
    return f"""# {recipe.name}

A {adapter} for
`{recipe.model}`, task `{recipe.task}`, trained by peftkit on `{recipe.data.dataset}`.

Test ({metrics['test_examples']} examples): {scores}.
Trainable parameters: {metrics['trainable_params']:,} of {metrics['total_params']:,}
({metrics['trainable_ratio']:.3%}).

```python
import peftkit
base = peftkit.load_model("{recipe.model}", task="{task_module(recipe.task).MODEL_TASK}")
model = peftkit.load_adapter(base, "{run_dir}")
```

or from the shell: `peftkit predict {run_dir} --input rows.jsonl`. The recipe that made it is recipe.yaml.
"""
