"""Per-row decoding choices on top of transformers' generate, for the bank and the server.

    seqs = [Sequence(prompt_ids, adapter="alpha", max_tokens=32, temperature=0.8, seed=7, stop=("\\n",))]
    bank.decode(seqs)            # fills seq.text, seq.tokens, seq.finish_reason
    seqs[0].result()             # {"text", "prompt_tokens", "completion_tokens", "finish_reason"}

`model.generate` runs the batch; what it has no option for, peftkit adds through its two
public hooks:
- RowSampler (a LogitsProcessor): each row samples with its own temperature, top_p and seeded
  generator, and hands generate's greedy step that one token. generate's own do_sample draws
  the whole batch from the global generator, so a row's text would depend on its batch-mates
  and a seed could not reproduce it.
- Watch (a StoppingCriteria): after every step, per row, it records the new token and the text
  so far, streams the new text out, and ends the row at end of sequence, its token limit, a
  stop string or a cancelled client; then it runs `between_steps` (the server lets other
  requests have the model there).
"""
import secrets
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LogitsProcessor, StoppingCriteria


@dataclass(eq=False)  # rows are compared by identity: two rows may ask the same
class Sequence:
    prompt: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # the same seed, prompt and adapter give the same text
    stop: tuple = ()  # strings that end the text (not included in it)
    on_text: Callable[[str], None] | None = None  # gets each new piece of text as it is decoded
    cancelled: Callable[[], bool] = lambda: False
    tokens: list = field(default_factory=list)  # the generated tokens the returned text is made of
    text: str = ""
    finish_reason: str | None = None  # stop | length | cancelled
    ended_by_eos: bool = False
    streamed: int = 0  # characters of text already given to on_text

    def restart(self) -> None:
        """Forget what was generated, to run the row again (nothing of it streamed yet)."""
        self.tokens, self.text, self.finish_reason, self.ended_by_eos, self.streamed = [], "", None, False, 0

    def result(self) -> dict:
        return {"text": self.text, "prompt_tokens": len(self.prompt),
                "completion_tokens": len(self.tokens) + self.ended_by_eos, "finish_reason": self.finish_reason}


class RowSampler(LogitsProcessor):
    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs
        self.generators = [torch.Generator().manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
                           if s.temperature > 0 else None for s in seqs]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, (seq, generator) in enumerate(zip(self.seqs, self.generators)):
            if generator is None or seq.finish_reason:
                continue
            token = sample(scores[row].float().cpu(), seq.temperature, seq.top_p, generator)
            scores[row].fill_(-torch.inf)
            scores[row, token] = 0.0
        return scores


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token drawn from softmax(logits / temperature), restricted to the smallest set of most
    likely tokens whose probability reaches top_p."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # probability of the tokens ranked above each
        sorted_probs[before >= top_p] = 0.0  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Watch(StoppingCriteria):
    def __init__(self, seqs: list[Sequence], tokenizer, eos: set, between_steps: Callable[[], None] | None = None):
        self.seqs, self.tokenizer, self.eos, self.between_steps = seqs, tokenizer, eos, between_steps

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for seq, token in zip(self.seqs, input_ids[:, -1].tolist()):
            if not seq.finish_reason:
                self._step(seq, token)
        done = torch.tensor([bool(s.finish_reason) for s in self.seqs], device=input_ids.device)
        if self.between_steps is not None and not done.all():
            self.between_steps()
        return done

    def _step(self, seq: Sequence, token: int) -> None:
        if token in self.eos:
            seq.ended_by_eos = True
            return self._finish(seq, "stop")
        seq.tokens.append(token)
        seq.text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        cut = min((seq.text.find(s) for s in seq.stop if s and s in seq.text), default=None)
        if cut is not None:
            seq.text = seq.text[:cut]
            while seq.tokens and len(self.tokenizer.decode(seq.tokens[:-1], skip_special_tokens=True)) >= cut:
                seq.tokens.pop()  # usage counts the tokens the returned text is made of
            return self._finish(seq, "stop")
        if len(seq.tokens) >= seq.max_tokens:
            return self._finish(seq, "length")
        if seq.cancelled():
            return self._finish(seq, "cancelled")
        self._stream(seq, _safe_end(seq.text, seq.stop))

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self._stream(seq, len(seq.text))

    @staticmethod
    def _stream(seq: Sequence, end: int) -> None:
        if seq.on_text is not None and end > seq.streamed:
            seq.on_text(seq.text[seq.streamed:end])
            seq.streamed = end


def _safe_end(text: str, stops) -> int:
    """How much of the text so far can be streamed: not a trailing half character (a multi-byte
    character split over tokens decodes to U+FFFD), nor a tail that may yet become a stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:n]):
                end -= n
                break
    return end
