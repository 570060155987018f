"""`peftkit bench params`: what each method trains on a model, from its config alone.

    param_table("llama-2-70b")                      -> one dict per method
    param_table("minilm-l6", ["lora", "prefix"], task="classification")
    peftkit bench params --model llama-2-70b --method lora --method dora --format csv

The model is built from its config on the meta device (shapes, no storage), so a
70B configuration costs no memory and all five methods answer in about a second
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
`peftkit --help` stays quick.
"""
import argparse
import copy
import csv
import io
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

from .errors import PeftkitError
from .shipped import shipped

CONFIGS_DIR = shipped("benchmarks") / "configs"
FORMATS = ("table", "csv", "json", "markdown")
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
COLUMNS = ("model", "model_type", "model_class", "task", "base_params", "method", "setting", "trainable",
           "total", "ratio", "fp32_bytes", "bf16_bytes", "tensors", "seconds")
# safetensors orders a file's tensors by dtype (this order) and then by name; that
# order fixes the offsets written into the header, and so the header's length.
_ST_DTYPE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                   "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")


# ---------------------------------------------------------------------------- public API

def param_table(model_spec, methods=None, task: str | None = None) -> list[dict]:
    """One row per method: trainable, total and ratio as param_report gives them after
    attach, and the exact size of the adapter file in fp32 and bf16.

    `model_spec`: a JSON config file, a folder with config.json, an embedded name or a
    shipped config name. `methods`: method names, preset names or preset YAML paths
    (default: lora, houlsby, pfeiffer, parallel, prefix). `task`: causal-lm,
    classification, qa, base or a transformers class name; default causal-lm for
    decoders, classification for encoders.
    """
    from .methods import METHODS
    from .presets import resolve_spec

    methods = [methods] if isinstance(methods, str) else list(METHODS if methods is None else methods)
    if not methods:
        raise PeftkitError("no method given; methods: " + ", ".join(METHODS))
    specs = [(label, resolve_spec(label)) for label in methods]  # unknown names fail before any model is built
    config, display = load_config(model_spec)
    task = task or default_task(config)
    model_cls = _model_class(task)

    rows = []
    for label, spec in specs:
        start = time.perf_counter()
        model = meta_model(config, model_cls)
        base_params = _count(model)[1]
        model = _attach_meta(model, spec, label, display)
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

    from .embedded import EMBEDDED_MODELS, resolve_model

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
    from .saving import saved_state

    return {key: (tuple(t.shape), _st_dtype(t.dtype)) for key, t in saved_state(model, name).items()}


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


# ---------------------------------------------------------------------------- CLI

def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench params ...` and `bench train ...` to the peftkit command's subparsers."""
    from . import bench_train

    bench = subparsers.add_parser("bench", help="benchmarks: parameter counts per method; training side by side")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    p = kinds.add_parser(
        "params", help="trainable/total parameters and adapter file size per method, from a config alone",
        description="Per method: trainable parameters, total parameters, trainable ratio and the adapter's "
                    "safetensors file size in fp32 and bf16. The model is built on the meta device, so any "
                    "size costs no memory.")
    p.add_argument("--model", action="append", default=[], metavar="NAME_OR_CONFIG",
                   help="a JSON config file, a folder with config.json, an embedded model (minilm-l6, "
                        "smollm2-135m) or a shipped config (benchmarks/configs/*.json); repeatable")
    p.add_argument("--shipped", action="store_true", help="every config in benchmarks/configs/")
    p.add_argument("--method", action="append", default=None, metavar="METHOD|PRESET|YAML",
                   help="repeatable; default: every method")
    p.add_argument("--task", default=None,
                   help="causal-lm, classification, qa, base or a transformers class name "
                        "(default: causal-lm for decoders, classification for encoders)")
    p.add_argument("--format", default="table", choices=FORMATS)
    bench_train.add_parser(kinds)
    return bench


def run_bench(args) -> int:
    if args.bench_command == "train":
        from . import bench_train
        return bench_train.run_command(args)
    models = list(args.model) + (shipped_configs() if args.shipped else [])
    if not models:
        raise PeftkitError("give --model NAME_OR_CONFIG (repeatable) or --shipped; shipped configs: "
                           + ", ".join(shipped_configs()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from transformers/peft about meta models
        tables = [param_table(m, args.method, args.task) for m in models]
    print(format_rows(tables, args.format, _command_line(args)), end="")
    return 0


def format_rows(tables: list[list[dict]], fmt: str, command: str = "") -> str:
    """Render one param_table() result per model as table, csv, json or markdown."""
    rows = [row for table in tables for row in table]
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    if fmt == "markdown":
        return _markdown(tables, command)
    if fmt != "table":
        raise PeftkitError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    return "\n".join(_heading(t[0]) + "\n" + _aligned(_cells(t)) + "\n" for t in tables if t)


def main(argv=None) -> int:
    """`python -m peftkit.bench params ...`, the same command before it is wired into `peftkit`."""
    parser = argparse.ArgumentParser(prog="peftkit")  # usage then reads as the wired command
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_bench(args)
    except PeftkitError as err:
        print(f"peftkit: error: {err}", file=sys.stderr)
        return 2


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

    from .attach import attach

    try:
        with torch.device("meta"):  # adapters are born on the meta device too: no memory even for 70B
            return attach(model, {"method": spec.method, **spec.options})
    except PeftkitError as err:
        raise PeftkitError(f"cannot attach {label!r} to {display} ({model.config.model_type}, "
                           f"{type(model).__name__}): {err}") from None


def _count(model) -> tuple[int, int]:
    from .report import param_report

    report = param_report(model)
    return report["trainable"], report["total"]


def _heading(row: dict) -> str:
    published = PUBLISHED.get(row["model"])
    note = f" (published checkpoint: {published[1]})" if published else ""
    return (f"{row['model']}: {row['model_class']} ({row['model_type']}, task {row['task']}), "
            f"{row['base_params']:,} parameters{note}")


def _cells(table: list[dict]) -> list[list[str]]:
    lines = [["method", "setting", "trainable", "total", "trainable %", "fp32 file", "bf16 file"]]
    for r in table:
        lines.append([r["method"], r["setting"], f"{r['trainable']:,}", f"{r['total']:,}",
                      f"{100 * r['ratio']:.4f}%", human_size(r["fp32_bytes"]), human_size(r["bf16_bytes"])])
    return lines


def _aligned(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    left = {0, 1}  # text columns; numbers align right
    return "\n".join("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     .rstrip() for row in cells)


def _markdown(tables: list[list[dict]], command: str) -> str:
    tables = [t for t in tables if t]
    module = command.replace("peftkit bench ", ".venv/bin/python -m peftkit.bench ", 1)
    out = ["# Trainable parameters and adapter sizes per method", "",
           "Generated by `peftkit bench params` (peftkit/bench.py); regenerate with", "",
           "```bash", f"{command} > benchmarks/results/params.md",
           f"# or, equivalently: {module} > benchmarks/results/params.md", "```", "",
           "Every model is built from its config (benchmarks/configs/) on the meta device; each method is "
           "attached with `peftkit.attach` using the shipped preset of that name (adapters/*.yaml: LoRA r=8 on "
           "the default targets, bottleneck adapters with reduction factor 16, prefix tuning with 20 virtual "
           "tokens and the reparameterization MLP) and counted with `peftkit.param_report`. *total* includes "
           "the adapter. File sizes are the exact size of `adapter_model.safetensors` (header included) with "
           "the adapter stored in fp32 or bf16. Encoders are counted for sequence classification (2 labels): "
           "their classifier head trains and is saved with the adapter; decoders as causal LMs (the LM head "
           "stays frozen).", "",
           "Base parameters per model: *checkpoint* counts the published architecture (the bare encoder with "
           "its pooler for BERT/RoBERTa, the causal LM for decoders), *counted as* the model the table below "
           "attaches to.", "",
           "| model | checkpoint class | checkpoint parameters | published | counted as | parameters |",
           "| --- | --- | ---: | ---: | --- | ---: |"]
    for table in tables:
        row = table[0]
        published = PUBLISHED.get(row["model"], ("", ""))[1]
        name, count = _checkpoint_params(row["model"])
        out.append(f"| {_md_title(row)} | `{name}` | {count:,} | {published} | `{row['model_class']}` "
                   f"| {row['base_params']:,} |")
    out.append("")
    for table in tables:
        out += [f"## {_md_title(table[0])}", "", _md_summary(table[0]), ""]
        cells = _cells(table)
        out.append("| " + " | ".join(cells[0]) + " |")
        out.append("|" + "|".join([" --- ", " --- "] + [" ---: "] * (len(cells[0]) - 2)) + "|")
        out += ["| " + " | ".join(row) + " |" for row in cells[1:]]
        out.append("")
    return "\n".join(out)


def _checkpoint_params(model_spec) -> tuple[str, int]:
    """(class, parameters) of the architecture a published checkpoint holds: AutoModelForCausalLM
    for decoders, AutoModel (encoder + pooler) otherwise."""
    from transformers import AutoModel

    config, _ = load_config(model_spec)
    model = meta_model(config, _model_class("causal-lm") if default_task(config) == "causal-lm" else AutoModel)
    return type(model).__name__, _count(model)[1]


def _md_title(row: dict) -> str:
    published = PUBLISHED.get(row["model"])
    return f"{published[0]} (`{row['model']}`)" if published else f"`{row['model']}`"


def _md_summary(row: dict) -> str:
    published = PUBLISHED.get(row["model"])
    note = f" (published checkpoint: {published[1]})" if published else ""
    return (f"`{row['model_class']}` (model_type `{row['model_type']}`, task `{row['task']}`): "
            f"**{row['base_params']:,}** parameters{note}.")


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _command_line(args) -> str:
    parts = ["peftkit", "bench", "params"]
    parts += [x for m in args.model for x in ("--model", m)]
    parts += ["--shipped"] if args.shipped else []
    parts += [x for m in (args.method or []) for x in ("--method", m)]
    parts += ["--task", args.task] if args.task else []
    parts += ["--format", args.format]
    return shlex.join(parts)


if __name__ == "__main__":
    sys.exit(main())


def _model_class(task: str):
    from .loading import model_class  # imports transformers: not before a command needs it

    return model_class(task)
