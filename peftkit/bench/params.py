"""`peftkit bench params`: what each method trains on a model, from its config alone.

    param_table("llama-2-70b")                      -> one dict per method
    param_table("minilm-l6", ["lora", "prefix"], task="classification")
    peftkit bench params --model llama-2-70b --method lora --method dora --format csv

The model is built from its config on the meta device (shapes, no storage), so a
70B configuration costs no memory and every method answers in about a second
(after the imports). Each method is attached with peftkit.attach to a fresh meta
model and counted with peftkit.param_report, so the counts are the ones a real
`attach` gives. Decoders are counted as causal LMs, encoders for sequence
classification (their head trains and is saved with the adapter); --task picks another.

The adapter file sizes are exact: the names and shapes are those save_adapter
would write (peft's state dict for LoRA, the tuner's state dict plus task heads
for the others), and the safetensors header is computed byte for byte the way
safetensors writes it (8-byte length, compact JSON of names, dtypes, shapes and
offsets, padded with spaces to a multiple of 8).

A model is a JSON config file, a folder holding config.json, an embedded short
name (minilm-l6, smollm2-135m) or the name of a config shipped in
benchmarks/configs/ (bert-base-uncased, roberta-large, gpt2, llama-2-7b,
llama-3-8b, mistral-7b, llama-2-70b).

Heavy imports (torch, transformers, peft) happen inside the functions, so that
`peftkit --help` stays quick. The formats (table, csv, json, markdown) are in
params_report.py; the command line in __init__.py.
"""
import copy
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import PeftkitError
from ..shipped import shipped

CONFIGS_DIR = shipped("benchmarks") / "configs"
# Published parameter counts of the shipped configs (base model, as counted by
# its model card / paper), shown next to ours in the markdown report.
PUBLISHED = {
    "bert-base-uncased": ("BERT-base (uncased)", "110M"),
    "roberta-large": ("RoBERTa-large", "355M"),
    "gpt2": ("GPT-2 (small)", "124M"),
    "llama-2-7b": ("Llama-2-7B", "6.74B"),
    "llama-3-8b": ("Llama-3-8B", "8.03B"),
    "mistral-7b": ("Mistral-7B-v0.1", "7.24B"),
    "llama-2-70b": ("Llama-2-70B", "69B (68.98B)"),
}
# safetensors orders a file's tensors by dtype (this order) and then by name; that
# order fixes the offsets written into the header, and so the header's length.
_ST_DTYPE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                   "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")


def param_table(model_spec, methods=None, task: str | None = None) -> list[dict]:
    """One row per method: trainable, total and ratio as param_report gives them after
    attach, and the exact size of the adapter file in fp32 and bf16.

    `model_spec`: a JSON config file, a folder with config.json, an embedded name or a
    shipped config name. `methods`: method names, preset names or preset YAML paths
    (default: every registered method, peftkit.methods, leaving out with a note on
    stderr the ones that cannot attach to this model). `task`: causal-lm,
    classification, qa, base or a transformers class name; default causal-lm for
    decoders, classification for encoders.
    """
    from ..loading import model_class  # imports transformers: not before a command needs it
    from ..methods import METHODS
    from ..presets import resolve_spec

    every = methods is None
    methods = [methods] if isinstance(methods, str) else list(METHODS if every else methods)
    if not methods:
        raise PeftkitError("no method given; methods: " + ", ".join(METHODS))
    specs = [(label, resolve_spec(label)) for label in methods]  # unknown names fail before any model is built
    config, display = load_config(model_spec)
    task = task or default_task(config)
    model_cls = model_class(task)

    rows = []
    for label, spec in specs:
        start = time.perf_counter()
        model = meta_model(config, model_cls)
        base_params = _count(model)[1]
        try:
            model = _attach_meta(model, spec, label, display)
        except PeftkitError as err:
            if not every:
                raise
            print(f"peftkit: note: {label} left out: {err}", file=sys.stderr)
            continue
        trainable, total = _count(model)
        shapes = saved_tensors(model)
        setting = spec.about.tuner.describe(model)
        if spec.quantize:  # counts on a 4/8-bit base are the same; the base's file is smaller, not the adapter's
            setting += f"; base {spec.quantize}"
        rows.append({
            "model": display,
            "model_type": config.model_type,
            "model_class": type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__,
            "task": task,
            "base_params": base_params,
            "method": label,
            "setting": setting,
            "trainable": trainable,
            "total": total,
            "ratio": trainable / total if total else 0.0,
            "fp32_bytes": safetensors_size(shapes, "F32"),
            "bf16_bytes": safetensors_size(shapes, "BF16"),
            "tensors": len(shapes),
            "seconds": round(time.perf_counter() - start, 3),
        })
    return rows


def load_config(model_spec) -> tuple:
    """(transformers config, display name) for a JSON file, folder, embedded or shipped name."""
    from transformers import AutoConfig

    from ..embedded import EMBEDDED_MODELS, resolve_model

    spec = str(model_spec)
    path = Path(spec).expanduser()
    if path.is_file() or spec.endswith(".json"):
        if not path.is_file():
            raise PeftkitError(f"config file {spec} does not exist; shipped configs: {', '.join(shipped_configs())}")
        return _config_from_json(path), spec
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PeftkitError(f"folder {spec} has no config.json")
        config = _checked(lambda: AutoConfig.from_pretrained(str(path)), spec)
        config.peftkit_base_name = spec
        return config, spec
    if spec in EMBEDDED_MODELS:
        config = _checked(lambda: AutoConfig.from_pretrained(resolve_model(spec)), spec)
        config.peftkit_base_name = spec
        return config, spec
    if spec in shipped_configs():
        return _config_from_json(CONFIGS_DIR / f"{spec}.json"), spec
    raise PeftkitError(
        f"model {spec!r} is not a JSON config file, a folder with config.json, an embedded model "
        f"({', '.join(EMBEDDED_MODELS)}) or a shipped config ({', '.join(shipped_configs())})"
    )


def shipped_configs() -> list[str]:
    """Names of the configs in benchmarks/configs/, smallest first (unknown ones last, by name)."""
    order = list(PUBLISHED)
    return sorted((p.stem for p in CONFIGS_DIR.glob("*.json")),
                  key=lambda n: (order.index(n) if n in order else len(order), n))


def default_task(config) -> str:
    """causal-lm for decoder-only models; classification (2 labels) for encoders, which
    is how encoders are fine-tuned: the classifier head trains and is saved with the adapter."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = config.model_type
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal-lm"
    return "classification"


def meta_model(config, model_cls):
    """`model_cls` built from `config` with every parameter and buffer on the meta device."""
    import torch

    config = copy.deepcopy(config)
    try:
        with torch.device("meta"):
            if hasattr(model_cls, "from_config"):  # the Auto classes
                return model_cls.from_config(config)
            return model_cls._from_config(config)  # a concrete class such as LlamaForCausalLM
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PeftkitError(f"unsupported architecture: cannot build {getattr(model_cls, '__name__', model_cls)} "
                           f"for model_type {config.model_type!r} ({err})") from None


def saved_tensors(model, name: str | None = None) -> dict[str, tuple]:
    """{key: (shape, safetensors dtype)} of what save_adapter writes for adapter `name`."""
    from ..saving import saved_state

    with _prompt_as_stored(model):
        state = saved_state(model, name)
    return {key: (tuple(t.shape), _st_dtype(t.dtype)) for key, t in state.items()}


@contextmanager
def _prompt_as_stored(model):
    """peft saves a training prompt-learning adapter's prompt by running its encoder and copying the output
    to the CPU, which a meta model has no values for; in inference mode it saves the prompt table itself,
    of the same shape and dtype."""
    training = [c for c in getattr(model, "peft_config", {}).values()
                if c.is_prompt_learning and not c.inference_mode]
    for config in training:
        config.inference_mode = True
    try:
        yield
    finally:
        for config in training:
            config.inference_mode = False


def safetensors_size(tensors: dict[str, tuple], float_dtype: str | None = None,
                     metadata: dict | None = None) -> int:
    """Exact size in bytes of the safetensors file holding `tensors` ({name: (shape, dtype)}),
    with floating tensors stored as `float_dtype` (F32, BF16, ...) when given.
    `metadata` defaults to {"format": "pt"}, what peft and peftkit write."""
    metadata = {"format": "pt"} if metadata is None else metadata
    entries = []
    for key, (shape, dtype) in tensors.items():
        if float_dtype and (dtype.startswith("F") or dtype == "BF16"):
            dtype = float_dtype
        entries.append((key, tuple(shape), dtype))
    rank = {d: i for i, d in enumerate(_ST_DTYPE_ORDER)}
    entries.sort(key=lambda e: (rank.get(e[2], len(rank)), e[0].encode()))
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for key, shape, dtype in entries:
        n = _ST_BYTES[dtype]
        for dim in shape:
            n *= dim
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + text + (-text % 8) + offset


def checkpoint_params(model_spec) -> tuple[str, int]:
    """(class, parameters) of the architecture a published checkpoint holds: AutoModelForCausalLM
    for decoders, AutoModel (encoder + pooler) otherwise."""
    from transformers import AutoModel

    from ..loading import model_class

    config, _ = load_config(model_spec)
    model = meta_model(config, model_class("causal-lm") if default_task(config) == "causal-lm" else AutoModel)
    return type(model).__name__, _count(model)[1]


# ---------------------------------------------------------------------------- internals

_ST_BYTES = {"U64": 8, "I64": 8, "F64": 8, "F32": 4, "U32": 4, "I32": 4, "BF16": 2, "F16": 2, "U16": 2, "I16": 2,
             "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def _st_dtype(dtype) -> str:
    names = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16",
             "uint32": "U32", "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
    key = str(dtype).removeprefix("torch.")
    if key not in names:
        raise PeftkitError(f"cannot size a safetensors file holding {dtype} tensors")
    return names[key]


def _config_from_json(path: Path):
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PeftkitError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise PeftkitError(f"{path} is not a transformers config: it needs a \"model_type\" key")
    # a hub id here would make peft look the model up online when it sizes the saved state
    data.pop("_name_or_path", None)
    model_type = data.pop("model_type")
    config = _checked(lambda: AutoConfig.for_model(model_type, **data), str(path))
    config.peftkit_base_name = path.stem
    return config


def _checked(load, what: str):
    try:
        return load()
    except (ValueError, KeyError) as err:
        raise PeftkitError(f"unsupported architecture in {what}: {err}") from None
    except OSError as err:
        raise PeftkitError(f"cannot read the config of {what}: {err}") from None


def _attach_meta(model, spec, label, display):
    import torch

    from ..attach import attach

    try:
        with torch.device("meta"):  # adapters are born on the meta device too: no memory even for 70B
            # a rank schedule's length (AdaLoRA's total_step) is the training run's; no count depends on it
            return attach(model, {"method": spec.method, **spec.about.for_run(spec.options, 1)})
    except PeftkitError as err:
        raise PeftkitError(f"cannot attach {label!r} to {display} ({model.config.model_type}, "
                           f"{type(model).__name__}): {err}") from None
    except RuntimeError as err:
        if "meta" not in str(err):
            raise
        raise PeftkitError(f"cannot count {label!r} from a config: peft computes values as it builds its layers "
                           f"({err}), which the meta device has none of; attach it to a real model and "
                           "count with peftkit.param_report") from None


def _count(model) -> tuple[int, int]:
    from ..report import param_report

    report = param_report(model)
    return report["trainable"], report["total"]
