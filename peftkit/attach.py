"""attach(): freeze a transformers model and inject one adapter method.

A peft-native method (LoRA) returns peft's PeftModel, so peft's tooling and file
format apply; the methods peft lacks are injected by their tuner into the model
itself (see peftkit.methods). Either way the model carries `peftkit_adapters`
({name: AdapterInfo}) describing what it holds.
"""
import logging

from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

from .anatomy import AdapterInfo, adapters_of, base_fingerprint, base_model, base_name, is_quantized, task_heads, \
    task_of
from .errors import PeftkitError
from .loading import keep_standard_4bit_layout
from .methods import METHODS, activate
from .presets import resolve_spec


def attach(model, spec, name: str | None = None, gradient_checkpointing: bool | None = None):
    """Freeze `model` and add adapter `name` built from `spec` (preset name, YAML path or dict).

    Task heads (classifier, score, qa_outputs) stay trainable and are saved with
    the adapter. On a 4/8-bit base the model is prepared for k-bit training
    (norms and heads in fp32; gradient checkpointing unless turned off).
    """
    spec = resolve_spec(spec)
    about = spec.about
    if spec.quantize and not is_quantized(model):
        raise PeftkitError(
            f"this preset trains on a {spec.quantize} base but the model is not quantized; "
            f"load it with peftkit.load_model(name, quantize={spec.quantize!r})"
        )
    if not about.quantized_base and is_quantized(model):
        raise PeftkitError(f"{about.long_name} does not work on a 4/8-bit base; load the base without quantize")
    existing = adapters_of(model)
    if existing and name is None:
        raise PeftkitError(
            f"the model already holds adapter(s) {sorted(existing)}; pass name=... to add another"
        )
    name = name or "default"
    if name in existing:
        raise PeftkitError(f"the model already holds an adapter named {name!r}; pick another name")
    if existing and about.peft_native != isinstance(model, PeftModel):
        native = sorted(m.name for m in METHODS.values() if m.peft_native)
        own = sorted(m.name for m in METHODS.values() if not m.peft_native)
        raise PeftkitError(f"one model holds either peft's methods ({', '.join(native)}) or peftkit's own "
                           f"methods ({', '.join(own)}), not both")

    others = sorted({info.method for info in existing.values()} - {spec.method})
    if about.peft_native and others:  # one PeftModel holds one peft type (peft's own rule)
        raise PeftkitError(f"the model holds {', '.join(others)} adapter(s); peft keeps one method per model, "
                           f"so {spec.method} goes on a fresh base")
    base = base_model(model)
    heads = task_heads(base)
    config = about.config(spec.options, base, heads)
    info = AdapterInfo(spec.method, about.recorded(spec.options, config), base_name(base),
                       base_fingerprint(model, heads), task_of(base))
    gradient_checkpointing = _checkpointing(about, gradient_checkpointing, is_quantized(base))
    if not existing:
        _freeze(base, gradient_checkpointing)
    if about.peft_native:
        if isinstance(model, PeftModel):
            model.add_adapter(name, config)
            model.set_adapter(name)
        else:
            model = get_peft_model(model, config, adapter_name=name)
    else:
        about.tuner.inject(model, config, name)
        activate(model, name, {n: i.method for n, i in {**existing, name: info}.items()})
        for head in heads:
            base.get_submodule(head).requires_grad_(True)
    model.peftkit_adapters = {**existing, name: info}
    return model


def check_spec(spec) -> None:
    """Refuse a spec attach() would refuse for its method or options, without a model (a sweep
    checks every trial before the first one trains)."""
    spec = resolve_spec(spec)
    spec.about.check_options(spec.options)


def _checkpointing(about, asked: bool | None, quantized: bool) -> bool | None:
    """Gradient checkpointing as asked, refused for a method that cannot train with it."""
    if about.gradient_checkpointing:
        return asked
    if asked:
        raise PeftkitError(f"{about.long_name} does not work with gradient checkpointing ({about.why_no_checkpointing}); "
                           "pass gradient_checkpointing=False")
    if asked is None and quantized:  # k-bit bases checkpoint by default, which this method cannot train with
        logging.getLogger("peftkit").warning(f"peftkit: {about.long_name} on a quantized base trains without "
                                             f"gradient checkpointing ({about.why_no_checkpointing})")
    return False


def _freeze(model, gradient_checkpointing: bool | None) -> None:
    model.requires_grad_(False)
    if is_quantized(model):
        keep_standard_4bit_layout(model)
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing is not False,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
