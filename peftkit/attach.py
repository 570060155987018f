"""attach(): freeze a transformers model and inject one adapter method.

LoRA returns peft's PeftModel (so peft's tooling and file format apply); the
methods peft lacks are injected into the model itself. Either way the model
carries `peftkit_adapters` ({name: AdapterInfo}) describing what it holds.
"""
import importlib
import logging
from dataclasses import dataclass, field

from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

from .errors import PeftkitError
from .fingerprint import fingerprint
from .loading import keep_standard_4bit_layout
from .presets import resolve_spec
from .tuners.lora import check_options, lora_config

BOTTLENECK = ("houlsby", "pfeiffer", "parallel")


@dataclass
class AdapterInfo:
    method: str
    options: dict
    base_name: str
    base_fingerprint: dict
    task: dict = field(default_factory=dict)


def attach(model, spec, name: str | None = None, gradient_checkpointing: bool | None = None):
    """Freeze `model` and add adapter `name` built from `spec` (preset name, YAML path or dict).

    Task heads (classifier, score, qa_outputs) stay trainable and are saved with
    the adapter. On a 4/8-bit base the model is prepared for k-bit training
    (norms and heads in fp32; gradient checkpointing unless turned off).
    """
    method, options, quantize = resolve_spec(spec)
    if quantize and not is_quantized(model):
        raise PeftkitError(
            f"this preset trains on a {quantize} base but the model is not quantized; "
            f"load it with peftkit.load_model(name, quantize={quantize!r})"
        )
    existing = adapters_of(model)
    if existing and name is None:
        raise PeftkitError(
            f"the model already holds adapter(s) {sorted(existing)}; pass name=... to add another"
        )
    name = name or "default"
    if name in existing:
        raise PeftkitError(f"the model already holds an adapter named {name!r}; pick another name")
    if existing and (method == "lora") != isinstance(model, PeftModel):
        raise PeftkitError("one model holds either LoRA adapters or peftkit's own methods, not both")

    base = base_model(model)
    heads = task_heads(base)
    info = AdapterInfo(method, options, base_name(base), base_fingerprint(model, heads), task_of(base))
    config = lora_config(base, options, heads) if method == "lora" else None
    if method != "lora":
        config = tuner(method).Config.from_options(_tuner_options(method, options))

    if method == "prefix" and gradient_checkpointing:
        raise PeftkitError("prefix tuning does not work with gradient checkpointing (the prefix travels in the "
                           "KV cache, which checkpointed layers drop); pass gradient_checkpointing=False")
    if method == "prefix" and gradient_checkpointing is None and is_quantized(base):
        gradient_checkpointing = False  # the default for 4/8-bit bases, which the prefix cannot train with
        logging.getLogger("peftkit").warning("peftkit: prefix tuning on a quantized base trains without "
                                             "gradient checkpointing (the prefix travels in the KV cache)")
    if not existing:
        _freeze(base, gradient_checkpointing)
    if method == "lora":
        if isinstance(model, PeftModel):
            model.add_adapter(name, config)
            model.set_adapter(name)
        else:
            model = get_peft_model(model, config, adapter_name=name)
    else:
        tuner(method).inject(model, config, name)
        tuner(method).set_active(model, name)
        for head in heads:
            base.get_submodule(head).requires_grad_(True)
    model.peftkit_adapters = {**existing, name: info}
    return model


def check_spec(spec) -> None:
    """Refuse a spec attach() would refuse for its method or options, without a model (a sweep
    checks every trial before the first one trains)."""
    method, options, _ = resolve_spec(spec)
    if method == "lora":
        check_options(options)
    else:
        tuner(method).Config.from_options(_tuner_options(method, options))


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


def tuner(method: str):
    package = "bottleneck" if method in BOTTLENECK else method
    return importlib.import_module(f"peftkit.tuners.{package}")


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


def _tuner_options(method: str, options: dict) -> dict:
    return {"method": method, **options} if method in BOTTLENECK else options


def _freeze(model, gradient_checkpointing: bool | None) -> None:
    model.requires_grad_(False)
    if is_quantized(model):
        keep_standard_4bit_layout(model)
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing is not False,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
