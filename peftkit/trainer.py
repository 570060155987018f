"""AdapterTrainer: transformers' Trainer with adapter-only checkpoints, a task's own loss and
validation by the task's metric; train.make_trainer builds it for a recipe."""
import contextlib
import os
import time
from pathlib import Path

from peft import PeftModel
from transformers import Trainer, TrainerCallback

from .batching import LengthBucketSampler
from .errors import PeftkitError
from .precision import input_cast_switches, inputs_as_they_come
from .saving import restore_adapter_weights, write_adapter_files
from .tuners.bottleneck.fusion import regularization as fusion_regularization


class AdapterTrainer(Trainer):
    """Checkpoints hold the adapter and trained heads (plus optimizer state), never the base.
    A task may bring its own loss (generation computes logits for the answer tokens only)."""

    def __init__(self, model=None, *args, task_loss=None, bf16_inputs=False, validate=None, compiled=None,
                 **kwargs):
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
        # A classification or QA model's own loss is a per-batch mean whatever num_items_in_batch says.
        # Its forward takes **kwargs, so the Trainer would take it for a sum over the counted items: no
        # division over gradient accumulation, and times the process count under DDP (2x on 2 ranks).
        self.model_accepts_loss_kwargs = task_loss is not None
        self.validate = validate  # () -> the task's metrics on the validation split
        self.validation_seconds = 0.0
        # Under bf16 autocast peft's LoRA layers cast their bf16 input to the fp32 adapter weights,
        # and autocast casts it straight back for the matmul: two copies per layer, each way, for
        # nothing. peft's own switch leaves the input as it comes (a no-op for our own methods).
        self.cast_switches = input_cast_switches(model) if bf16_inputs else []
        self.compiled = compiled  # compiling.CompiledBlocks for training steps, or None

    def training_step(self, model, *args, **kwargs):
        with inputs_as_they_come(self.cast_switches), self.compiled or contextlib.nullcontext():
            return super().training_step(model, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = self._task_loss(model, inputs, return_outputs, num_items_in_batch)
        penalty = fusion_regularization(model)  # AdapterFusion's value matrices pulled toward identity
        if penalty is None:
            return result
        return (result[0] + penalty, *result[1:]) if return_outputs else result + penalty

    def _task_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.task_loss is None or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Normalized over the whole accumulated batch when the Trainer counted its tokens
        # (as transformers' own causal-LM loss is); a per-batch mean otherwise.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        loss = self.task_loss(model, inputs, num_items_in_batch)
        if num_items_in_batch is not None:
            # the count covers every process's batch and DDP averages gradients over processes:
            # scaled back, the summed gradient is the per-token mean over the global batch
            loss = loss * self.accelerator.num_processes
        return loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """The task's metrics on the validation split, logged (trackers see them) and handed to the
        callbacks (early stopping); the Trainer picks the best checkpoint by them."""
        start = time.perf_counter()
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.validate().items()}
        self.validation_seconds += time.perf_counter() - start
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # The private hooks below are the Trainer's only seams for these: it takes no sampler object
    # (only train_sampling_strategy) and saves or reloads checkpoints through the model's own
    # save_pretrained/from_pretrained, which for peftkit's own methods would write the whole base.

    def _get_train_sampler(self, train_dataset=None):
        # length buckets shuffled per epoch (batching.py), in place of transformers' mega-batches
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

    def _load_best_model(self):
        # a checkpoint holds the adapter and heads only (see _save); peft's own reload would attach
        # the adapter anew, over the fast-path changes make_trainer made
        restore_adapter_weights(self.model, Path(self.state.best_model_checkpoint))


class StopAfter(TrainerCallback):
    """Ends training after `steps` optimizer steps (train.stop_after_steps) while the learning-rate
    schedule stays planned for the whole run: Trainer's max_steps would shorten the schedule with it
    (a short sweep run at a high rate then decays in time and looks better than the whole run at it)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_begin(self, args, state, control, **kwargs):
        # peftkit's own runs are refused before the model loads (train.set_up); this catches the rest
        # (the bench's reference scripts), whose step count only their Trainer knows
        check_stop_after(self.steps, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
            # the stopped run's last step is validated and saved, as Trainer does at a whole run's last
            # step (only at max_steps): with keep: best it may be the step kept, and it is never lost
            if args.eval_strategy != "no":
                control.should_evaluate = True
            if args.save_strategy != "no":
                control.should_save = True


def stop_after(steps: int | None) -> list:
    """The callbacks that apply train.stop_after_steps to a Trainer: none when it is null."""
    return [StopAfter(steps)] if steps else []


def check_stop_after(stop_after: int | None, steps: int) -> None:
    if (stop_after or 0) > steps:
        raise PeftkitError(f"train.stop_after_steps {stop_after} is longer than the run ({steps} optimizer "
                           f"steps); set it to at most {steps}, or to null to train the whole run")


class RankAllocation(TrainerCallback):
    """AdaLoRA's rank budget: peft's update_and_allocate after every optimizer step. It scores each
    rank by its weights' gradients, so it runs in on_optimizer_step, the one callback the Trainer
    calls after optimizer.step() and before zero_grad() (on_step_end would find the gradients gone)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # the step being taken, counted from 1: the last one is total_step, where peft fixes the final ranks
        model.base_model.update_and_allocate(state.global_step + 1)
