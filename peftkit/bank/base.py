"""The bank's holder: the resident base model, its tokenizer, the task it serves, its fingerprint,
the lock, and the adapters loaded on it.

    Holder(base, task=None, quantize=None, tokenizer=None, batch_size=16)
    Holder.from_adapters(base, {name: folder}, task=None, quantize=None, **kwargs)
    .load(name, folder) -> dict     .unload(name)     .adapters()     .describe(name)     name in bank
    Entry                           one loaded adapter
    task_of_class(class_name)       the task a transformers model class serves
    adapter_task(folder)            (task, model class or None) an adapter folder was trained for

Mixed into AdapterBank, whose row selection (rows.py) gives `_select`: load clears the selection
that injecting an adapter turns on.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from torch import nn

from ..anatomy import MODEL_TASKS, base_name, head_weights, model_task, task_heads
from ..errors import PeftkitError
from ..fingerprint import check_same_base, fingerprint
from ..loading import load_model, load_tokenizer
from ..methods import METHODS, method
from ..saving import WEIGHTS, adapter_info, inject_saved, read_adapter_config, read_weights
from ..turns import Turns
from .heads import HeadSwitch, head_like
from .lora import LoraHooks, strip
from .rows import lead

SERVED = ("causal-lm", "classification", "qa")  # the tasks the bank has front-ends for
PEFT_TASKS = {peft: task for task, peft in MODEL_TASKS.values() if task in SERVED}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
DEFAULTS = {"max_new_tokens": 32, "cls_max_length": 512, "qa_max_length": 384, "doc_stride": 128}


@dataclass
class Entry:
    """One loaded adapter."""
    name: str
    method: str
    task: str  # causal-lm | classification | qa
    path: Path
    file_bytes: int  # of adapter_model.safetensors
    memory_bytes: int  # of the tensors the bank holds for it
    labels: list[str] | None = None  # classification: label names in id order
    recipe: object = None  # the run's Recipe when the folder has recipe.yaml (prompt format, lengths)
    lora: dict = field(default_factory=dict)  # LoRA: module path -> (A^T [in, r], (B * scaling)^T [r, out])


class Holder:
    def __init__(self, base, task: str | None = None, quantize: str | None = None, tokenizer=None,
                 batch_size: int = 16):
        """`base`: an embedded name, folder or hub id (loaded for `task`: causal-lm, classification, qa;
        optionally quantize="4bit"/"8bit"/"nf4"/"fp4"), or a loaded transformers model."""
        if isinstance(base, (str, Path)):
            tokenizer = tokenizer or load_tokenizer(str(base))
            base = load_model(str(base), task=task or "causal-lm", quantize=quantize,
                              pad_token_id=tokenizer.pad_token_id)
        elif task is not None or quantize is not None:
            raise PeftkitError("task= and quantize= apply when the bank loads the base by name; "
                               "a model passed in is used as it is")
        if getattr(base, "peftkit_adapters", None) or hasattr(base, "peft_config"):
            raise PeftkitError("AdapterBank needs a bare base model; this one already holds adapters")
        self.model = base.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.task = task_of_class(type(base).__name__)
        self.base_name = base_name(base)
        heads = task_heads(base)
        self.fingerprint = fingerprint(base, heads)
        self.lora = LoraHooks(dict(base.named_modules()))  # pristine names; LoRA targets are looked up here
        self.heads = {}
        for head in heads:
            self.heads[head] = HeadSwitch(base.get_submodule(head))
            setattr(base, head, self.heads[head])
        self.entries: dict[str, Entry] = {}
        self.batch_size = batch_size
        self.lock = Turns()  # one call at a time (the selection is per call); fewest turns first

    @classmethod
    def from_adapters(cls, base: str, adapters: dict, task: str | None = None, quantize: str | None = None,
                      **kwargs) -> Self:
        """A bank whose base is built for the task the adapters were trained for (or `task` when there
        are none), with them loaded."""
        tasks = {name: adapter_task(Path(path)) for name, path in adapters.items()}
        if len({t for t, _ in tasks.values()} | ({task} if task and tasks else set())) > 1:
            found = ", ".join(f"{n}={t}" for n, (t, _) in tasks.items())
            raise PeftkitError(f"one bank serves one task; these adapters differ: {found}" +
                               (f" (task={task})" if task else ""))
        found, model_class = next(iter(tasks.values()), (task or "causal-lm", None))
        bank = cls(base, task=model_class or found, quantize=quantize, **kwargs)
        for name, path in adapters.items():
            bank.load(name, path)
        return bank

    def load(self, name: str, path) -> dict:
        """Load the adapter folder `path` as `name`. A folder made for another base or task is
        refused with an error naming both, and the bank stays as it was."""
        path = Path(path)
        with self.lock:
            self._check_new_name(name)
            config = read_adapter_config(path)
            info = adapter_info(config)
            if not method(info.method).bank_rows:
                served = ", ".join(m.name for m in METHODS.values() if m.bank_rows)
                raise PeftkitError(f"adapter {name!r} ({path}) is {info.method}, which the bank cannot apply per "
                                   f"row (it serves {served}); load it with peftkit.load_adapter instead")
            task, model_class = adapter_task(path, config)
            if task != self.task:
                raise PeftkitError(f"adapter {name!r} ({path}) is a {task} adapter ({model_class or 'peft'}) but "
                                   f"this bank's base is a {self.task} model ({type(self.model).__name__})")
            if info.base_fingerprint:
                check_same_base(info.base_fingerprint, self.fingerprint, info.base_name, self.base_name)
            state = read_weights(path / WEIGHTS)
            heads = head_weights(state, self.heads, key=strip)
            rest = {k: v for k, v in state.items() if k not in heads}
            head_modules = {h: head_like(switch.original, h, heads) for h, switch in self.heads.items()}
            entry = Entry(name, info.method, task, path, (path / WEIGHTS).stat().st_size,
                          sum(t.numel() * t.element_size() for t in state.values()),
                          _labels(info.task) if task == "classification" else None, _recipe(path))
            if method(info.method).peft_native:  # LoRA (the only peft method it serves): its own per-row hooks
                entry.lora = self.lora.read(config, rest)  # checks everything; changes nothing
            else:
                inject_saved(self.model, name, info, rest)
                self.model.eval()
                if info.method == "fusion":  # an adapter it shares is held once, and counted with who brought it
                    from ..tuners.bottleneck.fusion import shared_bytes
                    entry.memory_bytes -= shared_bytes(self.model, name)
            for head, module in head_modules.items():  # nothing below can fail
                self.heads[head].heads[name] = module.to(self.model.device)
            self.lora.add(entry.lora)
            self.entries[name] = entry
            self._select(None)  # inject turned the new adapter on; calls choose their own
            return self.describe(name)

    def unload(self, name: str) -> None:
        """Drop adapter `name`; the others stay exactly as they were."""
        with self.lock:
            entry = self._entry(name)
            if method(entry.method).peft_native:
                self.lora.remove(entry.lora)
            else:
                method(entry.method).tuner.remove(self.model, name)
            for switch in self.heads.values():
                del switch.heads[name]
            del self.entries[name]

    def adapters(self) -> list[dict]:
        """Name, method, task, labels, folder, file size and memory held, per loaded adapter.
        (No lock: a server can list adapters while a batch runs.)"""
        return [_describe(e) for e in list(self.entries.values())]

    def describe(self, name: str) -> dict:
        return _describe(self._entry(name))

    def __contains__(self, name) -> bool:
        return name in self.entries

    # ------------------------------------------------------------------ checks the front-ends share

    def _check_new_name(self, name) -> None:
        # head switches keep each adapter's head in an nn.ModuleDict under its name
        if not isinstance(name, str) or not NAME.fullmatch(name) or hasattr(nn.ModuleDict(), name):
            raise PeftkitError(f"adapter name {name!r} must be 1-64 letters, digits, '-' or '_' (starting with "
                               "a letter or digit) and not a Python attribute name of nn.ModuleDict")
        if name in self.entries:
            raise PeftkitError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        if name in (self.base_name, Path(self.base_name).name):
            raise PeftkitError(f"{name!r} is the base model's name; pick another adapter name")

    def _entry(self, name) -> Entry:
        if name not in self.entries:
            raise PeftkitError(f"unknown adapter {name!r}; loaded: {', '.join(self.entries) or 'none'}")
        return self.entries[name]

    def _need(self, task: str, what: str) -> None:
        if self.task != task:
            raise PeftkitError(f"{what} needs a {task} bank; this bank's base is a {self.task} model "
                               f"({type(self.model).__name__})")
        if self.tokenizer is None:
            raise PeftkitError(f"{what} needs a tokenizer: AdapterBank(model, tokenizer=...)")

    def _setting(self, name: str | None, key: str):
        """A length setting of a row's adapter's run recipe (a block's: its last adapter's), or the default."""
        name = lead(name)
        recipe = self.entries[name].recipe if name else None
        if key == "max_new_tokens":
            return recipe.train.max_new_tokens if recipe else DEFAULTS["max_new_tokens"]
        if key == "doc_stride":
            return recipe.train.doc_stride if recipe else DEFAULTS["doc_stride"]
        if recipe:
            return recipe.train.max_length
        default = DEFAULTS["qa_max_length" if self.task == "qa" else "cls_max_length"]
        return min(default, self.tokenizer.model_max_length)


def task_of_class(class_name: str) -> str:
    found = model_task(class_name)
    if found and found[0] in SERVED:
        return found[0]
    raise PeftkitError(f"AdapterBank serves causal LMs, sequence classifiers and QA models; "
                       f"{class_name} is none of these (load the base with task=causal-lm, classification or qa)")


def adapter_task(path: Path, config: dict | None = None) -> tuple[str, str | None]:
    """(task, transformers class or None) an adapter folder was trained for."""
    config = config or read_adapter_config(path)
    record = config.get("peftkit") or {}
    model_class = (record.get("task") or {}).get("class")
    if model_class:
        return task_of_class(model_class), model_class
    task = PEFT_TASKS.get(config.get("task_type"))
    if task is None:
        raise PeftkitError(f"{path}: cannot tell what task this adapter is for (peft task_type "
                           f"{config.get('task_type')!r}); the bank serves {', '.join(sorted(PEFT_TASKS))}")
    return task, None


def _describe(e: Entry) -> dict:
    return {"name": e.name, "method": e.method, "task": e.task, "labels": e.labels, "path": str(e.path),
            "file_bytes": e.file_bytes, "memory_bytes": e.memory_bytes}


def _labels(task: dict) -> list[str]:
    id2label = task.get("id2label") or {}
    n = task.get("num_labels") or len(id2label)
    return [id2label.get(str(i), f"LABEL_{i}") for i in range(n)]


def _recipe(path: Path):
    from ..recipe import run_recipe  # the bank imports no recipe machinery until a run folder has one
    return run_recipe(path) if (path / "recipe.yaml").is_file() else None
