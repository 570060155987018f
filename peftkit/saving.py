"""save_adapter / load_adapter: a folder with adapter_model.safetensors and
adapter_config.json. LoRA folders are peft's own format (stock peft loads
them, without a warning), with peftkit's record beside them in peftkit.json;
peftkit's own methods keep the record under the "peftkit" key of their config.
Nothing is ever unpickled, and a folder only appears once complete."""
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .anatomy import (AdapterInfo, adapters_of, base_fingerprint, base_model, base_name, head_weights, pick_adapter,
                      task_heads)
from .errors import PeftkitError
from .fingerprint import check_same_base
from .loading import keep_standard_4bit_layout
from .methods import METHODS, activate, method

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
RECORD = "peftkit.json"  # beside a LoRA folder's config: peft warns about keys it does not know


def save_adapter(model, path, name: str | None = None) -> Path:
    """Write adapter `name` (default: the only or active one) and its task heads to `path`."""
    pick_adapter(model, name)  # fail before creating anything
    with staged_dir(path) as tmp:
        write_adapter_files(model, tmp, name)
    return Path(path)


def write_adapter_files(model, folder: Path, name: str | None = None) -> None:
    """The adapter's two files, written into an existing folder (a training
    checkpoint, or save_adapter's staging folder)."""
    name, info = pick_adapter(model, name)
    if method(info.method).peft_native:
        _save_peft(model, name, info, Path(folder))
    else:
        state = saved_state(model, name)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, Path(folder) / WEIGHTS,
                  metadata={"format": "pt"})
        _write_json(Path(folder) / CONFIG, {"peftkit": _record(info, name)})


def restore_adapter_weights(model, folder: Path, name: str | None = None) -> None:
    """Put the weights of a checkpoint back into the adapter already in `model`."""
    name, info = pick_adapter(model, name)
    state = read_weights(Path(folder) / WEIGHTS)
    if method(info.method).peft_native:
        _restore_peft(model, name, Path(folder), state)
        return
    base = base_model(model)
    heads = head_weights(state, task_heads(base))
    _check_heads(base, heads)
    method(info.method).tuner.load_adapter_state_dict(model, name,
                                                       {k: v for k, v in state.items() if k not in heads})
    base.load_state_dict(heads, strict=False)


def _restore_peft(model, name: str, folder: Path, state: dict) -> None:
    from peft import set_peft_model_state_dict

    config = _read_json(folder / CONFIG)
    if config.get("peft_type") == "P_TUNING":
        # the checkpoint holds the prompt p-tuning's encoder made, not the encoder: from here on the model
        # serves that prompt as it is, as peft serves a loaded p-tuning adapter
        model.peft_config[name].inference_mode = True
    pattern = config.get("rank_pattern") if config.get("peft_type") == "ADALORA" else None  # LoRA's: per-layer r
    if pattern is None:
        set_peft_model_state_dict(model, state, adapter_name=name)
        return
    _cut_to_ranks(model, name, pattern)
    model.peft_config[name].rank_pattern = None  # the layers are cut already
    set_peft_model_state_dict(model, state, adapter_name=name)
    model.peft_config[name].rank_pattern = pattern


def _cut_to_ranks(model, name: str, pattern: dict) -> None:
    """Cut AdaLoRA's layers to the ranks a checkpoint kept: it saves each layer cut so, and its rank_pattern
    changes as it trains. peft would cut them to the pattern the run has reached since, and builds the cut
    layers in the base layer's dtype (bf16 where the frozen base is stored in bf16), which would round the
    fp32 weights it loads; so cut here and give each tensor back its own dtype."""
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    model.base_model.resize_modules_by_rank_pattern(pattern, name)
    for key, param in model.named_parameters():
        if param.dtype != dtypes.get(key, param.dtype):
            param.data = param.data.to(dtypes[key])


def load_adapter(model, path, name: str | None = None, trainable: bool = False):
    """Load a saved adapter (peftkit's or peft's) onto `model` and return it
    ready for inference (or training with trainable=True). A base that is not
    the one the adapter was trained on is refused and left untouched."""
    path = Path(path)
    config = read_adapter_config(path)
    state = read_weights(path / WEIGHTS)
    info = adapter_info(config)
    saved_name = (config.get("peftkit") or {}).get("name")
    name = name or saved_name or ("default" if not adapters_of(model) else Path(path).name)
    if name in adapters_of(model):
        raise PeftkitError(f"the model already holds an adapter named {name!r}; pass another name=")
    check_fits(model, path, info, state)
    existing = adapters_of(model)
    base = base_model(model)
    keep_standard_4bit_layout(base)  # as attach does: a user-loaded 4-bit base must not repack on CPU
    if method(info.method).peft_native:
        peft_config = PeftConfig.from_peft_type(**{k: v for k, v in config.items() if k != "peftkit"})
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
            model.set_adapter(name)
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=trainable,
                                              config=peft_config)
    else:
        _load_own(model, name, info, state, trainable)
    model.peftkit_adapters = {**existing, name: info}
    return model.train(trainable)


def check_fits(model, path: Path, info: AdapterInfo, state: dict) -> None:
    """The adapter at `path` (its record `info`, its weights `state`) was trained on this base, for
    this task, and brings weights for every task head."""
    base = base_model(model)
    if info.task.get("class") and info.task["class"] != type(base).__name__:
        raise PeftkitError(
            f"this adapter was trained on {info.base_name!r} with a {info.task['class']} but the model given is "
            f"{base_name(base)!r}, a {type(base).__name__}; build the base for the same task "
            "(peftkit.load_model(..., task=...))"
        )
    if info.base_fingerprint:
        check_same_base(info.base_fingerprint, base_fingerprint(model), info.base_name, base_name(base))
    else:  # a stock peft folder: what it carries is the base's name and the shapes it expects
        _check_lora_targets(base, state, path)
        logging.getLogger("peftkit").warning(
            f"peftkit: {path} records no base fingerprint (saved by peft, not peftkit); it names base "
            f"{info.base_name!r}, and only its layer shapes were checked against {base_name(base)!r}")
    heads = {_module_key(k): v for k, v in state.items()}
    heads = {k: v for k, v in head_weights(heads, task_heads(base)).items() if "lora_" not in k}
    missing = [head for head in task_heads(base) if not any(k.split(".")[0] == head for k in heads)]
    if missing:  # loading would leave the head as initialized: random predictions, no error
        raise PeftkitError(f"{path} holds no weights for the model's task head {', '.join(missing)}; a "
                           f"{type(base).__name__} predicts with its trained head only (peft saves it with "
                           f"modules_to_save={missing})")
    _check_heads(base, heads)


def _module_key(key: str) -> str:
    """A key of a peft file as the base model names it: peft's layer methods save base_model.model.<module>...,
    its prompt learning (which wraps the model once less) base_model.<module>...; peftkit's own keys are bare."""
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            return key.removeprefix(prefix)
    return key


def read_adapter_config(path: Path) -> dict:
    if not path.is_dir():
        raise PeftkitError(f"adapter folder {path} does not exist")
    for needed in (CONFIG, WEIGHTS):
        if not (path / needed).is_file():
            raise PeftkitError(f"{path} is not an adapter folder: {needed} is missing")
    config = _read_json(path / CONFIG)
    if (path / RECORD).is_file():  # the config as peftkit reads it: its record under "peftkit"
        config["peftkit"] = _read_json(path / RECORD)
    return config


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise PeftkitError(f"{file} is not valid JSON: {err}") from None


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise PeftkitError(f"{file} is truncated or corrupted ({err}); save the adapter again") from None


def _save_peft(model, name, info, tmp: Path) -> None:
    model.save_pretrained(str(tmp), selected_adapters=[name])
    if name != "default":  # peft files non-default adapters in a subfolder
        for file in (tmp / name).iterdir():
            file.rename(tmp / file.name)
        (tmp / name).rmdir()
    _write_json(tmp / RECORD, _record(info, name))


def saved_state(model, name: str | None = None) -> dict:
    """The tensors save_adapter writes for adapter `name`: peft's state dict for a peft-native
    method (what save_pretrained writes), else the tuner's weights and the task heads."""
    name, info = pick_adapter(model, name)
    if method(info.method).peft_native:
        from peft.utils import get_peft_model_state_dict
        return get_peft_model_state_dict(model, adapter_name=name)
    return {**method(info.method).tuner.adapter_state_dict(model, name), **_head_state(base_model(model))}


def _head_state(base) -> dict:
    """The task heads' weights, keyed as in the base's state dict (saved with every adapter)."""
    return {f"{head}.{key}": value for head in task_heads(base)
            for key, value in base.get_submodule(head).state_dict().items()}


def inject_saved(model, name: str, info: AdapterInfo, state: dict) -> None:
    """Add a saved adapter of peftkit's own methods to `model` (active, frozen) from its weights,
    without the task heads; on any mismatch the model is left as it was."""
    about = method(info.method)
    base = base_model(model)
    about.tuner.inject(model, about.config(info.options, base, task_heads(base)), name)
    try:
        about.tuner.load_adapter_state_dict(model, name, state)
    except Exception:
        about.tuner.remove(model, name)
        raise
    activate(model, name, {**{n: i.method for n, i in adapters_of(model).items()}, name: info.method})
    for param in model.parameters():
        param.requires_grad_(False)


def _load_own(model, name, info, state, trainable) -> None:
    base = base_model(model)
    heads = head_weights(state, task_heads(base))
    _check_heads(base, heads)
    inject_saved(model, name, info, {k: v for k, v in state.items() if k not in heads})
    base.load_state_dict(heads, strict=False)
    if trainable:
        head_names = task_heads(base)
        for key, param in model.named_parameters():
            if f".{name}." in key or key.split(".")[0] in head_names:
                param.requires_grad_(True)


def _check_lora_targets(base, state: dict, path: Path) -> None:
    """Each LoRA matrix fits the layer it names: peft itself would fail with a size-mismatch traceback."""
    for key, value in state.items():
        module_path, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
        if not rest.startswith(("A.", "B.")):
            continue  # not a LoRA matrix of a linear layer (a head, an embedding's LoRA)
        try:
            layer = base.get_submodule(module_path)
        except AttributeError:
            raise PeftkitError(f"{path} adapts {module_path}, which the model given lacks; "
                               "load it onto the base it was trained on") from None
        if not hasattr(layer, "in_features"):
            continue
        fits = value.shape[1] == layer.in_features if rest.startswith("A.") else value.shape[0] == layer.out_features
        if not fits:
            raise PeftkitError(f"{path}: {key} has shape {tuple(value.shape)}, which does not fit {module_path} "
                               f"({layer.in_features} in, {layer.out_features} out); load it onto the base it "
                               "was trained on")


def _check_heads(base, heads: dict) -> None:
    own = base.state_dict()
    for key, value in heads.items():
        if key not in own or own[key].shape != value.shape:
            have = tuple(own[key].shape) if key in own else "nothing"
            raise PeftkitError(
                f"the adapter's head {key} has shape {tuple(value.shape)} but the model has {have}; "
                "build the base with the adapter's task and labels (see its adapter_config.json)"
            )


def adapter_info(config: dict) -> AdapterInfo:
    """What an adapter_config.json says about its adapter, peftkit's or plain peft's."""
    record = config.get("peftkit")
    if record is None:
        found = [m.name for m in METHODS.values() if m.peft_type and m.peft_type == config.get("peft_type")]
        if not found:
            raise PeftkitError(f"unknown adapter type {config.get('peft_type')!r}; peftkit loads {', '.join(METHODS)}")
        return AdapterInfo(found[0], {}, config.get("base_model_name_or_path") or "unknown", {})
    if record.get("method") not in METHODS:
        raise PeftkitError(f"unknown adapter method {record.get('method')!r}; known: {', '.join(METHODS)}")
    return AdapterInfo(**{k: record[k] for k in ("method", "options", "base_name", "base_fingerprint", "task")})


def _record(info: AdapterInfo, name: str) -> dict:
    from . import __version__
    return {"version": __version__, "name": name, **dataclasses.asdict(info)}


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write(path, data: bytes | str) -> None:
    """Write a file whole or not at all: into a temporary file beside it, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private (0600); the file open() makes is not
        with os.fdopen(handle, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it: set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def staged_dir(path):
    """A temporary folder beside `path` that replaces `path` whole once the block
    finishes; an interrupted block leaves `path` as it was. An old folder is
    moved aside first and deleted only after the new one is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's folder is private (0700); the one mkdir makes is not
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
