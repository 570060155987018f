"""AdapterBank: one base model in memory, many adapters, picked per call or per batch row.

    bank = AdapterBank("smollm2-135m")                   # or a loaded model (with tokenizer=...)
    bank.load("headlines", "runs/headlines-lora")         # lora, houlsby, pfeiffer, parallel, prefix
    bank.generate(prompts, adapter="headlines")           # None = the base model alone
    bank.generate(prompts, adapter=["headlines", "sentiment", None])    # one adapter per row
    bank.classify(texts, adapter="topic")                 # encoder banks; bank.answer(questions, contexts, ...)
    bank.unload("sentiment"); bank.adapters()

How every row of one forward pass gets its own adapter:
* LoRA: the bank reads peft's LoRA folders itself and adds B(A x) through a forward hook on each
  target layer. The model's modules stay as they are, so LoRA and the wrapping methods below can
  share one base. A batch with several LoRA adapters gathers each row's A and B once per call and
  then runs two batched matmuls per layer and step (peft's `adapter_names` loops over adapters).
* Houlsby, Pfeiffer, parallel and prefix: peftkit's own tuners, which take one adapter per row.
* Task heads (classifier, score, qa_outputs) differ per adapter: the model's head is replaced by a
  HeadSwitch holding each adapter's head; every row goes through its own (narrower heads' logits
  are padded with -inf).
A call sets the selection, runs, and clears it, so nothing carries over from one call to the next.
Base weights are loaded once and never copied; an adapter costs the tensors of its own file.
"""
import inspect
import math
import re
from contextlib import contextmanager
from functools import cached_property
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LogitsProcessorList, StoppingCriteriaList
from transformers.pytorch_utils import Conv1D

from .anatomy import base_name, task_heads
from .decoding import RowSampler, Sequence, Watch
from .errors import PeftkitError
from .fingerprint import check_same_base, fingerprint
from .loading import load_model, load_tokenizer
from .methods import method, tuner_groups
from .saving import WEIGHTS, adapter_info, inject_saved, read_adapter_config, read_weights
from .turns import Turns

TASKS = {"ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm", "ForSequenceClassification": "classification",
         "ForQuestionAnswering": "qa"}
PEFT_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification", "QUESTION_ANS": "qa"}
LORA_PREFIX = "base_model.model."  # peft's key prefix in adapter_model.safetensors
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
DEFAULTS = {"max_new_tokens": 32, "cls_max_length": 512, "qa_max_length": 384, "doc_stride": 128}
PREFILL_TOKENS = 512  # prompt tokens (rows x columns) one prefill step of decode takes at most


@dataclass
class Entry:
    """One loaded adapter."""
    name: str
    method: str
    task: str  # causal-lm | classification | qa
    path: Path
    file_bytes: int  # of adapter_model.safetensors
    memory_bytes: int  # of the tensors the bank holds for it
    labels: list[str] | None = None  # classification: label names in id order
    recipe: object = None  # the run's Recipe when the folder has recipe.yaml (prompt format, lengths)
    lora: dict = field(default_factory=dict)  # LoRA: module path -> (A^T [in, r], (B * scaling)^T [r, out])


class AdapterBank:
    def __init__(self, base, task: str | None = None, quantize: str | None = None, tokenizer=None,
                 batch_size: int = 16):
        """`base`: an embedded name, folder or hub id (loaded for `task`: causal-lm, classification, qa;
        optionally quantize="4bit"/"8bit"/"nf4"/"fp4"), or a loaded transformers model."""
        if isinstance(base, (str, Path)):
            tokenizer = tokenizer or load_tokenizer(str(base))
            base = load_model(str(base), task=task or "causal-lm", quantize=quantize,
                              pad_token_id=tokenizer.pad_token_id)
        elif task is not None or quantize is not None:
            raise PeftkitError("task= and quantize= apply when the bank loads the base by name; "
                               "a model passed in is used as it is")
        if getattr(base, "peftkit_adapters", None) or hasattr(base, "peft_config"):
            raise PeftkitError("AdapterBank needs a bare base model; this one already holds adapters")
        self.model = base.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.task = task_of_class(type(base).__name__)
        self.base_name = base_name(base)
        heads = task_heads(base)
        self.fingerprint = fingerprint(base, heads)
        self.modules = dict(base.named_modules())  # pristine names; LoRA targets are looked up here
        self.heads = {}
        for head in heads:
            self.heads[head] = HeadSwitch(base.get_submodule(head))
            setattr(base, head, self.heads[head])
        self.entries: dict[str, Entry] = {}
        self.batch_size = batch_size
        self.lock = Turns()  # one call at a time (the selection is per call); fewest turns first
        self._lora_now = None  # while a call runs: {module path: (A, B)} for the rows' LoRA adapters
        self._hooks = {}  # module path -> [hook handle, number of adapters using it]

    @classmethod
    def from_adapters(cls, base: str, adapters: dict, task: str | None = None, quantize: str | None = None,
                      **kwargs) -> "AdapterBank":
        """A bank whose base is built for the task the adapters were trained for (or `task` when there
        are none), with them loaded."""
        tasks = {name: adapter_task(Path(path)) for name, path in adapters.items()}
        if len({t for t, _ in tasks.values()} | ({task} if task and tasks else set())) > 1:
            found = ", ".join(f"{n}={t}" for n, (t, _) in tasks.items())
            raise PeftkitError(f"one bank serves one task; these adapters differ: {found}" +
                               (f" (task={task})" if task else ""))
        found, model_class = next(iter(tasks.values()), (task or "causal-lm", None))
        bank = cls(base, task=model_class or found, quantize=quantize, **kwargs)
        for name, path in adapters.items():
            bank.load(name, path)
        return bank

    # ------------------------------------------------------------------ loading

    def load(self, name: str, path) -> dict:
        """Load the adapter folder `path` as `name`. A folder made for another base or task is
        refused with an error naming both, and the bank stays as it was."""
        path = Path(path)
        with self.lock:
            self._check_new_name(name)
            config = read_adapter_config(path)
            info = adapter_info(config)
            task, model_class = adapter_task(path, config)
            if task != self.task:
                raise PeftkitError(f"adapter {name!r} ({path}) is a {task} adapter ({model_class or 'peft'}) but "
                                   f"this bank's base is a {self.task} model ({type(self.model).__name__})")
            if info.base_fingerprint:
                check_same_base(info.base_fingerprint, self.fingerprint, info.base_name, self.base_name)
            state = read_weights(path / WEIGHTS)
            heads = {k: v for k, v in state.items() if _strip(k).split(".")[0] in self.heads}
            rest = {k: v for k, v in state.items() if k not in heads}
            head_modules = {h: _head_like(switch.original, h, heads) for h, switch in self.heads.items()}
            entry = Entry(name, info.method, task, path, (path / WEIGHTS).stat().st_size,
                          sum(t.numel() * t.element_size() for t in state.values()),
                          _labels(info.task) if task == "classification" else None, _recipe(path))
            if method(info.method).peft_native:  # peft's files, applied per row by the bank's LoRA hooks
                entry.lora = self._read_lora(config, rest)  # checks everything; changes nothing
            else:
                inject_saved(self.model, name, info, rest)
                self.model.eval()
            for head, module in head_modules.items():  # nothing below can fail
                self.heads[head].heads[name] = module.to(self.model.device)
            for module_path in entry.lora:
                self._hook(module_path)
            self.entries[name] = entry
            self._select(None)  # inject turned the new adapter on; calls choose their own
            return self.describe(name)

    def unload(self, name: str) -> None:
        """Drop adapter `name`; the others stay exactly as they were."""
        with self.lock:
            entry = self._entry(name)
            if method(entry.method).peft_native:
                for module_path in entry.lora:
                    self._unhook(module_path)
            else:
                method(entry.method).tuner.remove(self.model, name)
            for switch in self.heads.values():
                del switch.heads[name]
            del self.entries[name]

    def adapters(self) -> list[dict]:
        """Name, method, task, labels, folder, file size and memory held, per loaded adapter.
        (No lock: a server can list adapters while a batch runs.)"""
        return [_describe(e) for e in list(self.entries.values())]

    def describe(self, name: str) -> dict:
        return _describe(self._entry(name))

    def __contains__(self, name) -> bool:
        return name in self.entries

    # ------------------------------------------------------------------ tensors in, tensors out

    @torch.inference_mode()
    def forward(self, adapter=None, **inputs):
        """The model's output for a tokenized batch. `adapter`: one name (or None: the base model)
        for every row, or a list with one per row."""
        with self.lock, self._use(self._rows(adapter, _batch_size(inputs))):
            return self.model(**inputs)

    @torch.inference_mode()
    def generate_ids(self, adapter=None, **inputs):
        """model.generate (greedy) with one adapter, or one per row; returns prompt + new ids."""
        with self.lock, self._use(self._rows(adapter, _batch_size(inputs))):
            return self.model.generate(**{"do_sample": False, **inputs})

    # ------------------------------------------------------------------ text in, text out

    def generate(self, prompts, adapter=None, max_new_tokens: int | None = None, template: bool = True,
                 details: bool = False) -> list:
        """Greedy answers to `prompts`. template=True puts each prompt in a chat turn after its adapter's
        instruction, as `peftkit predict` does for the adapter's run; template=False continues the raw text.
        details=True gives dicts with text, prompt/completion token counts and finish_reason."""
        self._need("causal-lm", "generate")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = self._rows(adapter, len(prompts))
        ids = [self.prompt_ids(p, n, template) for p, n in zip(prompts, rows)]
        limits = [max_new_tokens or self._setting(n, "max_new_tokens") for n in rows]
        out = [{**o, "text": o["text"].strip()} for o in self.complete(ids, rows, limits)]
        return out if details else [o["text"] for o in out]

    def chat(self, conversations, adapter=None, max_new_tokens: int | None = None, details: bool = False) -> list:
        """Greedy assistant replies; each conversation is a list of {"role", "content"} messages."""
        self._need("causal-lm", "chat")
        rows = self._rows(adapter, len(conversations))
        ids = [self.chat_ids(c) for c in conversations]
        limits = [max_new_tokens or self._setting(n, "max_new_tokens") for n in rows]
        out = [{**o, "text": o["text"].strip()} for o in self.complete(ids, rows, limits)]
        return out if details else [o["text"] for o in out]

    def prompt_ids(self, prompt: str, adapter: str | None, template: bool = True) -> list[int]:
        from .tasks.generation import ChatPrompt
        if not template:
            return self.tokenizer(prompt)["input_ids"]
        recipe = self.entries[adapter].recipe if adapter else None
        instruction = recipe.data.instruction if recipe else None
        limit = recipe.train.max_length - recipe.train.max_new_tokens if recipe else None
        return ChatPrompt(self.tokenizer, instruction).encode(prompt, limit)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def complete(self, ids: list[list[int]], adapters: list, max_new_tokens: list[int]) -> list[dict]:
        """Greedy continuations of token-id prompts, one adapter and token limit per row:
        {"text", "prompt_tokens", "completion_tokens", "finish_reason"} each."""
        seqs = [Sequence(i, adapter=a, max_tokens=n) for i, a, n in zip(ids, adapters, max_new_tokens)]
        self.decode(seqs)
        return [s.result() for s in seqs]

    def decode(self, seqs: list[Sequence], between_steps=None) -> None:
        """Generate for each Sequence (its own adapter, limits, sampling and stop strings), in batches
        of batch_size rows (left padded) whatever adapters the rows use. `between_steps` runs after
        each step of a batch: each token step, and each prefill chunk of a long prompt (a batch over
        PREFILL_TOKENS prompt tokens runs its prompt through the model that many tokens at a time).
        Between steps the batch passes the model's lock to any waiter that has had fewer turns
        (peftkit.turns), then selects its adapters again, so no batch holds the model for more than
        one bounded step. Rows cancelled before their first token end as "cancelled" without one."""
        from .tasks.generation import CausalCollator
        self._need("causal-lm", "generate")
        self._rows([s.adapter for s in seqs], len(seqs))
        pad = self.tokenizer.pad_token_id
        eos = {self.tokenizer.eos_token_id}
        config_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos |= set(config_eos if isinstance(config_eos, list) else [config_eos])
        eos.discard(None)
        for start in range(0, len(seqs), self.batch_size):
            chunk = _live(seqs[start:start + self.batch_size])
            if not chunk:
                continue
            rows = [s.adapter for s in chunk]
            batch = CausalCollator(pad, side="left")([{"input_ids": s.prompt, "attention_mask": [1] * len(s.prompt)}
                                                      for s in chunk])
            inputs = {k: v.to(self.model.device) for k, v in batch.items()}

            steps = [0]

            def pass_turn(rows=rows):
                steps[0] += 1
                self.lock.pass_turn(had=steps[0])
                self._rows(rows, len(rows))  # an adapter unloaded meanwhile fails this batch clearly
                self._select(rows)
            step = pass_turn if between_steps is None else lambda: (between_steps(), pass_turn())
            with self.lock:  # prefill and generation are one job: its turns count on from one to the other
                if inputs["input_ids"].numel() > PREFILL_TOKENS and self._can_prefill:
                    inputs = self._prefill(chunk, inputs, step)
                    if not _live(chunk):  # every client left during the prefill
                        continue
                self.generate_ids(rows, **inputs, max_new_tokens=max(s.max_tokens for s in chunk),
                                  pad_token_id=pad, eos_token_id=sorted(eos),
                                  logits_processor=LogitsProcessorList([RowSampler(chunk)]),
                                  stopping_criteria=StoppingCriteriaList([Watch(chunk, self.tokenizer, eos, step)]))
            for s in chunk:  # the watch ends every row itself; this only covers generate stopping first
                s.finish_reason = s.finish_reason or "length"

    def _prefill(self, seqs: list[Sequence], inputs: dict, step) -> dict:
        """Run every prompt column but the last into a cache, PREFILL_TOKENS tokens at a time with a
        `step` (a turn for others) after each chunk, where generate would run them in one forward.
        Returns generate's inputs to go on from the cache: the last column and the full mask (it then
        runs only that column, numbered from the mask). Not the full ids: generate would skip as many
        columns as the cache holds, and a prefix adapter's slots are in the cache too."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate numbers left-padded rows
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        width = max(1, PREFILL_TOKENS // len(seqs))
        rows = [s.adapter for s in seqs]
        with torch.inference_mode(), self.lock, self._use(rows):
            for start in range(0, ids.shape[1] - 1, width):
                end = min(start + width, ids.shape[1] - 1)
                # the body alone: it fills the cache, and the LM head's logits here would be thrown away
                self.model.base_model(input_ids=ids[:, start:end], attention_mask=mask[:, :end],
                                      position_ids=positions[:, start:end], cache=cache, use_cache=True)
                step()
                if not _live(seqs):
                    break
        return {"input_ids": ids[:, -1:], "attention_mask": mask, "cache": cache}

    @cached_property  # the same for the bank's lifetime: one base model
    def _can_prefill(self) -> bool:
        """Whether generate can go on from a DynamicCache that the model's body fills. Not for models
        with a cache of their own kind (rwkv, xlnet, a cache_implementation in the generation config,
        which generate refuses beside a cache) nor bodies that take no cache or positions: those
        prefill in one step, as generate does."""
        supports = getattr(self.model, "_supports_default_dynamic_cache", None)
        takes = inspect.signature(self.model.base_model.forward).parameters
        return (supports is not None and supports() and {"cache", "position_ids", "use_cache"} <= takes.keys()
                and getattr(self.model.generation_config, "cache_implementation", None) is None)

    def classify(self, texts, adapter) -> list[dict]:
        """{"label", "score", "scores"} per text, each scored by its row's adapter."""
        self._need("classification", "classify")
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = self._rows(adapter, len(texts))
        if None in rows:
            raise PeftkitError("classify needs an adapter for every row: the base model has no trained head")
        out = []
        for start in range(0, len(texts), self.batch_size):
            names = rows[start:start + self.batch_size]
            encoded = [self.tokenizer(t, truncation=True, max_length=self._setting(n, "max_length"))
                       for t, n in zip(texts[start:start + self.batch_size], names)]
            batch = self.tokenizer.pad(encoded, return_tensors="pt").to(self.model.device)
            logits = self.forward(names, **batch).logits.float()
            for row, name in zip(logits, names):
                labels = self.entries[name].labels
                probs = row[:len(labels)].softmax(-1).tolist()
                best = max(range(len(labels)), key=probs.__getitem__)
                out.append({"label": labels[best], "score": round(probs[best], 4),
                            "scores": {label: round(p, 4) for label, p in zip(labels, probs)}})
        return out

    def answer(self, questions, contexts, adapter) -> list[dict]:
        """{"answer", "score", "start"} per question: the best span of its context (over windows)."""
        from .tasks.qa import best_span, question_windows
        self._need("qa", "answer")
        questions, contexts = list(questions), list(contexts)
        if len(questions) != len(contexts):
            raise PeftkitError(f"{len(questions)} questions but {len(contexts)} contexts")
        rows = self._rows(adapter, len(questions))
        if None in rows:
            raise PeftkitError("answer needs an adapter for every row: the base model has no trained head")
        windows = []  # (question index, {input name: ids}, offsets, sequence ids)
        groups = {}
        for q, name in enumerate(rows):
            groups.setdefault((self._setting(name, "max_length"), self._setting(name, "doc_stride")), []).append(q)
        for (max_length, stride), members in groups.items():
            enc = question_windows(self.tokenizer, [questions[q] for q in members], [contexts[q] for q in members],
                           max_length, stride)
            names = [k for k in self.tokenizer.model_input_names if k in enc]
            for i, source in enumerate(enc["overflow_to_sample_mapping"]):
                windows.append((members[source], {k: enc[k][i] for k in names}, enc["offset_mapping"][i],
                                enc.sequence_ids(i)))
        best = [None] * len(questions)
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            batch = self.tokenizer.pad([w[1] for w in chunk], return_tensors="pt").to(self.model.device)
            out = self.forward([rows[w[0]] for w in chunk], **batch)
            width = out.start_logits.shape[1]
            for (q, _, offsets, sequence_ids), s, e in zip(chunk, out.start_logits.float().cpu().numpy(),
                                                          out.end_logits.float().cpu().numpy()):
                n = len(sequence_ids)  # the window's own tokens, without the batch's padding
                cut = slice(width - n, width) if self.tokenizer.padding_side == "left" else slice(0, n)
                span = best_span(s[cut], e[cut], offsets, sequence_ids)
                if span is not None and (best[q] is None or span[0] > best[q][0]):
                    best[q] = (span[0], contexts[q][span[1]:span[2]], span[3], span[1])
        return [{"answer": b[1], "score": round(float(b[2]), 4), "start": int(b[3])} if b else
                {"answer": "", "score": 0.0, "start": -1} for b in best]

    def predict(self, rows: list[dict]) -> list[dict]:
        """`peftkit predict --base ...` rows: each names its "adapter" (null: the base model, causal LMs
        only) and holds its input under the columns of that adapter's run recipe (by default "prompt",
        "text", or "question" and "context"). One result per row, in order."""
        names = []
        for n, row in enumerate(rows, 1):
            if "adapter" not in row:
                raise PeftkitError(f"row {n} does not name its adapter; add \"adapter\": one of "
                                   f"{', '.join(self.entries) or 'none loaded'}")
            names.append(row["adapter"])
        self._rows(names, len(rows))

        def column(n, row, name, key):
            recipe = self.entries[name].recipe if name else None
            key = getattr(recipe.data, key) if recipe else key
            if not isinstance(row.get(key), str):
                raise PeftkitError(f"row {n} needs a string {key!r} for adapter {name!r}; it has {sorted(row)}")
            return row[key]
        inputs = list(zip(range(1, len(rows) + 1), rows, names))
        if self.task == "causal-lm":
            out = [{"output": t} for t in self.generate([column(*i, "prompt") for i in inputs], names)]
        elif self.task == "classification":
            out = self.classify([column(*i, "text") for i in inputs], names)
        else:
            out = self.answer([column(*i, "question") for i in inputs], [column(*i, "context") for i in inputs], names)
        return [{"adapter": name, **o} for name, o in zip(names, out)]

    # ------------------------------------------------------------------ selection

    def _rows(self, adapter, n: int) -> list:
        rows = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(rows) != n:
            raise PeftkitError(f"got {len(rows)} adapters for a batch of {n} rows; give one per row")
        unknown = sorted({str(r) for r in rows if r is not None and r not in self.entries})
        if unknown:
            raise PeftkitError(f"unknown adapter(s) {', '.join(unknown)}; loaded: {', '.join(self.entries) or 'none'}")
        return rows

    @contextmanager
    def _use(self, rows: list):
        """Select one adapter (or None) per batch row for one call, and clear the selection after."""
        try:
            self._select(rows)
            yield
        finally:
            self._select(None)

    def _select(self, rows) -> None:
        kinds = {e.method for e in self.entries.values()}
        if rows is not None and len(set(rows)) > 1:
            alone = sorted({n for n in rows if n and not method(self.entries[n].method).bank_rows})
            if alone:
                raise PeftkitError(f"adapter(s) {', '.join(alone)} cannot share a batch with other adapters "
                                   "(their method does not mix per row); send their rows on their own")

        def pick(names):  # the rows' adapters of these methods, None for the other rows
            return None if rows is None else _collapse([n if n and self.entries[n].method in names else None
                                                        for n in rows])
        own = [m for m in kinds if not method(m).peft_native]
        for names in tuner_groups(own).values():  # methods sharing a tuner switch together
            method(names[0]).tuner.set_active(self.model, pick(names))
        for switch in self.heads.values():
            switch.active = None if rows is None else _collapse(rows)
        self._lora_now = self._lora_plan(pick([m for m in kinds if method(m).peft_native]))

    def _lora_plan(self, chosen) -> dict | None:
        """{module path: (A, B)}: one adapter's own tensors, or per-row stacks for mixed rows."""
        if chosen is None or isinstance(chosen, str):
            return None if chosen is None else self.entries[chosen].lora
        used = {n: self.entries[n].lora for n in set(chosen) if n is not None}
        return {path: _stack_rows([used[n].get(path) if n else None for n in chosen])
                for path in set().union(*used.values())}

    def _hook(self, path: str) -> None:
        if path not in self._hooks:
            handle = self.modules[path].register_forward_hook(self._lora_hook(path), with_kwargs=True)
            self._hooks[path] = [handle, 0]
        self._hooks[path][1] += 1

    def _unhook(self, path: str) -> None:
        self._hooks[path][1] -= 1
        if self._hooks[path][1] == 0:
            self._hooks.pop(path)[0].remove()

    def _lora_hook(self, path: str):
        def hook(module, args, kwargs, output):
            plan = self._lora_now
            if plan is None or path not in plan:
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            return output + lora_delta(x, *plan[path]).to(output.dtype)
        return hook

    # ------------------------------------------------------------------ helpers

    def _read_lora(self, config: dict, state: dict) -> dict:
        """{module path: (A^T, (B * scaling)^T)} from a peft LoRA state dict, checked against the base
        (transposed once here, so that stacking them per row is a plain copy)."""
        if config.get("use_dora"):
            raise PeftkitError("the bank serves plain LoRA; this is a DoRA adapter (use_dora): merge it "
                               "(peftkit merge) or load it on its own with peftkit.load_adapter")
        pairs = {}
        for key, tensor in state.items():
            short = _strip(key)
            kind = next((k for k in ("A", "B") if short.endswith(f".lora_{k}.weight")), None)
            if kind is None:
                raise PeftkitError(f"the bank serves plain LoRA (lora_A / lora_B weights); this adapter also "
                                   f"holds {key!r} (LoRA bias, embedding LoRA or another variant)")
            pairs.setdefault(short[:-len(".lora_A.weight")], {})[kind] = tensor
        out = {}
        for path, ab in pairs.items():
            module = self.modules.get(path)
            features = _features(module)
            if features is None or set(ab) != {"A", "B"}:
                raise PeftkitError(f"LoRA weights for {path!r} do not fit this base (no such linear layer, "
                                   "or lora_A / lora_B missing)")
            a, b = ab["A"].float(), ab["B"].float()
            if a.shape[1] != features[0] or b.shape[0] != features[1] or a.shape[0] != b.shape[1]:
                raise PeftkitError(f"LoRA weights for {path!r} have shapes {tuple(a.shape)} / {tuple(b.shape)}; "
                                   f"the layer maps {features[0]} -> {features[1]} features")
            r = a.shape[0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
            scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            device = next(module.parameters()).device
            out[path] = (a.t().contiguous().to(device), (b * scaling).t().contiguous().to(device))
        return out

    def _check_new_name(self, name) -> None:
        if not isinstance(name, str) or not NAME.fullmatch(name) or hasattr(nn.ModuleDict(), name):
            raise PeftkitError(f"adapter name {name!r} must be 1-64 letters, digits, '-' or '_' (starting with "
                               "a letter or digit) and not a Python attribute name of nn.ModuleDict")
        if name in self.entries:
            raise PeftkitError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        if name in (self.base_name, Path(self.base_name).name):
            raise PeftkitError(f"{name!r} is the base model's name; pick another adapter name")

    def _entry(self, name) -> Entry:
        if name not in self.entries:
            raise PeftkitError(f"unknown adapter {name!r}; loaded: {', '.join(self.entries) or 'none'}")
        return self.entries[name]

    def _need(self, task: str, what: str) -> None:
        if self.task != task:
            raise PeftkitError(f"{what} needs a {task} bank; this bank's base is a {self.task} model "
                               f"({type(self.model).__name__})")
        if self.tokenizer is None:
            raise PeftkitError(f"{what} needs a tokenizer: AdapterBank(model, tokenizer=...)")

    def _setting(self, name: str | None, key: str):
        """A length setting of an adapter's run recipe, or the default."""
        recipe = self.entries[name].recipe if name else None
        if key == "max_new_tokens":
            return recipe.train.max_new_tokens if recipe else DEFAULTS["max_new_tokens"]
        if key == "doc_stride":
            return recipe.train.doc_stride if recipe else DEFAULTS["doc_stride"]
        if recipe:
            return recipe.train.max_length
        default = DEFAULTS["qa_max_length" if self.task == "qa" else "cls_max_length"]
        return min(default, self.tokenizer.model_max_length)


def _describe(e: Entry) -> dict:
    return {"name": e.name, "method": e.method, "task": e.task, "labels": e.labels, "path": str(e.path),
            "file_bytes": e.file_bytes, "memory_bytes": e.memory_bytes}


class HeadSwitch(nn.Module):
    """Stands in for a task head: one head per adapter, and each batch row goes through its own.
    Heads of different widths (2 vs 5 labels) are padded with -inf: softmax gives those 0."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original  # the base model's own head, used by rows without an adapter
        self.heads = nn.ModuleDict()
        self.active = None  # None | name | list with one name-or-None per row

    def forward(self, x):
        if self.active is None or isinstance(self.active, str):
            return (self.original if self.active is None else self.heads[self.active])(x)
        from .tuners.bottleneck.layer import rows_per_entry
        names = rows_per_entry(self.active, x.shape[0])
        parts = {}
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            parts[name] = (rows, (self.original if name is None else self.heads[name])(x.index_select(0, rows)))
        first = next(iter(parts.values()))[1]
        width = max(y.shape[-1] for _, y in parts.values())
        out = first.new_full((x.shape[0], *first.shape[1:-1], width), float("-inf"))
        for rows, y in parts.values():
            out[rows, ..., :y.shape[-1]] = y
        return out


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B(A x), from A^T and B^T: a [in, r], b [r, out] for every row, or stacked per row:
    a [n, in, r], b [n, r, out]."""
    x = x.to(a.dtype)
    if a.dim() == 2:
        return x @ a @ b
    n = a.shape[0]
    if x.shape[0] != n:  # generate() repeats rows (beams) and some modules flatten tokens into rows
        if x.shape[0] % n:
            raise RuntimeError(f"LoRA got {n} per-row adapters but a layer saw a batch of {x.shape[0]} rows")
        a, b = a.repeat_interleave(x.shape[0] // n, 0), b.repeat_interleave(x.shape[0] // n, 0)
    y = torch.bmm(torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a), b)
    return y.reshape(*x.shape[:-1], b.shape[-1])


def _stack_rows(pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row stacks (A^T [n, in, r], B^T [n, r, out]) for one layer. Rows whose adapter has no
    LoRA here get zeros; smaller ranks are zero-padded to the largest (zeros add nothing)."""
    present = [p for p in pairs if p is not None]
    r = max(a.shape[1] for a, _ in present)
    a0, b0 = present[0]
    zero_a, zero_b = a0.new_zeros(a0.shape[0], r), b0.new_zeros(r, b0.shape[1])
    a = torch.stack([zero_a if p is None else p[0] if p[0].shape[1] == r else F.pad(p[0], (0, r - p[0].shape[1]))
                     for p in pairs])
    b = torch.stack([zero_b if p is None else p[1] if p[1].shape[0] == r else F.pad(p[1], (0, 0, 0, r - p[1].shape[0]))
                     for p in pairs])
    return a, b


def _live(seqs: list[Sequence]) -> list[Sequence]:
    """The rows still to generate; rows whose client has gone end as "cancelled"."""
    for s in seqs:
        if not s.finish_reason and s.cancelled():
            s.finish_reason = "cancelled"
    return [s for s in seqs if not s.finish_reason]


def _collapse(names: list):
    """None when no row has an adapter, the name when all rows share one, else the list."""
    if all(n is None for n in names):
        return None
    return names[0] if all(n == names[0] for n in names) else list(names)


def _batch_size(inputs: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if inputs.get(key) is not None:
            return inputs[key].shape[0]
    raise PeftkitError("give input_ids or inputs_embeds")


def _features(module) -> tuple[int, int] | None:
    if isinstance(module, Conv1D):  # GPT-2: weight is [in, out]
        return tuple(module.weight.shape)
    if isinstance(getattr(module, "in_features", None), int):  # nn.Linear and bitsandbytes' layers
        return module.in_features, module.out_features
    return None


def _strip(key: str) -> str:
    return key[len(LORA_PREFIX):] if key.startswith(LORA_PREFIX) else key


def _pattern_value(patterns: dict, path: str, default):
    """peft's alpha_pattern: the value of the first key that matches the module path's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _head_like(original: nn.Module, head: str, state: dict) -> nn.Module:
    """A copy of the base's head shaped for (and holding) an adapter's head weights."""
    import copy
    own = {_strip(k)[len(head) + 1:]: v for k, v in state.items() if _strip(k).split(".")[0] == head}
    if not own:
        raise PeftkitError(f"the adapter has no weights for the task head {head!r}; it cannot serve this task")
    module = copy.deepcopy(original)
    for name, linear in list(module.named_modules()):
        weight = own.get(f"{name}.weight" if name else "weight")
        if isinstance(linear, nn.Linear) and weight is not None and weight.shape != linear.weight.shape:
            resized = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype)
            if name:
                parent, _, child = name.rpartition(".")
                setattr(module.get_submodule(parent), child, resized)
            else:
                module = resized
    try:
        module.load_state_dict(own)
    except RuntimeError as err:
        raise PeftkitError(f"the adapter's {head!r} head does not fit this base: {err}") from None
    return module.eval().requires_grad_(False)


def _labels(task: dict) -> list[str]:
    id2label = task.get("id2label") or {}
    n = task.get("num_labels") or len(id2label)
    return [id2label.get(str(i), f"LABEL_{i}") for i in range(n)]


def _recipe(path: Path):
    if not (path / "recipe.yaml").is_file():
        return None
    from .presets import read_yaml
    from .recipe import Recipe, build
    return build(Recipe, read_yaml(path / "recipe.yaml"), "")


def task_of_class(class_name: str) -> str:
    for suffix, task in TASKS.items():
        if class_name.endswith(suffix):
            return task
    raise PeftkitError(f"AdapterBank serves causal LMs, sequence classifiers and QA models; "
                       f"{class_name} is none of these (load the base with task=causal-lm, classification or qa)")


def adapter_task(path: Path, config: dict | None = None) -> tuple[str, str | None]:
    """(task, transformers class or None) an adapter folder was trained for."""
    config = config or read_adapter_config(path)
    record = config.get("peftkit") or {}
    model_class = (record.get("task") or {}).get("class")
    if model_class:
        return task_of_class(model_class), model_class
    task = PEFT_TASKS.get(config.get("task_type"))
    if task is None:
        raise PeftkitError(f"{path}: cannot tell what task this adapter is for (peft task_type "
                           f"{config.get('task_type')!r}); the bank serves {', '.join(sorted(PEFT_TASKS))}")
    return task, None
