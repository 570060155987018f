"""What a model is made of, as attach, saving, merge and the bank need to know it: the
transformers model under peft's wrapper, its task heads, whether its base is 4/8-bit, and
the adapters it holds (`peftkit_adapters`, {name: AdapterInfo})."""
from dataclasses import dataclass, field

from peft import PeftModel

from .errors import PeftkitError
from .fingerprint import fingerprint


# A model's task from the end of its transformers class name, with peft's TaskType for it: the one
# table behind LoRA's task_type and the tasks the bank serves.
MODEL_TASKS = {"ForCausalLM": ("causal-lm", "CAUSAL_LM"), "LMHeadModel": ("causal-lm", "CAUSAL_LM"),
               "ForSequenceClassification": ("classification", "SEQ_CLS"),
               "ForQuestionAnswering": ("qa", "QUESTION_ANS"),
               "ForTokenClassification": ("token-classification", "TOKEN_CLS")}


def model_task(class_name: str) -> tuple[str, str] | None:
    """(peftkit task, peft TaskType name) of a transformers model class, or None for a bare body."""
    return next((task for suffix, task in MODEL_TASKS.items() if class_name.endswith(suffix)), None)


@dataclass
class AdapterInfo:
    method: str
    options: dict
    base_name: str
    base_fingerprint: dict
    task: dict = field(default_factory=dict)


def pick_adapter(model, name: str | None = None):
    """(name, AdapterInfo) of adapter `name`, or of the model's only adapter."""
    adapters = adapters_of(model)
    if not adapters:
        raise PeftkitError("the model holds no peftkit adapter; call peftkit.attach or load_adapter first")
    if name is None:
        if len(adapters) > 1:
            raise PeftkitError(f"the model holds several adapters {sorted(adapters)}; pass name=")
        name = next(iter(adapters))
    if name not in adapters:
        raise PeftkitError(f"no adapter named {name!r}; the model holds {sorted(adapters)}")
    return name, adapters[name]


def adapters_of(model) -> dict:
    return dict(getattr(model, "peftkit_adapters", {}))


def base_model(model):
    """The transformers model under any peft wrapper."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_quantized(model) -> bool:
    base = base_model(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def task_heads(model) -> list[str]:
    """Top-level modules a task adds on top of the pretrained body: a classifier,
    a span head, a score head. The LM head is pretrained, not a task head."""
    if model.base_model is model:  # a bare body (BertModel, LlamaModel): no task head on top
        return []
    body = getattr(model, model.base_model_prefix, None)
    lm_head = model.get_output_embeddings()
    return [name for name, child in model.named_children()
            if child is not body and child is not lm_head and not name.startswith("_peftkit")
            and any(True for _ in child.parameters())]


def base_name(model) -> str:
    return getattr(model.config, "peftkit_base_name", None) or model.config._name_or_path or type(model).__name__


def base_fingerprint(model, heads=None) -> dict:
    """The fingerprint recorded when the first adapter went in (later the
    model holds adapters and its own modules no longer show the bare base)."""
    existing = adapters_of(model)
    if existing:
        return next(iter(existing.values())).base_fingerprint
    base = base_model(model)
    return fingerprint(base, task_heads(base) if heads is None else heads)


def task_of(model) -> dict:
    task = {"class": type(model).__name__}
    if task["class"].endswith("ForSequenceClassification"):
        task["num_labels"] = model.config.num_labels
        task["id2label"] = {str(k): v for k, v in model.config.id2label.items()}
    return task


def head_weights(state: dict, heads, key=lambda k: k) -> dict:
    """The entries of an adapter's state dict that belong to the task heads `heads` (by the first
    part of `key(name)`: the names in peft files carry a prefix first)."""
    return {k: v for k, v in state.items() if key(k).split(".")[0] in heads}
