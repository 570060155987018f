"""The qa and generation tasks: metrics, feature preparation, generation on adapted
models, and one tiny end-to-end run of each shipped recipe (qa-lora, headlines-lora)."""
import json

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit.attach import attach
from peftkit.attention import running_attention
from peftkit.datasource import check_rows
from peftkit.errors import PeftkitError
from peftkit.loading import load_tokenizer
from peftkit.recipe import Data, Recipe, Train, load_recipe
from peftkit.tasks import generation, qa

HEADLINE = "Write a short headline for this news article."


@pytest.fixture(scope="module")
def bert_tokenizer():
    return load_tokenizer("minilm-l6")


@pytest.fixture(scope="module")
def chat_tokenizer():
    return load_tokenizer("smollm2-135m")


def _recipe(task, **train):
    data = Data(dataset="inline", prompt="article", target="headline", instruction=HEADLINE)
    return Recipe(name="t", task=task, model="m", method="lora", data=data, train=Train(**train))


def _splits(rows: dict, features=None) -> DatasetDict:
    ds = Dataset.from_dict(rows, features=features)
    return DatasetDict({"train": ds, "validation": ds, "test": ds})


# ------------------------------------------------------------------------------ SQuAD metrics

def test_normalize_answer():
    assert qa.normalize_answer("The  Cat's hat!") == "cats hat"
    assert qa.normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert qa.normalize_answer("  $11.5bn ") == "115bn"
    assert qa.normalize_answer("theatre") == "theatre"  # only whole-word articles go


def test_exact_match_and_f1_known_values():
    assert qa.exact_match("the Cat", "cat") == 1.0
    assert qa.exact_match("cat sat", "cat") == 0.0
    assert qa.f1_score("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)  # p=1, r=1/2
    assert qa.f1_score("cat cat", "cat") == pytest.approx(2 / 3)  # counts clipped: p=1/2, r=1
    assert qa.f1_score("dog", "cat") == 0.0
    assert qa.f1_score("", "") == 1.0 and qa.f1_score("a", "cat") == 0.0  # "a" normalises to empty
    scores = qa.squad_scores(["Gordon Brown", "in 2003", "blue"], [["Brown", "Gordon Brown"], ["2003"], ["red"]])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # best over gold answers


def test_baseline_scores_are_stated_and_low_for_sentence_start():
    ds = Dataset.from_dict({"question": ["Profits rose by what percentage in 2004?"],
                            "context": ["Shares fell. Profits rose by 12% in 2004."],
                            "answers": [{"text": ["12%"], "answer_start": [29]}]})
    scores = qa.baseline_scores(ds)
    assert scores["unshared"]["exact_match"] == 1.0  # the one word of the sentence not in the question
    assert scores["sentence_start"]["exact_match"] == 0.0  # "Profits rose by"


# ------------------------------------------------------------------------------ ROUGE-L

def test_rouge_l_known_values():
    # Lin (2004): "police killed the gunman" vs reference "police kill the gunman": LCS 3 of 4.
    assert generation.rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    assert generation.rouge_l("the gunman kill police", "police kill the gunman") == pytest.approx(0.5)
    assert generation.rouge_l("Police, KILL the gunman!", "police kill the gunman") == 1.0
    assert generation.rouge_l("a b c d", "a c") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert generation.rouge_l("nothing shared", "police kill") == 0.0
    assert generation.rouge_l("", "police") == 0.0 and generation.rouge_l("", "") == 1.0
    assert generation.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


# ------------------------------------------------------------------------------ QA features

def _labelled_text(tokenizer, questions, contexts, answers, max_length, stride):
    """(window's decoded labelled tokens, span from offsets, sample index) per window with an answer."""
    enc = qa.question_windows(tokenizer, questions, contexts, max_length, stride)
    lab = qa.encode_train(tokenizer, questions, contexts, answers, max_length, stride)
    assert lab["input_ids"] == enc["input_ids"]
    out = []
    for i, (s, e) in enumerate(zip(lab["start_positions"], lab["end_positions"])):
        q = enc["overflow_to_sample_mapping"][i]
        if s == 0:
            out.append((None, None, q))
            continue
        offsets = enc["offset_mapping"][i]
        out.append((tokenizer.decode(enc["input_ids"][i][s:e + 1]), contexts[q][offsets[s][0]:offsets[e][1]], q))
    return out


def test_qa_labels_point_at_the_answer(bert_tokenizer):
    context = "Shares fell on Monday. Chief executive John Smith said profits rose by 12% in 2004."
    answers = [{"text": ["John Smith"], "answer_start": [context.index("John Smith")]},
               {"text": ["12%"], "answer_start": [context.index("12%")]}]
    found = _labelled_text(bert_tokenizer, ["Who said profits rose?", "Profits rose by what percentage?"],
                           [context, context], answers, 64, 16)
    assert [(dec, span) for dec, span, _ in found] == [("john smith", "John Smith"), ("12 %", "12%")]


def test_qa_labels_on_real_bbc_rows(bert_tokenizer):
    from peftkit.data import load_embedded
    rows = load_embedded("bbc_qa")["validation"].select(range(60))
    found = _labelled_text(bert_tokenizer, rows["question"], rows["context"], rows["answers"], 256, 96)
    labelled = [(span, q) for _, span, q in found if span is not None]
    assert len({q for _, q in labelled}) == 60  # every question has a window that holds its answer
    assert all(span == rows["answers"][q]["text"][0] for span, q in labelled)


def _long_context():
    filler = " ".join(f"Sentence {n} talks about nothing in particular at all." for n in range(60))
    context = filler + " The winning horse was called Bright Morning Star. " + filler
    return context, {"text": ["Bright Morning Star"], "answer_start": [context.index("Bright Morning Star")]}


def test_qa_windows_of_a_long_context(bert_tokenizer):
    context, answer = _long_context()
    found = _labelled_text(bert_tokenizer, ["What was the winning horse called?"], [context], [answer], 96, 32)
    assert len(found) > 10  # ~1,000 tokens in 96-token windows
    spans = [(dec, span) for dec, span, _ in found if span is not None]
    assert 1 <= len(spans) <= 3 and all(s == ("bright morning star", "Bright Morning Star") for s in spans)
    assert sum(dec is None for dec, _, _ in found) == len(found) - len(spans)  # the rest point at CLS


def test_qa_max_length_too_short_is_named(bert_tokenizer):
    question = "Which " + "very " * 40 + "long question is this?"
    splits = _splits({"question": [question], "context": ["Some context here."],
                      "answers": [{"text": ["Some"], "answer_start": [0]}]})
    with pytest.raises(PeftkitError, match=r"max_length 48 is too short.*longest question.*4\d tokens.*>= \d+"):
        qa.prepare(_recipe("qa", max_length=48, doc_stride=8), splits, bert_tokenizer)
    short = _splits({"question": ["Who?"], "context": ["Some context here."],
                     "answers": [{"text": ["Some"], "answer_start": [0]}]})
    with pytest.raises(PeftkitError, match="doc_stride 64 must be smaller"):
        qa.prepare(_recipe("qa", max_length=64, doc_stride=64), short, bert_tokenizer)
    with pytest.raises(PeftkitError, match="data has no column 'answers'"):  # checked as the data loads
        check_rows(_splits({"question": ["q"], "context": ["c"]})["train"], qa.columns(_recipe("qa").data), "data")


class SpanOracle(nn.Module):
    """A stand-in QA model whose logits peak where one of the answers' token ids sit in the window."""

    def __init__(self, answers_ids):
        super().__init__()
        self.answers_ids = answers_ids
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def forward(self, input_ids, **kwargs):
        start = torch.full(input_ids.shape, -5.0)
        end = torch.full(input_ids.shape, -5.0)
        for row, ids in enumerate(input_ids.tolist()):
            for answer in self.answers_ids:
                n = len(answer)
                for i in range(len(ids) - n + 1):
                    if ids[i:i + n] == answer:
                        start[row, i], end[row, i + n - 1] = 5.0, 5.0
        return type("Out", (), {"start_logits": start, "end_logits": end})()


@pytest.mark.parametrize("side", ["right", "left"])
def test_qa_evaluate_and_predict_map_spans_back_to_characters(bert_tokenizer, side):
    context, answer = _long_context()
    short = "Shares fell on Monday. Chief executive John Smith said profits rose."
    texts = [answer["text"][0], "John Smith"]
    model = SpanOracle([bert_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
    recipe = _recipe("qa", max_length=96, doc_stride=32, eval_batch_size=4)
    ds = Dataset.from_dict({"question": ["What was the winning horse called?", "Who said profits rose?"],
                            "context": [context, short],
                            "answers": [answer, {"text": ["John Smith"], "answer_start": [short.index("John")]}]})
    bert_tokenizer.padding_side = side  # windows of different lengths share batches: padding must be dropped
    try:
        assert qa.evaluate(model, bert_tokenizer, ds, recipe) == {"exact_match": 1.0, "f1": 1.0}
        rows = qa.predict(model, bert_tokenizer, [{"question": "What horse?", "context": context},
                                                  {"question": "Who?", "context": short}], recipe)
    finally:
        bert_tokenizer.padding_side = "right"
    assert [(r["answer"], r["start"]) for r in rows] == [("Bright Morning Star", answer["answer_start"][0]),
                                                        ("John Smith", short.index("John"))]
    assert all(0.5 < r["score"] <= 1.0 for r in rows)
    with pytest.raises(PeftkitError, match="needs a string 'context'"):
        qa.predict(model, bert_tokenizer, [{"question": "What horse?"}], recipe)


# ------------------------------------------------------------------------------ generation features

def test_generation_labels_cover_only_the_answer(chat_tokenizer):
    articles = ["Short article about a bank. " * 3, "Long article about football. " * 200]
    headlines = ["Bank profits soar", "Chelsea win the league again"]
    splits = _splits({"article": articles, "headline": headlines})
    prepared = generation.prepare(_recipe("generation", max_length=96), splits, chat_tokenizer)
    eos = chat_tokenizer.eos_token
    for row, article, headline in zip(prepared.train, articles, headlines):
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) == len(row["attention_mask"]) <= 96
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert all(label != -100 for label in labels[first:])  # one answer block, at the end
        assert labels[first:] == ids[first:]
        assert chat_tokenizer.decode(labels[first:]) == headline + eos
        prompt = chat_tokenizer.decode(ids[:first])
        assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
        assert f"{HEADLINE}\n\n{article[:20]}" in prompt
    assert len(prepared.train[1]["input_ids"]) == 96  # the long article was cut, its headline kept whole

    batch = prepared.collator([prepared.train[0], prepared.train[1]])
    short = len(prepared.train[0]["input_ids"])
    assert batch["input_ids"].shape == (2, 96)
    assert (batch["labels"][0, short:] == -100).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert (batch["input_ids"][0, short:] == chat_tokenizer.pad_token_id).all()  # right padding


def test_generation_classlabel_target_becomes_its_name(chat_tokenizer):
    features = Features({"text": Value("string"), "label": ClassLabel(names=["business", "sport"])})
    splits = _splits({"text": ["Shares rose.", "Chelsea won."], "label": [0, 1]}, features)
    recipe = _recipe("generation", max_length=96)
    recipe.data.prompt, recipe.data.target = "text", "label"
    train = generation.prepare(recipe, splits, chat_tokenizer).train
    assert [chat_tokenizer.decode([t for t in row["labels"] if t != -100]) for row in train] == \
        ["business<|im_end|>", "sport<|im_end|>"]


def test_generation_max_length_too_short_is_named(chat_tokenizer):
    splits = _splits({"article": ["An article."], "headline": ["A headline"]})
    with pytest.raises(PeftkitError, match=r"max_length 48 is too short.*chat template and instruction take \d+"):
        generation.prepare(_recipe("generation", max_length=48), splits, chat_tokenizer)


# ------------------------------------------------------------------------------ generation on adapted models

def _tiny_chat_lm(vocab_size):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         pad_token_id=2, eos_token_id=2, bos_token_id=1)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["lora", "houlsby", "prefix", "prompt_tuning", "p_tuning"])
def test_generation_batched_left_padding_matches_one_by_one(chat_tokenizer, method):
    """Greedy answers do not depend on the batch (left padding is masked), on a LoRA PeftModel
    and on peftkit's own adapters alike; prompts longer than max_length are cut."""
    model = attach(_tiny_chat_lm(len(chat_tokenizer)), method)
    prompts = ["Shares rose.", "A much longer article about football and the league. " * 10, "Rain."]
    batched = generation.generate(model, chat_tokenizer, prompts, _recipe("generation", max_length=96,
                                                                         max_new_tokens=6, eval_batch_size=3))
    single = generation.generate(model, chat_tokenizer, prompts, _recipe("generation", max_length=96,
                                                                        max_new_tokens=6, eval_batch_size=1))
    assert batched == single and all(isinstance(o, str) for o in batched)
    assert len(chat_tokenizer(batched[0], add_special_tokens=False)["input_ids"]) <= 6 + 1


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt_tuning", "p_tuning"])
def test_answer_loss_equals_the_full_logits_loss(method):
    """The training loss that computes logits at answer positions only is transformers' causal-LM
    loss, value and gradients, with padding and rows of different answer lengths."""
    torch.manual_seed(0)
    model = attach(_tiny_chat_lm(64), method)
    model.train()
    for module in model.modules():  # dropout off: the two passes must see the same network
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    ids = torch.randint(3, 64, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels = ids.clone()
    labels[:, :7] = -100
    labels[1, :10] = -100
    labels[2, 9:] = -100
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    expected, expected_grads = loss_and_grads(lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    got, got_grads = loss_and_grads(lambda: generation.answer_loss(model, batch))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # with the Trainer's token count over an accumulated batch: a sum over this batch's tokens / that count
    answers = int((labels[:, 1:] != -100).sum())
    scaled = generation.answer_loss(model, batch, num_items_in_batch=torch.tensor(4 * answers))
    torch.testing.assert_close(scaled, expected / 4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_learning_generates_what_full_forward_passes_predict(chat_tokenizer, method):
    """Greedy answers of a prompt-learning model are those of argmax over full forward passes (peft's
    cached steps under transformers 5 are not)."""
    model = attach(_tiny_chat_lm(len(chat_tokenizer)), method)
    recipe = _recipe("generation", max_length=96, max_new_tokens=5, eval_batch_size=2)
    prompts = ["Shares rose.", "Rain fell on the league's football grounds all week."]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([generation.ChatPrompt(chat_tokenizer, HEADLINE).encode(prompt, 96 - 5)])
        start = ids.shape[1]
        for _ in range(5):
            with torch.no_grad():
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            if ids[0, -1] == chat_tokenizer.eos_token_id:
                break
        expected.append(chat_tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip())
    assert generation.generate(model, chat_tokenizer, prompts, recipe) == expected


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_answer_loss_of_a_prompt_learning_model_is_the_answer_tokens_cross_entropy(method):
    """peft prepends the virtual tokens: the loss reads the answer tokens' logits, behind the prompt."""
    model = attach(_tiny_chat_lm(64), {"method": method, "num_virtual_tokens": 5}).eval()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        full = model(input_ids=ids).logits  # 5 + 9 positions
        got = generation.answer_loss(model, {"input_ids": ids, "labels": labels})
    assert full.shape[1] == 14
    predicting = full[:, 5:-1]  # the positions of the real tokens, each predicting the next one
    expected = nn.functional.cross_entropy(predicting[:, 5:].reshape(-1, 64), ids[:, 6:].reshape(-1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ end to end

def _check_run(run_dir, metric_keys):
    from peftkit.runs import open_run
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "adapter_config.json").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for stage in ("base", "adapted"):
        assert set(metrics[stage]) == set(metric_keys)
        assert all(0.0 <= v <= 1.0 for v in metrics[stage].values())
    return open_run(run_dir)


def test_end_to_end_qa_lora(tmp_path):
    from peftkit.train import train
    recipe = load_recipe("recipes/qa-lora.yaml", ["data.max_train_samples=16", "data.max_eval_samples=8",
                                                   "train.max_steps=2", "train.batch_size=8",
                                                   f"output_dir={tmp_path}"])
    run = _check_run(train(recipe), ["exact_match", "f1"])
    context = "Shares fell on Monday. Chief executive John Smith said profits rose by 12% in 2004."
    [row] = run.predict([{"question": "Who said profits rose?", "context": context}])
    assert set(row) == {"answer", "score", "start"} and context[row["start"]:].startswith(row["answer"])


def test_end_to_end_headlines_lora(tmp_path):
    from peftkit.train import train
    recipe = load_recipe("recipes/headlines-lora.yaml", [
        "data.max_train_samples=4", "data.max_eval_samples=2", "train.max_steps=1", "train.batch_size=4",
        "train.max_new_tokens=4", "train.max_length=128", f"output_dir={tmp_path}"])
    run_dir = train(recipe)
    run = _check_run(run_dir, ["rouge_l", "exact_match"])
    [row] = run.predict([{"article": "The Bank of England kept interest rates at 4.75% on Thursday."}])
    assert set(row) == {"output"} and isinstance(row["output"], str)
    # reopened, the run computes as it did in training: in a bf16 run the base is stored in bf16, the
    # adapter in fp32, and the attention kernel is the one training chose
    metrics = json.loads((run_dir / "metrics.json").read_text())
    dtypes = {("lora_" in n, p.dtype) for n, p in run.model.named_parameters()}
    assert dtypes == ({(False, torch.bfloat16), (True, torch.float32)} if metrics["precision"] == "bf16"
                      else {(False, torch.float32), (True, torch.float32)})
    if metrics["precision"] == "bf16":
        assert f"{running_attention(run.model)} attention" in metrics["precision_detail"]
    assert run.evaluate("test") == metrics["adapted"]
    from peftkit.runs import open_run
    merging = open_run(run_dir, as_trained=False)  # `peftkit merge` folds into the base as loaded
    assert {p.dtype for p in merging.model.parameters()} == {torch.float32}


def test_end_to_end_headlines_prompt_tuning(tmp_path):
    from peftkit.train import train
    recipe = load_recipe("recipes/headlines-lora.yaml", [
        "method=prompt_tuning", "data.max_train_samples=4", "data.max_eval_samples=2", "train.max_steps=2",
        "train.batch_size=4", "train.max_new_tokens=4", "train.max_length=128", "train.logging_steps=1",
        f"output_dir={tmp_path}"])
    run_dir = train(recipe)
    run = _check_run(run_dir, ["rouge_l", "exact_match"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainable_params"] == 20 * 576  # 20 virtual tokens of SmolLM2-135M's width, nothing else
    losses = [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(0 < loss < 20 for loss in losses)
    [row] = run.predict([{"article": "The Bank of England kept interest rates at 4.75% on Thursday."}])
    assert set(row) == {"output"} and isinstance(row["output"], str)
