"""Meter: what a training run costs, measured from inside transformers' Trainer.

    meter = Meter()
    trainer = Trainer(..., callbacks=[meter])
    meter.watch(trainer.model); trainer.train(); meter.unwatch()
    meter.result()  # samples/s, tokens/s, model FLOPs/s, peak memory, loss curve

Hooks count what each training forward pass carries: samples, real (non-padding)
tokens, and model FLOPs of every linear layer a token goes through. The Trainer's
own speed metric times the whole loop including its first step and counts padding
as tokens; the benchmark needs the steady state and the useful work, so it counts
them itself.
"""
import ctypes
import gc
import resource
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

STATUS = Path("/proc/self/status")


class Meter(TrainerCallback):
    def __init__(self, warmup_steps: int = 1):
        self.warmup_steps = warmup_steps  # steps left out of speed and FLOP/s (allocator warm-up, lazy init)
        self.samples = self.tokens = self.flops = 0
        self.marks: list[tuple] = []  # (step, seconds, samples, tokens, flops) at the start and each step's end
        self.losses: list[tuple[int, float]] = []
        self.peak_mb = self.start_mb = 0.0
        self.peak_source = ""
        self._handles = []
        self._counting = False
        self._positions = self._real = 0

    # -- hooks on the model

    def watch(self, model) -> None:
        """Count every training forward of `model` (the module the Trainer calls). Linear layers inside a
        transformer block are counted by one hook on the block, from its input: every position of a block
        passes through each of its linears, and a hook on every linear would sit inside the block's
        compiled code (train.compile) and cost it its gain."""
        from .compiling import blocks_of

        self._handles.append(model.register_forward_pre_hook(self._batch_starts, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._batch_ends))
        blocks = blocks_of(model)
        nested = {id(m) for block in blocks for m in block.modules() if m is not block}
        blocks = [block for block in blocks if id(block) not in nested]  # the outermost: none counted twice
        inside = {id(m) for block in blocks for m in block.modules()}
        for block in blocks:  # a block's linears, listed once: the hook runs at every block of every step
            linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
            self._handles.append(block.register_forward_pre_hook(
                lambda block, args, kwargs, linears=linears: self._block(linears, args, kwargs), with_kwargs=True))
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and id(module) not in inside:  # bitsandbytes' 4/8-bit layers are Linear subclasses
                self._handles.append(module.register_forward_hook(self._linear))

    def unwatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _batch_starts(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        self._positions = ids.numel()
        self._real = int(mask.sum()) if mask is not None else ids.numel()
        self.samples += ids.shape[0]
        self.tokens += self._real
        self._counting = True

    def _batch_ends(self, module, args, output):
        # Gradient checkpointing re-runs layers during backward, after this: recomputation is not model FLOPs.
        self._counting = False

    def _linear(self, module, args, output):
        if self._counting:
            self._count(module, args[0].numel() // module.in_features)

    def _block(self, linears, args, kwargs):
        if not self._counting:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        rows = hidden.numel() // hidden.shape[-1]
        for linear in linears:
            self._count(linear, rows)

    def _count(self, linear, rows: int) -> None:
        if rows == self._positions:  # a layer every position goes through: padding is not useful work
            rows = self._real
        weight_trains = linear.weight.requires_grad
        # forward 2, backward to the input 2, and 2 more where the weight's own gradient is computed
        self.flops += (4 + 2 * weight_trains) * linear.in_features * linear.out_features * rows

    # -- Trainer callbacks

    def on_train_begin(self, args, state, control, **kwargs):
        self.peak_source = reset_peak_memory()
        self.start_mb = rss_mb()
        self.marks = [(0, _now(), self.samples, self.tokens, self.flops)]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((state.global_step, _now(), self.samples, self.tokens, self.flops))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))

    def on_train_end(self, args, state, control, **kwargs):
        self.peak_mb = peak_memory_mb()

    # -- the figures

    def result(self) -> dict:
        steps = len(self.marks) - 1
        if steps < 1:
            raise RuntimeError("the Meter saw no training step; pass it to the Trainer's callbacks and call watch()")
        first = self.marks[self.warmup_steps] if steps > self.warmup_steps else self.marks[0]
        last = self.marks[-1]
        seconds = last[1] - first[1]
        tail = [loss for _, loss in self.losses[-max(1, len(self.losses) // 10):]]
        return {
            "steps": steps, "timed_steps": last[0] - first[0], "seconds": seconds,
            "samples_per_s": (last[2] - first[2]) / seconds, "tokens_per_s": (last[3] - first[3]) / seconds,
            "model_flops_per_step": (last[4] - first[4]) / max(last[0] - first[0], 1),
            "model_flops_per_s": (last[4] - first[4]) / seconds,
            "peak_mb": self.peak_mb, "start_mb": self.start_mb, "peak_source": self.peak_source,
            "losses": self.losses, "final_loss": sum(tail) / len(tail) if tail else float("nan"),
        }


def _now() -> float:
    # CUDA runs ahead of Python: a step has ended when the GPU has finished it, not when it was queued
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def rss_mb() -> float:
    """This process's resident memory now."""
    return _status_mb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory() -> str:
    """Start a new peak: CUDA's allocator counter, or Linux's VmHWM (by writing 5 to clear_refs).
    Returns what the peak will measure."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return "torch.cuda.max_memory_allocated"
    gc.collect()
    _malloc_trim()  # freed heap left over from loading goes back to the system: the peak starts from live memory
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "peak RSS since training began"
    except OSError:
        return "peak RSS of the whole process"  # the reset is Linux-only


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _status_mb(key: str) -> float | None:
    if not STATUS.is_file():
        return None
    for line in STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    return None
