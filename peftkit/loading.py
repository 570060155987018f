"""load_model / load_tokenizer: embedded short names, local folders or hub ids,
optionally on a 4-bit or 8-bit bitsandbytes base."""
import difflib
import logging
import os

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig

from .embedded import EMBEDDED_MODELS, model_name, resolve_model
from .errors import PeftkitError
from .presets import check_quantize

TASKS = {
    "causal-lm": transformers.AutoModelForCausalLM,
    "classification": transformers.AutoModelForSequenceClassification,
    "qa": transformers.AutoModelForQuestionAnswering,
    "base": transformers.AutoModel,
}
# Task heads are trained in full precision, never quantized.
HEADS = ["classifier", "score", "qa_outputs", "lm_head"]
TASK_HEADS = ("classifier", "score", "qa_outputs")  # new on a pretrained body: trained, or loaded from the adapter


def load_model(name_or_path: str, task: str = "causal-lm", quantize: str | None = None,
               dtype: torch.dtype | None = None, matmul_dtype: torch.dtype | None = None, **config_overrides):
    """A transformers model for `task` (causal-lm, classification, qa, base, or a
    transformers class name); `quantize` in nf4/fp4/4bit/8bit loads the linear
    layers through bitsandbytes, computing in `matmul_dtype` (default: see
    compute_dtype). Extra keywords (num_labels, id2label, ...) go to the model config."""
    model_cls = model_class(task)
    check_quantize(quantize)
    dtype = dtype or torch.float32
    kwargs = {"dtype": dtype, **config_overrides}
    if quantize:
        kwargs["quantization_config"] = bnb_config(quantize, matmul_dtype or compute_dtype(dtype))
        kwargs["device_map"] = {"": quantized_device()}
    model = _loaded_with_a_report_that_matters(model_cls, name_or_path, **kwargs)
    model.config.peftkit_base_name = model_name(name_or_path)
    keep_standard_4bit_layout(model)
    if quantize:
        release_checkpoint_file(model)
    return model


def _loaded_with_a_report_that_matters(model_cls, name_or_path: str, **kwargs):
    """The model, without transformers' load report on every load: a task head missing from the
    checkpoint is expected here (peftkit trains it, or loads it from the adapter right after), and
    unused checkpoint keys (a pooler a QA model drops) harm nothing. Missing body weights are a real
    problem, and get one line."""
    report = logging.getLogger("transformers.modeling_utils")
    mute = logging.Filter("no record passes")  # a filter named after no logger drops every record
    report.addFilter(mute)
    try:
        model, info = _from_pretrained(model_cls, name_or_path, output_loading_info=True, **kwargs)
    finally:
        report.removeFilter(mute)
    missing = [key for key in info.get("missing_keys", []) if key.split(".")[0] not in TASK_HEADS]
    if missing:
        logging.getLogger("peftkit").warning(
            f"peftkit: {name_or_path} lacks {len(missing)} weights of its body, initialized at random "
            f"({', '.join(sorted(missing)[:3])}{', ...' if len(missing) > 3 else ''}); is it the right checkpoint?")
    return model


def _from_pretrained(cls, name_or_path: str, **kwargs):
    """cls.from_pretrained, with a hub id that cannot be fetched (no network, a typo) said in one line."""
    try:
        return cls.from_pretrained(resolve_model(name_or_path), **kwargs)
    except OSError as err:
        raise PeftkitError(f"could not load {name_or_path!r}: it is no local folder or embedded model "
                           f"({', '.join(EMBEDDED_MODELS)}), and as a hub id: {str(err).splitlines()[0]}") from None


def check_config_overrides(name_or_path: str, overrides: dict) -> None:
    """Fail before any work when a recipe's model_config names a setting the model's config lacks
    or gives it a value of another kind: from_pretrained would keep a misspelt key as a new,
    unused attribute, and training would go on with the default."""
    if not overrides:
        return  # most recipes: no need to read the config here
    config = _from_pretrained(AutoConfig, name_or_path)
    settings = config.to_dict()
    for key, value in overrides.items():
        # num_labels and a few others are properties, absent from to_dict()
        if key not in settings and not isinstance(getattr(type(config), key, None), property):
            near = difflib.get_close_matches(key, settings, n=3)
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise PeftkitError(f"model_config.{key} is not a setting of {name_or_path}'s config "
                               f"({config.model_type}); {hint}its settings: {', '.join(sorted(settings))}")
        current = getattr(config, key)
        if (_is_number(current) and not _is_number(value)) or isinstance(current, bool) != isinstance(value, bool):
            raise PeftkitError(f"model_config.{key} must be a {type(current).__name__} like the config's own "
                               f"value {current!r}, got {value!r} ({type(value).__name__})")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def release_checkpoint_file(model) -> None:
    """Copy the tensors that stayed unquantized (embeddings, norms, heads) out of the checkpoint.

    transformers loads them as views into the memory-mapped safetensors file, and while any view
    lives the whole mapping stays, with every page read during quantization still resident: about
    300 MB for a 135M model, more than its 4-bit weights. Owning these few tensors lets the file go.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.__class__.__name__ not in ("Params4bit", "Int8Params"):
            tensor.data = tensor.data.clone()


def keep_standard_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference
    kernel. It does so on the first no-grad eval forward, in place, rounding the
    scales to bf16; backward through repacked weights is then wrong (we measured
    ~10% gradient error), and eval would no longer match training or a merge."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(name_or_path: str):
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path)
    if tokenizer.pad_token is None:  # decoder-only tokenizers often lack one; batching needs it
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What 4-bit layers de-quantize to for their matmuls: bf16 on a GPU that has it (QLoRA's
    setting; the Trainer then runs in bf16 autocast too), otherwise the model's dtype."""
    if dtype == torch.float32 and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return dtype


def quantized_device() -> int | str:
    """Where a 4/8-bit base is loaded: bitsandbytes quantizes it on the device it lands on, and it
    cannot move afterwards. Under torchrun or `accelerate launch` each process trains on GPU
    LOCAL_RANK (accelerate refuses a quantized model on any other), not all of them on GPU 0."""
    if not torch.cuda.is_available():
        return "cpu"
    return int(os.environ.get("LOCAL_RANK", 0))


def bnb_config(quantize: str, matmul_dtype: torch.dtype) -> BitsAndBytesConfig:
    """`matmul_dtype`: what 4-bit layers compute in (see compute_dtype)."""
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEADS)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4" if quantize == "fp4" else "nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=matmul_dtype,
        bnb_4bit_quant_storage=matmul_dtype if sharded_training() else torch.uint8,
        llm_int8_skip_modules=HEADS,
    )


def sharded_training() -> bool:
    """Whether `accelerate launch` started this process for FSDP or DeepSpeed (recipes/launch/).

    Their 4-bit weights are stored as tensors of the compute dtype rather than uint8: the same
    bytes, which accelerate's FSDP needs in order to shard them (it leaves uint8 ones whole on every
    GPU), and which survive FSDP's and DeepSpeed's bf16 mixed precision, both of which cast every
    float parameter to the compute dtype (a no-op only if it already is that dtype; bytes typed
    fp32 and cast to bf16 no longer hold the weights). Elsewhere they stay uint8: outputs, gradients and merges are
    bit-identical either way (tests/test_scaleout.py), but read as floats the bytes include NaNs,
    which would trip any code that compares or checks weights as floats."""
    return any(os.environ.get(flag, "false").lower() == "true"
               for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))  # what accelerate reads too


def model_class(task: str):
    """The transformers class for a task name (an Auto class) or a transformers class name."""
    if task in TASKS:
        return TASKS[task]
    cls = getattr(transformers, task, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise PeftkitError(f"unknown task {task!r}; tasks: {', '.join(TASKS)} or a transformers model class name")
    return cls
