"""AdapterBank vs peft on one model, side by side in one process.

    .venv/bin/python benchmarks/bench_bank.py [--model smollm2-135m] [--adapters 8] [--repeats 7]
                                              [--out benchmarks/results/bank-cpu.md]

Eight LoRA adapters (r=8 on q_proj/v_proj, random weights: init_lora_weights=False; about 1.8 MB
each on SmolLM2-135M) are saved once, then loaded both into an AdapterBank and into one peft
PeftModel (each on its own copy of the base). Measured, as medians over interleaved repeats:

* switch: the bank's per-call selection of one resident adapter (set + clear, what a call pays
  to change adapter) vs peft's `set_adapter`;
* load: a folder from disk (page cache warm) into a warm bank vs peft's `load_adapter`;
* throughput of one batch of 8 rows, forward (8 x 64 prompt tokens) and greedy generation (8 x 16
  prompt tokens, 32 new tokens each, so decoding dominates): all rows on one adapter vs 8 different
  adapters, the bank vs peft (`set_adapter` / `adapter_names=`);
* memory: tensor bytes the bank holds per adapter and resident-memory growth vs file size.
"""
import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

import peftkit
from peftkit.bank import AdapterBank

PROMPT_TOKENS, GEN_PROMPT_TOKENS, NEW_TOKENS, ROWS = 64, 16, 32, 8


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared 2-core machine a second OpenMP thread "
                             "that gets descheduled stalls every op, and timings swing 10-100x")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bank-cpu.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tokenizer = peftkit.load_tokenizer(args.model)
    names = [f"a{i}" for i in range(args.adapters)]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(args.model, names, Path(tmp))
        probe = subprocess.run([sys.executable, __file__, "--probe", args.model, *map(str, dirs.values())],
                               capture_output=True, text=True, check=True)
        rows = json.loads(probe.stdout.strip().splitlines()[-1])
        bank = AdapterBank(peftkit.load_model(args.model, pad_token_id=tokenizer.pad_token_id), tokenizer=tokenizer)
        for name in names:
            bank.load(name, dirs[name])
        peft = PeftModel.from_pretrained(peftkit.load_model(args.model, pad_token_id=tokenizer.pad_token_id),
                                         str(dirs[names[0]]), adapter_name=names[0]).eval()
        for name in names[1:]:
            peft.load_adapter(str(dirs[name]), adapter_name=name)
        rows.update(file=sum(bank.describe(n)["file_bytes"] for n in names) / len(names),
                    held=sum(bank.describe(n)["memory_bytes"] for n in names) / len(names))
        results = {**measure_switch(bank, peft, names, args.repeats * 30),
                   **measure_load(bank, peft, dirs[names[-1]], args.repeats),
                   **measure_throughput(bank, peft, names, tokenizer, args.repeats)}
    write_report(args, results, rows)


@torch.inference_mode()
def memory_probe(model_name: str, folders: list[str]) -> None:
    """In a fresh process (no memory freed earlier for the allocator to hand out again): resident
    memory of the base after a forward has touched all its pages, then the growth per adapter."""
    torch.set_num_threads(1)
    start = rss()
    bank = AdapterBank(model_name)
    ids = torch.randint(100, 20000, (1, 8))
    bank.forward(None, input_ids=ids)
    base = rss()
    for i, folder in enumerate(folders):
        bank.load(f"a{i}", folder)
    bank.forward([f"a{i % len(folders)}" for i in range(len(folders))], input_ids=ids.repeat(len(folders), 1))
    print(json.dumps({"rss_base": base - start, "rss": (rss() - base) / len(folders)}))


def make_adapters(model_name, names, tmp: Path) -> dict:
    model = peftkit.load_model(model_name)
    for name in names:
        model = peftkit.attach(model, {"method": "lora", "r": 8, "lora_alpha": 16, "init_lora_weights": False},
                               name=name)
    return {name: peftkit.save_adapter(model, tmp / name, name=name) for name in names}


def measure_switch(bank, peft, names, n) -> dict:
    bank_t, peft_t = [], []
    for i in range(n):
        name = names[i % len(names)]
        start = time.perf_counter()
        with bank._use([name] * ROWS):  # what every call does: select, (run), clear
            pass
        bank_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        peft.set_adapter(name)
        peft_t.append(time.perf_counter() - start)
    mixed = []
    for i in range(n // 4):
        start = time.perf_counter()
        with bank._use([names[(i + j) % len(names)] for j in range(ROWS)]):
            pass
        mixed.append(time.perf_counter() - start)
    return {"switch_bank": med(bank_t), "switch_peft": med(peft_t), "select_mixed_bank": med(mixed)}


def measure_load(bank, peft, folder, repeats) -> dict:
    bank_t, peft_t = [], []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        bank.load("extra", folder)
        bank_t.append(time.perf_counter() - start)
        bank.unload("extra")
        start = time.perf_counter()
        peft.load_adapter(str(folder), adapter_name="extra")
        peft_t.append(time.perf_counter() - start)
        peft.delete_adapter("extra")
    return {"load_bank": med(bank_t), "load_peft": med(peft_t)}


@torch.inference_mode()
def measure_throughput(bank, peft, names, tokenizer, repeats) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (ROWS, PROMPT_TOKENS), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    short = {k: v[:, :GEN_PROMPT_TOKENS] for k, v in batch.items()}
    one, mixed = [names[0]] * ROWS, [names[i % len(names)] for i in range(ROWS)]
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
               pad_token_id=tokenizer.pad_token_id)

    def peft_one_forward():
        peft.set_adapter(names[0])
        peft(**batch)

    def peft_one_generate():
        peft.set_adapter(names[0])
        peft.generate(**short, **gen)

    cases = {
        "fwd_base": lambda: bank.forward(None, **batch),
        "fwd_bank_one": lambda: bank.forward(one, **batch),
        "fwd_bank_mixed": lambda: bank.forward(mixed, **batch),
        "fwd_peft_one": peft_one_forward,
        "fwd_peft_mixed": lambda: peft(**batch, adapter_names=mixed),
        "gen_base": lambda: bank.generate_ids(None, **short, **gen),
        "gen_bank_one": lambda: bank.generate_ids(one, **short, **gen),
        "gen_bank_mixed": lambda: bank.generate_ids(mixed, **short, **gen),
        "gen_peft_one": peft_one_generate,
        "gen_peft_mixed": lambda: peft.generate(**short, **gen, adapter_names=mixed),
    }
    times = {k: [] for k in cases}
    for k, fn in cases.items():  # warm-up
        fn()
    for _ in range(repeats):  # interleaved, so load from other processes hits every case alike
        for k, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    out = {}
    for k, ts in times.items():  # tokens per second (forward: prompt tokens; generate: new tokens)
        tokens = ROWS * (PROMPT_TOKENS if k.startswith("fwd") else NEW_TOKENS)
        out[k] = tokens / min(ts)  # best of the repeats: other jobs only ever slow a run down
        out[k + "_median"] = tokens / med(ts)
        out[k + "_spread"] = (max(ts) - min(ts)) / med(ts)
    return out


def write_report(args, r, mem):
    ms = lambda s: f"{s * 1e3:.3f} ms"  # noqa: E731
    tps = lambda k: f"{r[k]:.0f} tok/s"  # noqa: E731
    mixed_ok = {k: yes(r[f"{k}_bank_mixed"] >= 0.8 * r[f"{k}_bank_one"] and r[f"{k}_bank_mixed"] > r[f"{k}_peft_mixed"])
                for k in ("fwd", "gen")}
    load_ok = yes(r["load_bank"] < 0.05 and r["load_bank"] < r["load_peft"])
    lines = [
        "# AdapterBank benchmark (CPU)",
        "",
        f"Machine: 2-core CPU container, shared with other jobs, so timings are noisy: every case runs "
        f"interleaved with the others; times are medians, throughputs the best of the repeats (other jobs only "
        f"slow a run down; medians are given below). {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), Python {platform.python_version()}, {args.repeats} repeats.",
        f"Model: {args.model} fp32. {args.adapters} LoRA adapters, r=8 on q_proj/v_proj (random weights), "
        f"{mem['file'] / 1e6:.2f} MB each on disk. Forward: {ROWS} rows x {PROMPT_TOKENS} tokens (tok/s = prompt "
        f"tokens); generate: {ROWS} rows x {GEN_PROMPT_TOKENS} prompt tokens, {NEW_TOKENS} new tokens each, greedy "
        f"(tok/s = new tokens). Largest (max-min)/median spread of a throughput case: "
        f"{max(v for k, v in r.items() if k.endswith('_spread')):.0%}. "
        f"Command: `.venv/bin/python benchmarks/bench_bank.py`.",
        "",
        "| measurement | AdapterBank | peft | target | met |",
        "| --- | --- | --- | --- | --- |",
        f"| switch between resident adapters | {ms(r['switch_bank'])} | {ms(r['switch_peft'])} (`set_adapter`) "
        f"| < 1 ms | {yes(r['switch_bank'] < 1e-3)} |",
        f"| select 8 different adapters for one batch | {ms(r['select_mixed_bank'])} | (per call, in forward) "
        "| - | - |",
        f"| load ~{mem['file'] / 1e6:.1f} MB LoRA into a warm bank | {ms(r['load_bank'])} | {ms(r['load_peft'])} "
        f"(`load_adapter`) | < 50 ms and faster than peft | {load_ok} |",
        f"| forward, 8 rows, base alone | {tps('fwd_base')} | | | |",
        f"| forward, 8 rows, one adapter | {tps('fwd_bank_one')} | {tps('fwd_peft_one')} | | |",
        f"| forward, 8 rows, 8 adapters | {tps('fwd_bank_mixed')} | {tps('fwd_peft_mixed')} (`adapter_names`) "
        f"| >= 0.8x one adapter, ahead of peft | {mixed_ok['fwd']} |",
        f"| forward mixed / one adapter | {r['fwd_bank_mixed'] / r['fwd_bank_one']:.2f}x | "
        f"{r['fwd_peft_mixed'] / r['fwd_peft_one']:.2f}x | >= 0.8x | |",
        f"| generate, 8 rows, base alone | {tps('gen_base')} | | | |",
        f"| generate, 8 rows, one adapter | {tps('gen_bank_one')} | {tps('gen_peft_one')} | | |",
        f"| generate, 8 rows, 8 adapters | {tps('gen_bank_mixed')} | {tps('gen_peft_mixed')} (`adapter_names`) "
        f"| >= 0.8x one adapter, ahead of peft | {mixed_ok['gen']} |",
        f"| generate mixed / one adapter | {r['gen_bank_mixed'] / r['gen_bank_one']:.2f}x | "
        f"{r['gen_peft_mixed'] / r['gen_peft_one']:.2f}x | >= 0.8x | |",
        f"| memory per adapter: tensors held / file size | {mem['held'] / 1e6:.2f} MB / {mem['file'] / 1e6:.2f} MB "
        f"({mem['held'] / mem['file']:.2f}x) | | about its file size | {yes(mem['held'] <= 1.1 * mem['file'])} |",
        f"| memory per adapter: resident-set growth (fresh process) | {mem['rss'] / 1e6:.2f} MB | | | |",
        "",
        f"In that fresh process the base model took {mem['rss_base'] / 1e6:.0f} MB of resident memory, once; "
        f"loading all {args.adapters} adapters and running a mixed batch added "
        f"{mem['rss'] * args.adapters / 1e6:.1f} MB.",
        "",
        "Throughput medians instead of best runs (tok/s): " + ", ".join(
            f"{k} {r[k + '_median']:.0f}" for k in ("fwd_bank_one", "fwd_bank_mixed", "fwd_peft_one", "fwd_peft_mixed",
                                                    "gen_bank_one", "gen_bank_mixed", "gen_peft_one", "gen_peft_mixed"))
        + f"; mixed/one by medians: forward {r['fwd_bank_mixed_median'] / r['fwd_bank_one_median']:.2f}x (bank), "
        f"{r['fwd_peft_mixed_median'] / r['fwd_peft_one_median']:.2f}x (peft); generate "
        f"{r['gen_bank_mixed_median'] / r['gen_bank_one_median']:.2f}x (bank), "
        f"{r['gen_peft_mixed_median'] / r['gen_peft_one_median']:.2f}x (peft).",
        "",
        "A forward pass over 8 x 64 tokens is dominated by the base model: there, mixed vs one adapter and bank "
        "vs peft differ by less than the noise. The difference shows in decoding, where the per-step cost of the "
        "LoRA layers counts (peft's `adapter_names` loops over the adapters in every layer at every step).",
        "",
        "What is measured:",
        "* *switch*: the bank keeps no active adapter between calls; every call selects its rows' adapters and",
        "  clears them afterwards. The figure is that select + clear for one resident adapter (all rows), cycling",
        "  through the 8. For peft it is `set_adapter(name)`, cycling likewise.",
        "* *select 8 different adapters*: the per-call cost of a mixed batch: each row's LoRA A and B are stacked",
        "  once per call for every target layer (60 here); decoding steps then reuse them.",
        "* *load*: `bank.load(name, folder)` (read safetensors, check the fingerprint, transpose and scale A/B,",
        "  register hooks) vs peft's `load_adapter` (builds LoRA modules, initializes, then loads), each followed",
        "  by an unload that is not timed.",
        "* *throughput*: one call of the whole batch; peft's one-adapter case includes its `set_adapter`.",
        "* *memory*: the bank's `memory_bytes` (the tensors it keeps per adapter) vs the safetensors file; and,",
        "  in a fresh process, resident-set growth from loading all adapters and running one mixed batch (which",
        "  includes the per-call stacks and activations), divided by the number of adapters.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def med(xs):
    return statistics.median(xs)


def rss() -> int:
    gc.collect()
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        memory_probe(sys.argv[2], sys.argv[3:])
    else:
        main()
