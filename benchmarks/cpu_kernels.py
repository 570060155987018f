"""The CPU kernel timings behind peftkit's fast-path choices, on this machine.

    python benchmarks/cpu_kernels.py        # writes benchmarks/results/cpu-kernels-cpu.{md,json}

* matmul peak: a 2048x2048 matmul in fp32 and bf16 (what `auto` precision weighs);
* attention: PyTorch's fused (flash) kernel, its math path, and plain matmuls as transformers'
  "eager" attention computes them, forward and backward, at the recipes' shapes in fp32 and
  bf16 (where plain matmuls win sets peftkit.attention.SMALL_ATTENTION);
* SmolLM2's attention at the headline recipe's batch (9 query heads sharing 3 key/value heads, 8 x 192
  tokens, bf16): transformers' eager attention as Llama computes it against peftkit's PlainAttention,
  forward + backward and forward alone (what evaluation and generation run);
* dropout: PyTorch's CPU dropout against peftkit's FastDropout on one hidden-state
  tensor of the sentiment recipe (32 x 48 x 384), forward and backward;
* linear layers at the headline recipe's shapes: each of SmolLM2-135M's projections on one
  batch (8 x 192 tokens) in bf16, forward and the input-gradient backward (what a frozen layer
  under LoRA computes), against the 2048x2048 peak. Their FLOP-weighted rate over the bf16 peak
  is the headline recipe's MFU were a step to spend its time in these matmuls alone.
Each figure is the best of several timed repetitions.
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftkit.bench.machine import machine_info, peak_matmul_flops  # noqa: E402
from peftkit.dropout import FastDropout  # noqa: E402
from peftkit.attention import SMALL_ATTENTION, PlainAttention  # noqa: E402
from peftkit.bench.script_results import script_command, write_result  # noqa: E402

# (tokens, batch, heads, head size): MiniLM's reviews (48 typical, 64 max), topic ledes and 192-token
# rows, its QA windows; SmolLM2's headline rows
ATTENTION = [(48, 32, 12, 32), (128, 32, 12, 32), (192, 32, 12, 32), (384, 16, 12, 32), (192, 8, 9, 64)]
# SmolLM2-135M's projections (in, out, per layer), from its config: hidden 576, 9 query and 3 key/value
# heads of 64, MLP 1536; 30 layers. Rows: the headline recipe's batch of 8 x 192 tokens.
HEADLINE_ROWS = 8 * 192
HEADLINE_LINEARS = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
                    "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}


def best_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def attention_ms(tokens, batch, heads, size, dtype, backend) -> float:
    """`backend` is an SDPA backend, or None for plain matmuls."""
    q, k, v = (torch.randn(batch, heads, tokens, size, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.zeros(batch, 1, tokens, tokens, dtype=dtype)  # a padding mask, as the models pass one

    def step():
        if backend is None:
            scores = torch.matmul(q, k.transpose(2, 3)) * size ** -0.5 + mask
            torch.matmul(torch.softmax(scores, dim=-1), v).sum().backward()
            return
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    return best_ms(step)


def llama_attention_ms(implementation: str, backward: bool) -> dict:
    """SmolLM2-135M's attention on one headline batch: eager (transformers' Llama code) or peftkit's."""
    from transformers.models.llama.modeling_llama import eager_attention_forward
    batch, heads, groups, tokens, size = 8, 9, 3, 192, 64
    # q, k and v as the projections leave them: (batch, tokens, heads, size) memory seen as (batch, heads, ...)
    q = torch.randn(batch, tokens, heads, size, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(backward)
    k, v = (torch.randn(batch, tokens, groups, size, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(backward)
            for _ in range(2))
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    mask = torch.zeros(batch, 1, tokens, tokens, dtype=torch.bfloat16).masked_fill(~causal, -3e38)
    module = torch.nn.Module()
    module.num_key_value_groups = heads // groups

    def run():
        if implementation == "eager":
            out = eager_attention_forward(module, q, k, v, mask, size ** -0.5)[0]
        else:
            out = PlainAttention.apply(q, k, v, mask, size ** -0.5)
        if backward:
            out.sum().backward()
    with torch.set_grad_enabled(backward):
        return best_ms(run)


def dropout_ms(layer, dtype) -> float:
    x = torch.randn(32, 48, 384, dtype=dtype, requires_grad=True)
    return best_ms(lambda: layer(x).float().sum().backward(), repeats=15)


def linear_gflops(rows: int, n_in: int, n_out: int) -> float:
    """bf16 forward (x W^T) and input-gradient backward (g W) of a frozen linear layer: GFLOP/s."""
    x = torch.randn(rows, n_in, dtype=torch.bfloat16)
    w = torch.randn(n_out, n_in, dtype=torch.bfloat16)
    g = torch.randn(rows, n_out, dtype=torch.bfloat16)

    def step():
        for _ in range(8):
            x @ w.T
            g @ w
    return 8 * 2 * 2 * rows * n_in * n_out / (best_ms(step) / 1e3) / 1e9


def main(argv=None) -> int:
    out_dir = Path(_arguments(argv).out)
    results = {"command": script_command("cpu_kernels.py", argv),
               "machine": machine_info("cpu"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "matmul_gflops": {}, "attention_ms": [], "llama_attention_ms": {}, "dropout_ms": {},
               "headline_linears": {}}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        results["matmul_gflops"][name] = round(peak_matmul_flops("cpu", dtype) / 1e9, 1)
    for tokens, batch, heads, size in ATTENTION:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            results["attention_ms"].append({
                "tokens": tokens, "batch": batch, "heads": heads, "head_size": size, "dtype": name,
                "flash": round(attention_ms(tokens, batch, heads, size, dtype, SDPBackend.FLASH_ATTENTION), 2),
                "math": round(attention_ms(tokens, batch, heads, size, dtype, SDPBackend.MATH), 2),
                "plain": round(attention_ms(tokens, batch, heads, size, dtype, None), 2)})
    for implementation in ("eager", "peftkit"):
        results["llama_attention_ms"][implementation] = {
            "forward_backward": round(llama_attention_ms(implementation, backward=True), 2),
            "forward": round(llama_attention_ms(implementation, backward=False), 2)}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        results["dropout_ms"][name] = {"torch": round(dropout_ms(torch.nn.Dropout(0.1).train(), dtype), 2),
                                       "peftkit": round(dropout_ms(FastDropout(0.1).train(), dtype), 2)}
    for name, (n_in, n_out) in HEADLINE_LINEARS.items():
        results["headline_linears"][name] = round(linear_gflops(HEADLINE_ROWS, n_in, n_out), 1)
    results["headline_ceiling"] = round(linear_ceiling(results) / results["matmul_gflops"]["bf16"], 3)
    write_result(out_dir, "cpu-kernels-cpu", results, markdown(results))
    return 0


def linear_ceiling(r: dict) -> float:
    """The FLOP-weighted GFLOP/s of the headline model's projections: their FLOPs over their summed time."""
    flops = {name: n_in * n_out for name, (n_in, n_out) in HEADLINE_LINEARS.items()}
    seconds = sum(f / r["headline_linears"][name] for name, f in flops.items())
    return sum(flops.values()) / seconds


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# CPU kernels behind the fast path", "",
             f"Machine: **{m['machine']}**, torch {m['torch']}, {m['threads']} threads; {r['date']}.", "",
             f"Regenerate: `{r['command']}` (best of several repetitions each).", "",
             f"Matmul 2048x2048: fp32 **{r['matmul_gflops']['fp32']} GFLOP/s**, "
             f"bf16 **{r['matmul_gflops']['bf16']} GFLOP/s**.", "",
             "Attention forward + backward (ms): PyTorch's fused kernel, its math path, and plain matmuls "
             "(transformers' eager attention). peftkit runs plain matmuls in bf16 on a CPU up to "
             f"{SMALL_ATTENTION / 2**20:.0f}M scores (batch x heads x tokens^2), the fused kernel above.", "",
             "| tokens | batch x heads x head size | scores | dtype | fused | math | plain |",
             "| ---: | --- | ---: | --- | ---: | ---: | ---: |"]
    for a in r["attention_ms"]:
        scores = a["batch"] * a["heads"] * a["tokens"] ** 2
        lines.append(f"| {a['tokens']} | {a['batch']} x {a['heads']} x {a['head_size']} | {scores / 2**20:.1f}M | "
                     f"{a['dtype']} | {a['flash']} | {a['math']} | {a['plain']} |")
    if r.get("llama_attention_ms"):  # files written before this section have none
        lines += ["", "SmolLM2-135M's attention on a headline batch (8 x 192 tokens, 9 query heads sharing 3 "
                      "key/value heads of 64, causal mask, bf16), ms. peftkit runs its own plain attention "
                      "(`peftkit/attention.py`) where transformers would run eager:", "",
                  "| attention | forward + backward | forward |", "| --- | ---: | ---: |"]
        for name, a in r["llama_attention_ms"].items():
            label = "transformers' eager (Llama)" if name == "eager" else "peftkit PlainAttention"
            lines.append(f"| {label} | {a['forward_backward']} | {a['forward']} |")
    lines += ["", "Dropout p=0.1 on 32 x 48 x 384, forward + backward (ms):", "",
              "| dtype | torch.nn.Dropout | peftkit FastDropout |", "| --- | ---: | ---: |"]
    for name, d in r["dropout_ms"].items():
        lines.append(f"| {name} | {d['torch']} | {d['peftkit']} |")
    if r.get("headline_linears"):  # files written before this section have none
        lines += ["", f"SmolLM2-135M's projections on the headline recipe's batch ({HEADLINE_ROWS} rows), bf16, "
                      "forward + input-gradient backward (GFLOP/s):", "",
                  "| layer | in x out | GFLOP/s | of the bf16 peak |", "| --- | --- | ---: | ---: |"]
        for name, (n_in, n_out) in HEADLINE_LINEARS.items():
            rate = r["headline_linears"][name]
            lines.append(f"| {name} | {n_in} x {n_out} | {rate} | {rate / r['matmul_gflops']['bf16']:.2f} |")
        lines += ["", f"FLOP-weighted: **{linear_ceiling(r):.0f} GFLOP/s, {r['headline_ceiling']:.2f} of the bf16 "
                      "peak.** Nearly all of a headline step's model FLOPs are in these layers (the LM head's rows "
                      "are the answer tokens only), so a step that spent its time in them alone would reach this "
                      "MFU; what a step measures below it is time spent outside these matmuls (attention, "
                      "elementwise work and casts, the optimizer, Python)."]
    return "\n".join(lines) + "\n"


def _arguments(argv):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for cpu-kernels-cpu.md and .json (default benchmarks/results)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
