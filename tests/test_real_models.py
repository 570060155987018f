"""Every adapter method on the two real embedded models, fp32 and quantized.

For each method (LoRA, Houlsby, Pfeiffer, parallel, prefix) x task (MiniLM-L6
sequence classification, MiniLM-L6 extractive QA, SmolLM2-135M causal LM) x
precision (fp32, nf4, 8-bit): load, attach, one AdamW step on real tokenized
text, check that only adapter parameters and task heads moved (base weights,
including bitsandbytes' packed weights and quantization state, stay bit-identical
to a pristine load), then save_adapter -> load_adapter onto a new base of the same
kind and precision and compare eval outputs. Plus LoRA merge equivalence, the
merge refusal for bottleneck adapters, and the refusal to load an adapter onto
another model.

Cost: each (model, task, precision) base is loaded once per module (`Bases`);
the model a test trains is a deep copy of that pristine load, and the base its
adapter is then loaded onto is a real fresh peftkit.load_model(). The module runs
torch on one thread (see `one_thread`).

These use the real cache ($PEFTKIT_CACHE or ~/.cache/peftkit), like test_embedded.py.
"""
import copy

import pytest
import torch
from peft import PeftModel

import peftkit
from peftkit.tuners.bottleneck.layer import BottleneckWrapper

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

MINILM, SMOLLM = "minilm-l6", "smollm2-135m"
METHODS = ["lora", "houlsby", "pfeiffer", "parallel", "prefix"]
TASKS = {  # test id -> (model, peftkit task, load_model overrides)
    "cls": (MINILM, "classification", {"num_labels": 2}),
    "qa": (MINILM, "qa", {}),
    "lm": (SMOLLM, "causal-lm", {}),
}
PRECISIONS = {"fp32": None, "nf4": "nf4", "8bit": "8bit"}
ATOL = {"fp32": 1e-5, "nf4": 1e-4, "8bit": 1e-4}
HEADS = ("classifier", "score", "qa_outputs")
# substrings naming parameters that attach() injects (peft's LoRA and its trainable head
# copies; peftkit's bottleneck adapters and prefix bank)
INJECTED = ("lora_A.", "lora_B.", "lora_embedding_", "lora_magnitude", "modules_to_save.", ".adapters.",
            "_peftkit_prefix.")
MAX_LEN = 32


# ---------------------------------------------------------------------------- bases

class Bases:
    """Pristine loads, one per (model, task, precision), and what they looked like."""

    def __init__(self):
        self.models, self.snapshots, self.tokenizers = {}, {}, {}

    def pristine(self, task_id: str, precision: str):
        key = (task_id, precision)
        if key not in self.models:
            self.models[key] = load(task_id, precision)
            self.snapshots[key] = normalized(snapshot(self.models[key]))
        return self.models[key]

    def copy(self, task_id: str, precision: str):
        """A model to train: a deep copy of the pristine load (never touched itself)."""
        return copy.deepcopy(self.pristine(task_id, precision))

    @staticmethod
    def fresh(task_id: str, precision: str):
        """A base to load an adapter onto, as a user would have it: a new load."""
        return load(task_id, precision)

    def tokenizer(self, model_name: str):
        if model_name not in self.tokenizers:
            self.tokenizers[model_name] = peftkit.load_tokenizer(model_name)
        return self.tokenizers[model_name]


def load(task_id: str, precision: str):
    model_name, task, overrides = TASKS[task_id]
    return peftkit.load_model(model_name, task=task, quantize=PRECISIONS[precision], **overrides)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module's CPU math on one thread. On a shared 2-core machine, two
    intra-op threads competing with other processes spend their time in OpenMP
    barriers: measured back to back, this file took 5 min 43 s (6 min CPU) with
    torch's default 2 threads and 52 s with 1. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bases():
    cache = Bases()
    yield cache
    cache.models.clear()  # ~1.5 GB of weights and snapshots; free them for the next module
    cache.snapshots.clear()


# ---------------------------------------------------------------------------- data

def batch_for(task_id: str, tokenizer):
    """(model inputs, training targets): two short real sentences, <= MAX_LEN tokens."""
    if task_id == "cls":
        batch = tokenizer(["A warm, funny and deeply moving film.", "Dull, slow and badly acted."],
                          padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        return dict(batch), {"labels": torch.tensor([1, 0])}
    if task_id == "qa":
        questions = ["Where did the cat sleep?", "What fell over the town?"]
        contexts = ["The cat slept on the warm mat by the kitchen door.",
                    "Soft rain fell over the quiet town all night."]
        answers = ["the warm mat", "Soft rain"]
        batch = tokenizer(questions, contexts, padding=True, truncation="only_second", max_length=MAX_LEN,
                          return_offsets_mapping=True, return_tensors="pt")
        offsets = batch.pop("offset_mapping")
        starts, ends = [], []
        for row, (context, answer) in enumerate(zip(contexts, answers)):
            first = context.index(answer)
            last = first + len(answer)
            tokens = [i for i, seq in enumerate(batch.sequence_ids(row))
                      if seq == 1 and offsets[row, i, 0] < last and offsets[row, i, 1] > first]
            starts.append(tokens[0])
            ends.append(tokens[-1])
        return dict(batch), {"start_positions": torch.tensor(starts), "end_positions": torch.tensor(ends)}
    batch = tokenizer(["The cat slept on the warm mat by the kitchen door.",
                       "Soft rain fell over the quiet town."],
                      padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # no loss on padding
    return dict(batch), {"labels": labels}


# ---------------------------------------------------------------------------- helpers

def snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, plus the tensors bitsandbytes keeps beside a
    quantized weight (4-bit quant_state, 8-bit row scales): the stored state."""
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    state.update({f"{name}:buffer": b.detach().clone() for name, b in model.named_buffers()})
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None:
            for key, value in quant_state.as_dict(packed=True).items():
                if isinstance(value, torch.Tensor):
                    state[f"{name}.weight:quant_state.{key}"] = value.detach().clone()
        # LLM.int8 row scales: on the weight until the first forward, then on the layer's state
        scb = getattr(weight, "SCB", None)
        if scb is None and weight is not None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            state[f"{name}.weight:SCB"] = scb.detach().clone()
    return state


def injected(name: str) -> bool:
    """Whether a parameter of an attached model is the adapter's or a task head's."""
    return any(marker in name for marker in INJECTED) or name.split(".")[0] in HEADS


def normalized(state: dict) -> dict:
    """Names of base tensors as in the bare transformers model (peft's and
    peftkit's wrappers removed)."""
    out = {}
    for name, value in state.items():
        bare = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
        assert bare not in out, f"two tensors normalize to {bare}"
        out[bare] = value
    return out


def is_head(name: str) -> bool:
    return name.split(".")[0] in HEADS


def main_output(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    if getattr(out, "start_logits", None) is not None:
        return torch.cat([out.start_logits, out.end_logits], dim=-1)
    return out.logits


def attach(model, method: str, precision: str):
    torch.manual_seed(0)
    options = {}
    if method == "prefix" and precision != "fp32":
        options["gradient_checkpointing"] = False  # prefix refuses checkpointing; k-bit attach turns it on
    return peftkit.attach(model, method, **options)


def train_step(model, batch, targets) -> float:
    """One AdamW step; checks that gradients reach only what attach made trainable."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    loss = model(**batch, **targets).loss
    assert loss is not None and torch.isfinite(loss), f"loss is {loss}"
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(injected(n) for n in with_grad), sorted(n for n in with_grad if not injected(n))[:5]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def changed_names(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}


# ---------------------------------------------------------------------------- the matrix

@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("task_id", list(TASKS))
@pytest.mark.parametrize("method", METHODS)
def test_train_save_load(bases, tmp_path, method, task_id, precision):
    model_name = TASKS[task_id][0]
    batch, targets = batch_for(task_id, bases.tokenizer(model_name))
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= MAX_LEN

    model = attach(bases.copy(task_id, precision), method, precision)
    if method == "lora":
        assert isinstance(model, PeftModel)

    # what attach made trainable is exactly the injected adapter and the task heads
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if injected(n)}
    assert any(not any(n.startswith(h + ".") for h in HEADS) and "modules_to_save." not in n for n in trainable), \
        "no adapter parameters were injected"
    if task_id != "lm":
        assert any(is_head(n) or "modules_to_save." in n for n in trainable), "the task head is not trainable"
    report = peftkit.param_report(model)
    assert 0 < report["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert report["ratio"] < 0.2

    before = snapshot(model)
    train_step(model, batch, targets)
    after = snapshot(model)

    # only injected parameters and heads moved ...
    changed = changed_names(before, after)
    assert changed and all(injected(n) for n in changed), sorted(n for n in changed if not injected(n))[:5]
    if task_id != "lm":
        assert any(is_head(n) or "modules_to_save." in n for n in changed), "the task head did not train"
    # ... and every base tensor (packed quantized weights and their quant state included)
    # is bit-identical to a pristine load of the model, not only to the pre-step snapshot
    base = normalized({k: v for k, v in after.items() if not injected(k.split(":")[0])})
    pristine = bases.snapshots[(task_id, precision)]
    assert base.keys() <= pristine.keys(), sorted(base.keys() - pristine.keys())[:5]
    assert all(is_head(k) for k in pristine.keys() - base.keys()), sorted(pristine.keys() - base.keys())[:5]
    differing = [k for k in base if base[k].dtype != pristine[k].dtype or not torch.equal(base[k], pristine[k])]
    assert not differing, differing[:5]

    expected = main_output(model, batch)
    assert torch.isfinite(expected).all()
    peftkit.save_adapter(model, tmp_path / "adapter")

    target = bases.fresh(task_id, precision)
    bare = main_output(target, batch)
    loaded = peftkit.load_adapter(target, tmp_path / "adapter")
    assert not loaded.training
    got = main_output(loaded, batch)
    atol = ATOL[precision]
    assert got.shape == expected.shape
    assert max_diff(got, expected) <= atol, f"loaded adapter differs by {max_diff(got, expected):.3g}"
    # the comparison means something: the trained adapter changed the outputs well beyond atol
    assert max_diff(bare, expected) > 10 * atol, f"adapter changed outputs by only {max_diff(bare, expected):.3g}"


# ---------------------------------------------------------------------------- merge

@pytest.mark.parametrize("task_id,precision", [("lm", "fp32"), ("cls", "nf4")])
def test_lora_merge_matches_unmerged(bases, task_id, precision):
    batch, targets = batch_for(task_id, bases.tokenizer(TASKS[task_id][0]))
    model = attach(bases.copy(task_id, precision), "lora", precision)
    train_step(model, batch, targets)
    unmerged = main_output(model, batch)
    with model.disable_adapter():
        bare = main_output(model, batch)
    assert max_diff(unmerged, bare) > 1e-3, "the trained LoRA adapter does not change the outputs"

    merged = peftkit.merge(model)
    assert not isinstance(merged, PeftModel)
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    assert max_diff(main_output(merged, batch), unmerged) <= 1e-4


@pytest.mark.parametrize("task_id", ["cls", "lm"])
def test_merge_refuses_houlsby(bases, task_id):
    model = attach(bases.copy(task_id, "fp32"), "houlsby", "fp32")
    with pytest.raises(peftkit.PeftkitError, match=r"houlsby.*cannot fold into the base"):
        peftkit.merge(model)
    assert any(isinstance(m, BottleneckWrapper) for m in model.modules())  # left as it was


def test_prefix_on_quantized_base_trains_with_default_arguments(bases):
    """k-bit attach turns gradient checkpointing on unless told not to; prefix tuning cannot
    train under it (its prefix travels in the KV cache), so for prefix it stays off."""
    batch, targets = batch_for("cls", bases.tokenizer(MINILM))
    model = peftkit.attach(bases.copy("cls", "nf4"), "prefix")
    assert not getattr(model, "is_activation_checkpointing", False)
    prefix = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "prefix" in n}
    assert prefix
    train_step(model, batch, targets)
    assert any(not torch.equal(p, prefix[n]) for n, p in model.named_parameters() if n in prefix)


# ---------------------------------------------------------------------------- wrong base

def assert_untouched(model, snapshot_before):
    assert not isinstance(model, PeftModel)
    assert not getattr(model, "peftkit_adapters", {})
    assert not any(isinstance(m, BottleneckWrapper) for m in model.modules())
    assert not any(injected(n) and not is_head(n) for n, _ in model.named_parameters())
    assert not changed_names(snapshot_before, snapshot(model))


@pytest.mark.parametrize("method", ["lora", "houlsby"])
@pytest.mark.parametrize("source,target_kind", [(MINILM, "lm"), (SMOLLM, "cls")])
def test_adapter_refused_by_the_other_model(bases, tmp_path, method, source, target_kind):
    trained = bases.copy("cls", "fp32") if source == MINILM else \
        peftkit.load_model(SMOLLM, task="classification", num_labels=2)
    peftkit.save_adapter(attach(trained, method, "fp32"), tmp_path / "a")
    target = bases.fresh(target_kind, "fp32")
    before = snapshot(target)
    other = SMOLLM if source == MINILM else MINILM
    with pytest.raises(peftkit.PeftkitError, match=rf"trained on '{source}'.*given is '{other}'"):
        peftkit.load_adapter(target, tmp_path / "a")
    assert_untouched(target, before)
