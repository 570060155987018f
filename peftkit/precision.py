"""What a run computes in: fp32, or bf16 where the hardware computes bf16 natively.

    precision = resolve_precision("auto")     # "bf16" on a bf16 GPU or a CPU with AVX512-BF16 / AMX
    store_frozen_in_bf16(model, precision)    # the frozen base in bf16, once
    with compute(precision): model(**batch)   # bf16 autocast; adapters and heads keep fp32 weights

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
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import PeftkitError

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that compute bf16 dot products natively
SHORT_SEQUENCE = 128  # up to this many tokens, bf16 attention on a CPU runs faster on the math path


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


def describe(precision: str, quantize: str | None = None, max_length: int = 0) -> str:
    """One line for the run summary: what was chosen and why."""
    if precision == "fp32":
        return "fp32" + ("" if native_bf16() else " (no native bf16 on this machine)")
    where = "GPU" if torch.cuda.is_available() else "CPU: " + ", ".join(cpu_bf16_flags() or ["no native bf16, emulated"])
    base = f"{quantize} layers computing in bf16" if quantize else "frozen base stored in bf16"
    attention = f", math-path attention (<= {SHORT_SEQUENCE} tokens)" if math_attention(precision, max_length) else ""
    return f"bf16 autocast, {base}{attention} ({where})"


def compute(precision: str):
    """The autocast context a forward (training or evaluation) runs in."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)


def store_frozen_in_bf16(model, precision: str) -> int:
    """Store the frozen base's fp32 tensors in bf16 (what a peft user does by loading the base with
    dtype=torch.bfloat16); returns how many changed. Trainable tensors (adapters, heads) keep fp32
    master weights. A 4/8-bit base is left as peft's k-bit preparation set it (norms in fp32)."""
    from .attach import is_quantized  # attach imports peft: not needed to check a recipe

    if precision != "bf16" or is_quantized(model):
        return 0
    changed = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)
            changed += 1
    return changed


def attention_kernels(precision: str, max_length: int):
    """The attention kernels training runs with: PyTorch's choice, except on a CPU in bf16 with
    sequences of at most SHORT_SEQUENCE tokens, where the math path runs.

    On the project's 2-core CPU, forward and backward in bf16 took the fused kernel 4x the
    math path's time at 48 tokens, three quarters of it at 192, and under half at 384
    (benchmarks/results/cpu-kernels-cpu.md). PyTorch picks the fused kernel whenever there
    is no attention dropout, so short bf16 sequences need the choice made for them.
    """
    return sdpa_kernel([SDPBackend.MATH]) if math_attention(precision, max_length) else contextlib.nullcontext()


def math_attention(precision: str, max_length: int) -> bool:
    return precision == "bf16" and not torch.cuda.is_available() and max_length <= SHORT_SEQUENCE
