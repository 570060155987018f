"""train.compile: the model's transformer blocks run through torch.compile in training steps.

    on, why = resolve_compile(recipe.train.compile, model, task="causal-lm", precision="bf16", steps=50)
    blocks = CompiledBlocks(model)
    with blocks:                       # training steps only; evaluation and generation stay eager
        loss = ...; loss.backward()

Each block (transformers' GradientCheckpointingLayer: a decoder or encoder layer) is compiled on
its own, the way PyTorch's regional compilation does it: every layer runs the same code, so one
compilation serves all of them and the warm-up is a block's, not the whole model's. Inductor fuses
the elementwise work around the matmuls (RMSNorm's fp32 round trip, rotary, the SiLU gate,
softmax, the adapters' casts), which eager runs as separate passes over memory.

Evaluation and generation keep the eager forward: they run in inference mode with a KV cache,
which would cost compilations of their own for a few batches.

Measured on the 2-core Xeon with AMX (benchmarks/results/xeon-amx/compile/): the headline recipe's
bf16 LoRA step ran 1.10x faster compiled, in 0.86x the memory (1.21x before peftkit's plain attention
took part of what inductor fuses), after a warm-up of ~45 s with an empty inductor cache. MiniLM's
short classification rows (batch 32, ~48 tokens) ran slower compiled than eager in a probe. `auto`
compiles only where the measurement says it pays.
"""
import torch

from .errors import PeftkitError

CHOICES = ("auto", True, False)
# auto compiles a run only when its steps repay a cold warm-up: the 50-step headline recipe trained in 122 s
# compiled against 79 s eager with an empty inductor cache, and a steady step saves ~0.15 s (1.52 against
# 1.38 s; benchmarks/results/xeon-amx/compile/), so ~50 s of warm-up is repaid after ~350 steps
PAYS_AFTER_STEPS = 350
AUTO_METHODS = ("lora",)  # the methods the measurement covers


def check_compile(requested) -> None:
    if requested not in CHOICES:
        raise PeftkitError(f"train.compile must be auto, true or false, got {requested!r}")


def resolve_compile(requested, model, task: str, method: str, precision: str, steps: int) -> tuple[bool, str]:
    """Whether training steps run compiled blocks, and why, for the run summary. `true` on a model
    that cannot be compiled is an error; `auto` says why it left compilation off."""
    check_compile(requested)
    refusal = _cannot_compile(model)
    if requested is True:
        if refusal:
            raise PeftkitError(f"train.compile true: {refusal}; set train.compile to auto or false")
        return True, "compiled blocks (train.compile true)"
    if requested is False:
        return False, "eager (train.compile false)"
    why_not = refusal or _not_measured_to_pay(task, method, precision, steps)
    if why_not:
        return False, f"eager ({why_not})"
    return True, f"compiled blocks ({steps} steps repay the warm-up)"


def _cannot_compile(model) -> str:
    from .anatomy import is_quantized  # anatomy imports peft

    if is_quantized(model):
        return "a 4/8-bit base runs bitsandbytes kernels that torch.compile does not trace"
    if getattr(model, "is_gradient_checkpointing", False):
        return "gradient checkpointing re-runs each block in backward, outside the compiled graph"
    if not blocks_of(model):
        return "the model has no transformers layer blocks to compile"
    return ""


def _not_measured_to_pay(task: str, method: str, precision: str, steps: int) -> str:
    if torch.cuda.is_available():
        return "auto compiles on the CPU only, where it was measured"
    if task != "causal-lm" or method not in AUTO_METHODS or precision != "bf16":
        return "auto compiles bf16 LoRA on causal LMs only, where it was measured to pay"
    if steps < PAYS_AFTER_STEPS:
        return f"{steps} steps do not repay the ~50 s warm-up; auto compiles runs of {PAYS_AFTER_STEPS}+"
    return ""


def blocks_of(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class CompiledBlocks:
    """While entered, each block's forward is its compiled version (made once, on first entry). The
    swap is an instance attribute over the class's forward, so module names, state dicts and hooks
    are untouched, and leaving restores the eager forward."""

    def __init__(self, model):
        self.blocks = blocks_of(model)
        self.compiled = None

    def __enter__(self):
        if self.compiled is None:
            share_libstdcxx()
            # dynamic: length-grouped batches come in many lengths; one graph serves them all
            self.compiled = [torch.compile(block.forward, dynamic=True) for block in self.blocks]
        for block, forward in zip(self.blocks, self.compiled):
            block.forward = forward
        return self

    def __exit__(self, *exc):
        for block in self.blocks:
            del block.forward
        return False


def share_libstdcxx() -> None:
    """Make the C++ runtime's symbols visible to the kernels inductor builds. Its CPU kernels are
    linked without libstdc++ and load only into a process that already shares its symbols; a
    kernel taken from inductor's on-disk cache by a fresh process failed to load here ("undefined
    symbol ...basic_ostringstream...") until libstdc++ was loaded with RTLD_GLOBAL."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("stdc++")
    if name:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
