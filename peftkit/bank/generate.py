"""Generation for causal-LM banks: text or token ids in, greedy (or per-row sampled) tokens out,
one adapter per row, in batches that pass the model to other callers between steps.

    bank.generate(prompts, adapter=None, max_new_tokens=None, template=True, details=False)
    bank.chat(conversations, adapter=None, max_new_tokens=None, details=False)
    bank.prompt_ids(prompt, adapter, template=True); bank.chat_ids(messages)
    bank.complete(ids, adapters, max_new_tokens)   token-id prompts -> result dicts
    bank.decode(seqs, between_steps=None)          decoding.Sequence rows, as the server batches them
    PREFILL_TOKENS    the most prompt tokens (rows x columns) one prefill step takes

Mixed into AdapterBank; uses base.py's Holder (model, tokenizer, lock, settings) and rows.py's
selection (generate_ids, _rows, _select, _use).
"""
import inspect
from functools import cached_property

import torch
from transformers import DynamicCache, LogitsProcessorList, StoppingCriteriaList

from ..decoding import RowSampler, Sequence, Watch
from .rows import lead

PREFILL_TOKENS = 512  # prompt tokens (rows x columns) one prefill step of decode takes at most


class Generation:
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
        from ..tasks.generation import ChatPrompt
        if not template:
            return self.tokenizer(prompt)["input_ids"]
        recipe = self.entries[lead(adapter)].recipe if adapter else None
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
        from ..tasks.generation import CausalCollator
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


def _live(seqs: list[Sequence]) -> list[Sequence]:
    """The rows still to generate; rows whose client has gone end as "cancelled"."""
    for s in seqs:
        if not s.finish_reason and s.cancelled():
            s.finish_reason = "cancelled"
    return [s for s in seqs if not s.finish_reason]
