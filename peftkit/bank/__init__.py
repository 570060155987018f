"""AdapterBank: one base model in memory, many adapters, picked per call or per batch row.

    bank = AdapterBank("smollm2-135m")                   # or a loaded model (with tokenizer=...)
    bank.load("headlines", "runs/headlines-lora")         # lora, houlsby, pfeiffer, parallel, compacter, prefix
    bank.generate(prompts, adapter="headlines")           # None = the base model alone
    bank.generate(prompts, adapter=["headlines", "sentiment", None])    # one adapter per row
    bank.classify(texts, adapter="topic")                 # encoder banks; bank.answer(questions, contexts, ...)
    bank.unload("sentiment"); bank.adapters()

How every row of one forward pass gets its own adapter:
* LoRA: the bank reads peft's LoRA folders itself and adds B(A x) through a forward hook on each
  target layer (lora.py).
* Houlsby, Pfeiffer, parallel and prefix: peftkit's own tuners, which take one adapter per row.
* Task heads (classifier, score, qa_outputs) differ per adapter: each row goes through its own
  (heads.py).
A call sets the selection, runs, and clears it, so nothing carries over from one call to the next
(rows.py). Base weights are loaded once and never copied; an adapter costs the tensors of its own file.

The parts, each one class mixed into AdapterBank or a helper it holds:
    base.py       Holder: the base, tokenizer, task, fingerprint, lock; load, unload, adapters
    lora.py       LoraHooks: peft LoRA files read and checked, per-row deltas through forward hooks
    heads.py      HeadSwitch: one task head per adapter, per row
    rows.py       RowSelection: one adapter per row for one call; forward, generate_ids
    generate.py   Generation: generate, chat, complete, decode (chunked prefill, turns between steps)
    frontends.py  Frontends: classify, answer, predict
"""
from .base import Entry, Holder, adapter_task, task_of_class
from .frontends import Frontends
from .generate import Generation
from .heads import HeadSwitch
from .lora import LoraHooks, lora_delta
from .rows import RowSelection

__all__ = ["AdapterBank", "Entry", "HeadSwitch", "LoraHooks", "adapter_task", "lora_delta", "task_of_class"]


class AdapterBank(Holder, RowSelection, Generation, Frontends):
    """One base model and many adapters: AdapterBank(model_or_name, task=None, quantize=None,
    tokenizer=None, batch_size=16), or AdapterBank.from_adapters(name, {adapter: folder})."""
