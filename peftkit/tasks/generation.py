"""Generation with a causal LM: a prompt in, text out; ROUGE-L and exact match.

Each row becomes one chat turn: the user says `instruction` + blank line +
`prompt` (the tokenizer's chat template, with the assistant's turn opened), and
the model learns to answer `target` followed by the end-of-turn token. Loss
falls on the answer tokens only. Long prompts are cut (their end), never the
answer. A ClassLabel target is written as its label name, so classification
data trains generative classifiers ("sport", not 3).
"""
import re

import torch
from accelerate.utils import extract_model_from_parallel
from datasets import ClassLabel
from tqdm.auto import tqdm

from ..anatomy import adapters_of
from ..errors import PeftkitError
from ..methods import method
from . import Prepared
from .qa import normalize_answer

MODEL_TASK = "causal-lm"
MIN_PROMPT_TOKENS = 16  # a prompt cut shorter than this would leave the model nothing to read
IGNORE = -100  # label of tokens that carry no loss
_SENTINEL = "\u0000PEFTKIT-PROMPT\u0000"


# ---------------------------------------------------------------------------------------------
# prompts

class ChatPrompt:
    """Token ids of one user turn with the assistant's turn opened, built as
    `before` + prompt tokens + `after`, so the prompt alone can be cut to fit."""

    def __init__(self, tokenizer, instruction: str | None = None):
        self.tokenizer = tokenizer
        head = f"{instruction}\n\n" if instruction else ""
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}],
                                                 add_generation_prompt=True, tokenize=False)
            if text.count(_SENTINEL) != 1:
                raise PeftkitError("the tokenizer's chat template does not keep the user's message verbatim")
            before, after = text.split(_SENTINEL)
            self.before = self._ids(before + head)
        else:  # no template: "instruction\n\nprompt\n", after BOS where the model has one
            after = "\n"
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            self.before = bos + self._ids(head)
        self.after = self._ids(after)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    @property
    def overhead(self) -> int:
        return len(self.before) + len(self.after)

    def encode(self, prompt: str, max_tokens: int | None = None) -> list[int]:
        """The turn's ids, the prompt's tokens cut at the end so the whole is at most max_tokens
        (but the prompt keeps at least MIN_PROMPT_TOKENS)."""
        ids = self._ids(prompt)
        if max_tokens is not None:
            ids = ids[:max(max_tokens - self.overhead, MIN_PROMPT_TOKENS)]
        return self.before + ids + self.after


def answer_ids(tokenizer, target: str) -> list[int]:
    """The answer the model learns: the target's tokens and the end-of-turn (eos) token."""
    return tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def target_texts(values, feature) -> list[str]:
    """Targets as text: a ClassLabel's ids become their names."""
    if isinstance(feature, ClassLabel):
        return [feature.int2str(v) if isinstance(v, int) else str(v) for v in values]
    return [v if isinstance(v, str) else str(v) for v in values]


# ---------------------------------------------------------------------------------------------
# training data

def columns(data) -> dict:
    """What each row must carry (datasource checks it on load); the target may be a class label."""
    return {data.prompt: "text", data.target: "label"}


def prepare(recipe, splits, tokenizer) -> Prepared:
    data, t = recipe.data, recipe.train
    if tokenizer.eos_token_id is None:
        raise PeftkitError(f"the tokenizer of {recipe.model} has no eos token; generation needs one to end answers")
    template = ChatPrompt(tokenizer, data.instruction)
    feature = splits["train"].features[data.target]
    targets = target_texts(splits["train"][data.target], feature)
    longest = max(len(answer_ids(tokenizer, target)) for target in targets)
    check_lengths(recipe, template, longest)

    def encode(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, target in zip(batch[data.prompt], target_texts(batch[data.target], feature)):
            answer = answer_ids(tokenizer, target)
            question = template.encode(prompt, t.max_length - len(answer))
            out["input_ids"].append(question + answer)
            out["attention_mask"].append([1] * (len(question) + len(answer)))
            out["labels"].append([IGNORE] * len(question) + answer)
        return out

    train = splits["train"].map(encode, batched=True, remove_columns=splits["train"].column_names,
                                desc="tokenizing (chat prompts + answers)")
    return Prepared(train, CausalCollator(tokenizer.pad_token_id, side="right"),
                    model_kwargs={"pad_token_id": tokenizer.pad_token_id}, loss=answer_loss)


def answer_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy on the answer tokens, with logits computed at the positions that predict them only.

    transformers applies the output layer at every position and then ignores all but the answer's:
    with a 49k vocabulary and ~150-token prompts that logits tensor, its softmax and its gradient
    are most of a step's activation memory and about a quarter of its time. A pre-hook hands the
    output layer the answer-predicting hidden states alone; the loss is the same number. Prompt learning
    (peft's prompt tuning, p-tuning) prepends its virtual tokens to the input, so the hidden states are
    longer than the labels by those positions, which predict no answer token.
    Sum over tokens divided by `num_items_in_batch` (the Trainer's count over the accumulated
    batch, as transformers normalizes), or the mean when it is not given.
    """
    labels = inputs["labels"]
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE
    head = extract_model_from_parallel(model).get_output_embeddings()  # under DDP `model` is its wrapper
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][_behind_prompt(keep, args[0])],))
    try:
        # no KV cache: transformers builds one whenever use_cache is on (the config's default), a
        # concatenation per layer per step that training never reads
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
    finally:
        handle.remove()
    total = torch.nn.functional.cross_entropy(logits.float(), targets[targets != IGNORE], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return total / count


def _behind_prompt(keep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """`keep` (batch x tokens) for hidden states that may start with virtual tokens: those are kept out."""
    return torch.cat((keep.new_zeros(keep.shape[0], hidden.shape[1] - keep.shape[1]), keep), dim=1)


def check_lengths(recipe, template: ChatPrompt, longest_answer: int) -> None:
    t = recipe.train
    for need, what in ((longest_answer, f"its longest target ({longest_answer} tokens with eos)"),
                       (t.max_new_tokens, f"train.max_new_tokens {t.max_new_tokens} at evaluation")):
        room = t.max_length - template.overhead - need
        if room < MIN_PROMPT_TOKENS:
            raise PeftkitError(
                f"train.max_length {t.max_length} is too short for {recipe.data.dataset}: the chat template and "
                f"instruction take {template.overhead} tokens and {what}, leaving {room} for the prompt "
                f"(at least {MIN_PROMPT_TOKENS} needed); use train.max_length >= "
                f"{template.overhead + need + MIN_PROMPT_TOKENS}")


class CausalCollator:
    """Pads input_ids (with pad_id), attention_mask (0) and labels (-100) to the longest row."""

    def __init__(self, pad_id: int, side: str = "right"):
        if side not in ("left", "right"):
            raise ValueError(f"side must be left or right, got {side!r}")
        self.pad_id, self.side = pad_id, side

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            n = width - len(f["input_ids"])
            for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("labels", IGNORE)):
                if key == "labels" and "labels" not in f:
                    continue
                values = list(f[key])
                batch[key].append([fill] * n + values if self.side == "left" else values + [fill] * n)
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items() if rows}


# ---------------------------------------------------------------------------------------------
# evaluation and prediction

@torch.no_grad()
def evaluate(model, tokenizer, dataset, recipe, desc="evaluating") -> dict:
    data = recipe.data
    if data.max_eval_samples and len(dataset) > data.max_eval_samples:
        dataset = dataset.select(range(data.max_eval_samples))
    outputs = generate(model, tokenizer, dataset[data.prompt], recipe, desc)
    golds = target_texts(dataset[data.target], dataset.features[data.target])
    n = max(len(golds), 1)
    return {"rouge_l": sum(rouge_l(o, g) for o, g in zip(outputs, golds)) / n,
            "exact_match": sum(normalize_answer(o) == normalize_answer(g) for o, g in zip(outputs, golds)) / n}


@torch.no_grad()
def predict(model, tokenizer, rows, recipe, desc="predicting") -> list[dict]:
    key = recipe.data.prompt
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get(key), str):
            raise PeftkitError(f"row {n} needs a string {key!r} (the recipe's data.prompt); it has {sorted(row)}")
    return [{"output": text} for text in generate(model, tokenizer, [r[key] for r in rows], recipe, desc)]


@torch.no_grad()
def generate(model, tokenizer, prompts, recipe, desc="generating") -> list[str]:
    """Greedy answers, batched with left padding. A prompt is cut so that it and
    max_new_tokens fit train.max_length, as in training."""
    t = recipe.train
    template = ChatPrompt(tokenizer, recipe.data.instruction)
    encoded = [template.encode(p, t.max_length - t.max_new_tokens) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: memory shows at once
    collate = CausalCollator(tokenizer.pad_token_id, side="left")
    eos = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
    outputs = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), t.eval_batch_size), desc=desc, leave=False, disable=None):
            index = order[start:start + t.eval_batch_size]
            batch = collate([{"input_ids": encoded[i], "attention_mask": [1] * len(encoded[i])} for i in index])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            out = model.generate(**batch, max_new_tokens=t.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos),
                                 use_cache=_cache_works(model))
            new = out[:, batch["input_ids"].shape[1]:]
            for i, text in zip(index, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = text.strip()
    finally:
        model.train(was_training)
    return outputs


def _cache_works(model) -> bool:
    """Whether `model` generates right from a KV cache. peft's prompt learning (prompt tuning, p-tuning)
    under transformers 5 does not: from the second new token on, its cached steps predict other tokens than
    a full forward pass over the same text, so it generates without one (each step reads the whole text)."""
    return not any(method(info.method).prepends_tokens for info in adapters_of(model).values())


# ---------------------------------------------------------------------------------------------
# metrics

_TOKEN = re.compile(r"[^\W_]+")


def rouge_tokens(text: str) -> list[str]:
    """Lowercase runs of letters and digits (rouge-score's tokenizer, without stemming)."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list, b: list) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words over the prediction's length
    (precision) and the reference's (recall)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def baseline_scores(dataset, recipe) -> None:
    """None: generation reports no model-free baseline; the base model's test score is the one to beat."""
    return None
