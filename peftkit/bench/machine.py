"""The machine a benchmark ran on, and how fast it multiplies matrices: the benchmarks' tables
open with the one, and MFU divides by the other.

    machine_info(default_device())   # {"device", "machine", "torch", "threads"}
    matmul_peaks("cpu")              # {"fp32": FLOP/s, "bf16": FLOP/s}
"""
import os
import platform
import time
from pathlib import Path


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu": where the benchmarks train."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_info(device: str) -> dict:
    """The device, its name (the GPU's, or the CPU model and core count), torch's version and threads."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor() or platform.machine()) \
            if Path("/proc/cpuinfo").is_file() else platform.machine()
        name = f"{model}, {os.cpu_count()} cores"
    return {"device": device, "machine": name, "torch": torch.__version__, "threads": torch.get_num_threads()}


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
