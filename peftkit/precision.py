"""What a run computes in: fp32, or bf16 where the hardware computes bf16 natively.

    precision = resolve_precision("auto")     # "bf16" on a bf16 GPU or a CPU with AVX512-BF16 / AMX
    store_frozen_in_bf16(model, precision)    # the frozen base in bf16, once
    with compute(precision): model(**batch)   # bf16 autocast; adapters and heads keep fp32 weights
    with inputs_as_they_come(input_cast_switches(model)): ...   # peft's layers skip their input cast

bf16 is mixed precision as transformers' `Trainer(bf16=True)` does it: autocast runs the
matmuls in bf16 and keeps fp32 master weights for what trains. Under autocast alone
every frozen fp32 weight is cast to bf16 again at each forward and the copies are kept
for backward; peftkit stores the frozen base in bf16 once, as peft users do when they
load a base with dtype=torch.bfloat16, which also halves its memory.

On the project's 2-core AMD EPYC (Zen 5, AVX512-BF16) a bf16 matmul runs about 4x as fast
as fp32 (benchmarks/results/cpu-kernels-cpu.md).
"""
import contextlib
import functools
from pathlib import Path

import torch

from .errors import PeftkitError

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that compute bf16 dot products natively


def check_precision(requested: str) -> None:
    if requested not in PRECISIONS:
        raise PeftkitError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")


def resolve_precision(requested: str) -> str:
    """"fp32" or "bf16" for this machine; `auto` takes bf16 only where it is native (fast)."""
    check_precision(requested)
    if requested == "auto":
        return "bf16" if native_bf16() else "fp32"
    return requested


def native_bf16() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(cpu_bf16_flags())


@functools.cache  # the CPU does not change under a running process; read /proc/cpuinfo once
def cpu_bf16_flags() -> list[str]:
    """The bf16 instructions this CPU lists (Linux /proc/cpuinfo); empty elsewhere."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return []
    flags = next((line.split(":", 1)[1].split() for line in info.read_text().splitlines()
                  if line.startswith("flags")), [])
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def describe(precision: str, quantize: str | None = None, attention: str = "sdpa") -> str:
    """One line for the run summary: what was chosen and why."""
    if precision == "fp32":
        return "fp32" + ("" if native_bf16() else " (no native bf16 on this machine)")
    where = "GPU" if torch.cuda.is_available() else "CPU: " + ", ".join(cpu_bf16_flags() or ["no native bf16, emulated"])
    base = f"{quantize} layers computing in bf16" if quantize else "frozen base stored in bf16"
    return f"bf16 autocast, {base}, {attention} attention ({where})"


def compute(precision: str, model=None):
    """The autocast context a forward (training or evaluation) runs in. Given the model, peft's LoRA
    layers also leave their bf16 input as it comes: they would cast it to the fp32 adapter weights,
    and autocast straight back for the matmul (the same values, a fifth of an evaluation's time)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16))
    if model is not None:
        stack.enter_context(inputs_as_they_come(input_cast_switches(model)))
    return stack


def input_cast_switches(model) -> list:
    """The peft layers of `model` that cast their input to their adapter weights' dtype and have
    peft's switch to not do so (LoRA's, LoHa's, OFT's ...; IA3's and VeRA's have none in peft 0.21).
    Found once by a trainer, not at every step: the model's modules do not change while it trains."""
    return [m for m in model.modules() if isinstance(vars(m).get("cast_input_dtype_enabled"), bool)]


@contextlib.contextmanager
def inputs_as_they_come(layers: list):
    """peft's disable_input_dtype_casting over `layers` (input_cast_switches). Written here because
    peft's helper reads the switch on every peft layer, and IA3's has none: it raised an
    AttributeError, so an IA3 run could not train in bf16. Layers without the switch cast as before."""
    before = [m.cast_input_dtype_enabled for m in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.cast_input_dtype_enabled = value


def store_frozen_in_bf16(model, precision: str) -> int:
    """Store the frozen base's fp32 tensors in bf16 (what a peft user does by loading the base with
    dtype=torch.bfloat16); returns how many changed. Trainable tensors (adapters, heads) keep fp32
    master weights. A 4/8-bit base is left as peft's k-bit preparation set it (norms in fp32)."""
    from .anatomy import is_quantized  # anatomy imports peft: not needed to check a recipe

    if precision != "bf16" or is_quantized(model):
        return 0
    changed = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)
            changed += 1
    return changed

