"""`peftkit train`: one recipe in, one evaluated, exported adapter out.

The loop is transformers' Trainer (so accelerate, DDP, early stopping, trackers and
resuming come with it); peftkit adds only what it lacks: validation by the task's own
metric (accuracy, SQuAD F1, ROUGE-L of generated text, which Trainer's loss-based
evaluation does not compute), checkpoints that hold the adapter rather than the base,
and a run folder that appears only when complete, written by the main process alone.
"""
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from transformers import EarlyStoppingCallback, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback

from .anatomy import pick_adapter, task_heads
from .attach import attach
from .attention import choose_attention
from .compiling import CompiledBlocks, resolve_compile
from .datasource import load_splits
from .dropout import swap_in_fast_dropout
from .errors import PeftkitError
from .loading import check_config_overrides, load_model, load_tokenizer, sharded_training
from .meter import peak_memory_mb
from .precision import compute, describe, resolve_precision, store_frozen_in_bf16
from .presets import AdapterSpec, describe_spec, resolve_spec
from .plots import plot_training
from .recipe import TASK_METRICS, Recipe, check_trackers
from .report import param_report
from .saving import staged_dir, write_adapter_files
from .tasks import Prepared, task_module
from .trainer import AdapterTrainer, RankAllocation, check_stop_after, stop_after

EVALUATIONS = 4  # validation passes per run when the recipe does not set train.eval_steps


@dataclass
class Setup:
    """What a run needs before its adapter is attached: data prepared, base model loaded."""
    task: object
    tokenizer: object
    splits: object
    prepared: Prepared
    model: object
    spec: AdapterSpec  # the method spec, resolved once (the recipe's quantize over its preset's; a rank
    # schedule's length set to the run's steps when the spec leaves it out)
    precision: str  # fp32 or bf16, resolved for this machine
    attention: str  # the attention implementation the model runs (attention.choose_attention)
    steps: int  # optimizer steps the run will take (fewer if it stops early)
    eval_steps: int  # steps between validation passes; 0: none


def set_up(recipe: Recipe, processes: int = 1) -> Setup:
    task = task_module(recipe.task)
    precision = resolve_precision(recipe.train.precision)
    spec = resolve_spec(recipe.method, recipe.quantize)
    check_config_overrides(recipe.model, recipe.model_config)
    set_seed(recipe.train.seed)  # before the model is built: new heads and adapters draw their init from it
    tokenizer = load_tokenizer(recipe.model)
    splits = load_splits(recipe)
    prepared = task.prepare(recipe, splits, tokenizer)  # every data check happens here, before training
    steps = planned_steps(recipe, len(prepared.train), processes)
    eval_steps = _eval_steps(recipe, steps)
    check_stop_after(recipe.train.stop_after_steps, steps)
    spec = replace(spec, options=spec.about.for_run(spec.options, steps))
    taken = sorted(set(recipe.model_config) & set(prepared.model_kwargs))
    if taken:
        raise PeftkitError(f"model_config.{taken[0]} is set by the {recipe.task} task from the data and "
                           f"tokenizer ({', '.join(prepared.model_kwargs)}); remove it from model_config")
    model = load_model(recipe.model, task=task.MODEL_TASK, quantize=spec.quantize,
                       matmul_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                       **prepared.model_kwargs, **recipe.model_config)
    spec.about.check_input_length(spec.options, model, recipe.train.max_length, "train.max_length")
    spec.about.config(spec.options, model, task_heads(model))  # refused here, not after the base's test: a fusion's
    # adapter folders trained on another base or for another task
    attention = choose_attention(model, precision, recipe.train.batch_size, recipe.train.max_length,
                                 recipe.train.attention)
    return Setup(task, tokenizer, splits, prepared, model, spec, precision, attention, steps, eval_steps)


def planned_steps(recipe: Recipe, train_rows: int, processes: int) -> int:
    """Optimizer steps of the run, as the Trainer counts them (each process takes its share of rows)."""
    t = recipe.train
    if t.max_steps > 0:
        return t.max_steps
    batches = math.ceil(math.ceil(train_rows / processes) / t.batch_size)
    return max(1, math.ceil(t.epochs * math.ceil(batches / t.grad_accum)))


def _eval_steps(recipe: Recipe, steps: int) -> int:
    wanted = recipe.train.eval_steps
    if wanted is None:
        return math.ceil(steps / EVALUATIONS)
    if wanted > steps:
        raise PeftkitError(f"train.eval_steps {wanted} is longer than the run ({steps} optimizer steps); "
                           f"set it to at most {steps}, or to 0 for no validation")
    return wanted


def make_trainer(recipe: Recipe, setup: Setup, model, work: Path, save: bool = True, callbacks=(),
                 validate: bool = False, method: str | None = None) -> AdapterTrainer:
    """The Trainer for `model` (adapters attached), after the machine's fast path is set up on it:
    the frozen base stored in bf16 when training in bf16, and the cheap CPU dropout. validate=True
    evaluates on the validation split every setup.eval_steps steps (with early stopping and the
    best checkpoint kept, as the recipe says). `method` names what trains when it is not the recipe's
    adapter (the bench's full fine-tuning), for the choices made per method."""
    store_frozen_in_bf16(model, setup.precision)
    if recipe.train.fast_dropout:
        swap_in_fast_dropout(model)
    eval_steps = setup.eval_steps if validate else 0
    compiled, compile_detail = resolve_compile(recipe.train.compile, model, setup.task.MODEL_TASK,
                                               method or setup.spec.method, setup.precision, setup.steps)
    callbacks = list(callbacks) + ([RankAllocation()] if setup.spec.about.rank_schedule else [])
    callbacks += stop_after(recipe.train.stop_after_steps)
    if eval_steps and recipe.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(recipe.train.early_stopping_patience,
                                               recipe.train.early_stopping_threshold))

    def validation_scores():
        with compute(setup.precision, model):  # validation computes as training does
            return setup.task.evaluate(model, setup.tokenizer, setup.splits["validation"], recipe, desc="validation")

    trainer = AdapterTrainer(model=model, args=_arguments(recipe, work, setup.precision, save, eval_steps),
                             data_collator=setup.prepared.collator, train_dataset=setup.prepared.train,
                             eval_dataset=setup.splits["validation"] if eval_steps else None,
                             validate=validation_scores, task_loss=setup.prepared.loss,
                             callbacks=callbacks, bf16_inputs=setup.precision == "bf16",
                             compiled=CompiledBlocks(model) if compiled else None)
    trainer.compile_detail = compile_detail
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):  # into the work folder; the run folder gets it at the end
            callback.logging_dir = str(work / "tensorboard")
    return trainer


def train(recipe: Recipe, resume: bool = False, test: bool = True) -> Path:
    """Train, validate, test and export one recipe. Under torchrun or `accelerate launch` every
    process trains (DDP); the main one alone evaluates the base and the result, prints the summary
    and writes the run folder. test=False leaves the test split alone (a sweep's trials are chosen
    by validation; only the chosen one is tested)."""
    check_trackers(recipe.train.report_to)
    _check_not_sharded()
    spec = resolve_spec(recipe.method, recipe.quantize)
    if resume and spec.about.why_no_resume:
        raise PeftkitError(f"--resume: {spec.method} {spec.about.why_no_resume}; start it again without --resume")
    # this process's place among those launched (one without a launcher); on a CPU accelerate joins
    # the launcher's processes only when told it runs on the CPU
    processes = PartialState(cpu=not torch.cuda.is_available())
    main = processes.is_main_process
    run_dir = Path(recipe.output_dir) / recipe.name
    work = work_dir(recipe)
    checkpoint = _checkpoint_to_resume(work, resume, clear=main)

    setup = set_up(recipe, processes.num_processes)
    task, tokenizer, splits, quantize, precision = setup.task, setup.tokenizer, setup.splits, setup.spec.quantize, \
        setup.precision
    before = None
    if main and test:
        with compute(precision):  # evaluation computes as training does
            before = task.evaluate(setup.model, tokenizer, splits["test"], recipe, desc="base model")
    baseline = task.baseline_scores(splits["test"], recipe) if test else None
    model = attach(setup.model, setup.spec, gradient_checkpointing=recipe.train.gradient_checkpointing)
    report = param_report(model)

    trainer = make_trainer(recipe, setup, model, work, validate=True)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    if not main:
        return run_dir
    after = None
    if test:
        with compute(precision, model):
            after = task.evaluate(model, tokenizer, splits["test"], recipe, desc="adapted")

    state, log = trainer.state, trainer.state.log_history
    validation = validation_history(log, recipe)
    training = seconds - trainer.validation_seconds
    # The Trainer's samples/s is its planned sample count over a runtime that includes validation
    planned = result.metrics["train_samples_per_second"] * result.metrics["train_runtime"]
    trained = planned * state.global_step / max(state.max_steps, 1)  # fewer when it stopped early
    speed = round(trained / max(result.metrics["train_runtime"] - trainer.validation_seconds, 1e-9), 3)
    metrics = {
        "task": recipe.task, "model": recipe.model, "method": recipe.method, "quantize": quantize,
        "precision": precision, "precision_detail": describe(precision, quantize, setup.attention),
        "fast_dropout": recipe.train.fast_dropout,
        "compiled": trainer.compiled is not None, "compile_detail": trainer.compile_detail,
        "test_examples": len(splits["test"]), "base": before, "adapted": after,
        **({"baseline": baseline} if baseline else {}),
        "metric_for_best": recipe.best_metric, "eval_steps": setup.eval_steps,
        "validation_examples": len(splits["validation"]) if validation else 0,
        "validation": validation, "best_step": state.best_global_step if validation else None,
        "kept": recipe.train.keep if validation else "last",
        "kept_validation": _kept_validation(validation, state, recipe),
        "stopped_step": state.global_step, "planned_steps": setup.steps,
        "world_size": processes.num_processes,
        "train_seconds": round(training, 1), "validation_seconds": round(trainer.validation_seconds, 1),
        "train_samples_per_second": speed,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "trainable_params": report["trainable"], "total_params": report["total"],
        "trainable_ratio": report["ratio"],
    }
    _write_run(run_dir, model, recipe, metrics, log, work)
    shutil.rmtree(work, ignore_errors=True)
    print(summary(run_dir, metrics))
    return run_dir


def _check_not_sharded() -> None:
    """FSDP and ZeRO-3 shard the model over the processes, so every forward pass needs all of them:
    evaluating and exporting on the main process alone, as a run ends, would wait forever. accelerate
    applies neither on a CPU (it trains with DDP there), so only a GPU launch is refused."""
    if sharded_training() and torch.cuda.is_available():
        raise PeftkitError("peftkit train does not yet evaluate and export a model sharded by FSDP or DeepSpeed "
                           "ZeRO-3; train with DDP instead: torchrun --nproc_per_node N -m peftkit train RECIPE "
                           "(recipes/launch/ configs serve Trainer scripts built on peftkit.attach)")


def validation_history(log: list[dict], recipe: Recipe) -> list[dict]:
    """[{"step": s, "<metric>": v, ...}] from the Trainer's log, one per validation pass."""
    names = TASK_METRICS[recipe.task]
    return [{"step": row["step"], **{name: row[f"eval_{name}"] for name in names if f"eval_{name}" in row}}
            for row in log if f"eval_{recipe.best_metric}" in row]


def _kept_validation(validation: list[dict], state, recipe: Recipe) -> dict | None:
    """The validation scores of the adapter the run keeps: at the best step, or the last pass."""
    if not validation:
        return None
    step = state.best_global_step if recipe.train.keep == "best" else validation[-1]["step"]
    kept = [row for row in validation if row["step"] == step] or validation[-1:]
    return {k: v for k, v in kept[-1].items() if k != "step"}


def summary(run_dir: Path, metrics: dict) -> str:
    rows = [f"run          {run_dir}",
            f"model        {metrics['model']}  method {describe_spec(metrics['method'])}  "
            f"quantize {metrics['quantize']}",
            f"precision    {metrics['precision_detail']}"
            + ("; fast CPU dropout" if metrics["fast_dropout"] and not torch.cuda.is_available() else ""),
            f"compile      {metrics['compile_detail']}",
            f"trainable    {metrics['trainable_params']:,} of {metrics['total_params']:,} "
            f"({metrics['trainable_ratio']:.3%})",
            f"train        {metrics['train_seconds']} s, {metrics['train_samples_per_second']} samples/s, "
            f"peak memory {metrics['peak_memory_mb']} MB"
            + (f", {metrics['world_size']} processes" if metrics["world_size"] > 1 else "")]
    if metrics["validation"]:
        metric, history = metrics["metric_for_best"], metrics["validation"]
        stopped = metrics["stopped_step"] < metrics["planned_steps"]
        rows.append(f"validation   {len(history)} passes on {metrics['validation_examples']} examples "
                    f"({metrics['validation_seconds']} s): {metric} "
                    + " ".join(f"{row[metric]:.4f}@{row['step']}" for row in history[-6:]))
        rows.append(f"kept         the {metrics['kept']} adapter: step "
                    f"{metrics['best_step'] if metrics['kept'] == 'best' else history[-1]['step']}, "
                    f"validation {metric} {metrics['kept_validation'][metric]:.4f}"
                    + (f"; stopped early at step {metrics['stopped_step']} of {metrics['planned_steps']}"
                       if stopped else ""))
    else:
        rows.append("validation   off (train.eval_steps: 0); the adapter of the last step is kept")
    if metrics["adapted"] is None:
        rows.append("test         not run (the run is scored on validation only)")
    else:
        rows.append(f"test ({metrics['test_examples']} examples)")
    for key in metrics["adapted"] or ():
        rows.append(f"  {key:<11} base {metrics['base'][key]:.4f}  ->  adapted {metrics['adapted'][key]:.4f}")
    tensorboard = (Path(run_dir) / "tensorboard").is_dir()
    rows.append("files        adapter, metrics.json, training.png"
                + (f", tensorboard/  (tensorboard --logdir {Path(run_dir).parent})" if tensorboard else ""))
    rows.append(f"load it      peftkit.load_adapter(base_model, '{run_dir}')  or  peftkit predict {run_dir} --input -")
    return "\n".join(rows)


def work_dir(recipe: Recipe) -> Path:
    """Where a run keeps its checkpoints and tracker files until it ends: beside its run folder."""
    return (Path(recipe.output_dir) / recipe.name).parent / f".{recipe.name}.work"


def last_checkpoint(work: Path) -> Path | None:
    """The latest complete checkpoint in a work folder. The Trainer writes its state last: a
    checkpoint without it was cut short by the interruption."""
    complete = sorted((int(p.name.split("-")[-1]), p) for p in (work / "checkpoints").glob("checkpoint-*")
                      if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file())
    return complete[-1][1] if complete else None


def _checkpoint_to_resume(work: Path, resume: bool, clear: bool = True) -> str | None:
    if not resume:
        if clear:  # a new run starts clean (the main process clears); a finished run's folder is untouched
            shutil.rmtree(work, ignore_errors=True)
        return None
    checkpoint = last_checkpoint(work)
    if checkpoint is None:
        raise PeftkitError(f"--resume: no complete checkpoint under {work / 'checkpoints'}; "
                           "start the run without --resume")
    return str(checkpoint)


def _arguments(recipe: Recipe, work: Path, precision: str, save: bool = True, eval_steps: int = 0) -> TrainingArguments:
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
        save_steps=eval_steps or t.save_steps,  # with validation, a checkpoint at each pass: the best is kept
        save_total_limit=2,  # the latest two, and the best one besides
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps or None,
        metric_for_best_model=recipe.best_metric if eval_steps else None,
        greater_is_better=True,  # accuracy, F1, ROUGE-L, exact match
        load_best_model_at_end=bool(eval_steps and save) and t.keep == "best",
        restore_callback_states_from_checkpoint=True,  # --resume: early stopping's count goes on
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        bf16=precision == "bf16",  # autocast; adapters and heads keep fp32 weights
        use_cpu=not gpu,
        report_to=list(t.report_to),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every adapter parameter takes part in every forward pass
        remove_unused_columns=False,
    )


def _write_run(run_dir: Path, model, recipe: Recipe, metrics: dict, log: list, work: Path) -> None:
    with staged_dir(run_dir) as tmp:
        write_adapter_files(model, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(_saved_recipe(recipe), sort_keys=False))
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
        (tmp / "README.md").write_text(_model_card(run_dir, recipe, metrics, pick_adapter(model)[1].method))
        plot_training(log, tmp / "training.png", recipe.best_metric,
                      f"{recipe.name}: {describe_spec(recipe.method)} on {recipe.model}")
        if (work / "tensorboard").is_dir():
            shutil.copytree(work / "tensorboard", tmp / "tensorboard")


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


def _model_card(run_dir: Path, recipe: Recipe, metrics: dict, method: str) -> str:
    scores = (", ".join(f"{k} {v:.4f}" for k, v in metrics["adapted"].items()) if metrics["adapted"]
              else "not run; validation " + ", ".join(f"{k} {v:.4f}" for k, v in (metrics["kept_validation"] or {}).items()))
    spec = describe_spec(recipe.method)
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
