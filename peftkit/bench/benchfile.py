"""A benchmark file of `peftkit bench train`: a recipe, overrides every variant shares, the variants.

    bench = load_bench("benchmarks/train-sentiment.yaml")
    for variant in selected(bench, ["lora", "reference"], ["train.max_steps=4"]):
        recipe = recipe_for(bench, variant, ["train.max_steps=4"])

A variant is a method preset (optionally on a 4-bit/8-bit base), `full` (every weight trains),
`reference` or `reference-tuned` (peft's LoRA through the plain Trainer script the file names,
benchmarks/reference/), plus dotted recipe keys of its own.

A file may sweep the learning rate (`lr_sweep: {values: [...], overrides: {...}}`): every variant
that does not set its own train.lr first trains short runs (the sweep's overrides) at each value,
and its table row trains at the one that scored best on the validation split (LrSweep.best).
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PeftkitError
from ..presets import read_yaml, resolve_spec
from ..shipped import CHECKOUT, shipped_root

ROOT = shipped_root()  # benchmark files name paths under it (recipes/..., benchmarks/reference/...)
# the repository's results folder in a checkout; from an installed wheel, one under the current folder
RESULTS_DIR = ROOT / "benchmarks" / "results" if ROOT == CHECKOUT else Path("benchmarks") / "results"
REFERENCES = ("reference", "reference-tuned")  # peft + a plain Trainer script: as is, and tuned
SPECIAL = ("full", *REFERENCES)
# sweep runs whose validation scores are this close count as tied: under one standard error of an
# accuracy near 0.6 on the sentiment recipe's 1,319 validation reviews (0.013); one width for every bench file
SWEEP_TIE = 0.01


@dataclass
class Variant:
    name: str
    method: str  # a preset name or path, "full", "reference" or "reference-tuned"
    quantize: str | None = None
    overrides: dict = field(default_factory=dict)  # dotted recipe keys, this variant only


@dataclass
class LrSweep:
    values: list[float]  # the learning rates each swept variant tries
    overrides: dict  # dotted recipe keys of the short runs (fewer steps), on top of the variant's

    def swept(self, variant: Variant) -> bool:
        """A variant that sets its own rate keeps it (full fine-tuning's usual small one, say)."""
        return "train.lr" not in variant.overrides

    @staticmethod
    def best(trials: list[dict]) -> dict:
        """The short run ({"lr", "validation", "final_loss", ...}) a row trains at: the best validation
        score, and among the scores within SWEEP_TIE of it the run whose training loss ended lowest.
        Short runs of a method that learns slowly often all predict the majority class (sentiment, 40
        steps: 17 of 20 methods scored 0.5792 at every rate, and the first rate, the lowest, won every
        tie); their losses still tell the rates apart. A loss that is not a number ranks last."""
        top = max(t["validation"] for t in trials)
        tied = [t for t in trials if t["validation"] >= top - SWEEP_TIE]
        return min(tied, key=lambda t: t["final_loss"] if math.isfinite(t["final_loss"]) else math.inf)


@dataclass
class Bench:
    name: str
    path: Path
    recipe: str
    reference: Path
    overrides: dict
    variants: list[Variant]
    lr_sweep: LrSweep | None = None


def load_bench(path) -> Bench:
    path = Path(path)
    if not path.is_file():
        raise PeftkitError(f"benchmark file {path} does not exist; shipped: "
                           + ", ".join(str(p) for p in sorted(path.parent.glob("train-*.yaml"))))
    data = read_yaml(path)
    allowed = {"name", "recipe", "reference", "overrides", "variants", "lr_sweep"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PeftkitError(f"{path}: unknown key {unknown[0]}; allowed: {', '.join(sorted(allowed))}")
    for key in ("name", "recipe", "variants"):
        if key not in data:
            raise PeftkitError(f"{path}: missing key {key}")
    if not isinstance(data["variants"], dict) or not data["variants"]:
        raise PeftkitError(f"{path}: variants must be a mapping of name -> settings")
    variants = [_variant(name, settings or {}, path) for name, settings in data["variants"].items()]
    reference = data.get("reference")
    if any(v.method in REFERENCES for v in variants) and not reference:
        raise PeftkitError(f"{path}: a reference variant needs `reference: path/to/script.py`")
    reference = Path(repo_path(str(reference))) if reference else None
    if reference is not None and not reference.is_file():
        raise PeftkitError(f"{path}: reference script {reference} does not exist")
    return Bench(str(data["name"]), path, str(data["recipe"]), reference, dict(data.get("overrides") or {}),
                 variants, _lr_sweep(data.get("lr_sweep"), path))


def recipe_for(bench: Bench, variant: Variant, extra: list[str] = ()):
    """The recipe a variant trains: the bench's recipe with the shared overrides, the variant's
    method/quantize and own overrides, then the command line's."""
    from ..recipe import load_recipe

    # Timed training only: no validation passes inside the timed loop, no tracker files.
    items = ["train.eval_steps=0", "train.report_to=[]"]
    items += [f"{k}={json.dumps(v)}" for k, v in bench.overrides.items()]
    if variant.method not in SPECIAL:
        items.append(f"method={variant.method}")
    if variant.quantize:
        items.append(f"quantize={variant.quantize}")
    items += [f"{k}={json.dumps(v)}" for k, v in variant.overrides.items()]
    recipe = load_recipe(repo_path(bench.recipe), items + list(extra))
    recipe.name = f"bench-{bench.name}-{variant.name}"
    return recipe


def selected(bench: Bench, only: list[str] | None, extra: list[str]) -> list[Variant]:
    """The variants `--only` names (all without it), each recipe loaded once to fail before any training."""
    variants = bench.variants
    if only:
        names = [v.name for v in variants]
        missing = [n for n in only if n not in names]
        if missing:
            raise PeftkitError(f"--only: no variant {missing[0]!r} in {bench.path}; variants: {', '.join(names)}")
        variants = [v for v in variants if v.name in only]
    for variant in variants:
        recipe_for(bench, variant, extra)
        if bench.lr_sweep and bench.lr_sweep.swept(variant):
            recipe_for(bench, variant, [*extra, *sweep_trial(bench.lr_sweep, bench.lr_sweep.values[0])])
    return variants


def shown_path(path: Path) -> str:
    """A path as a reader of the results should type it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def repo_path(name: str) -> str:
    """A path a benchmark file names, under the repository (or the installed share folder) when there."""
    path = Path(name)
    return str(ROOT / path) if not path.is_absolute() and (ROOT / path).is_file() else name


def sweep_trial(sweep: LrSweep, lr: float) -> list[str]:
    """The overrides of one short sweep run at `lr` (after the command line's, so they win)."""
    return [f"{k}={json.dumps(v)}" for k, v in sweep.overrides.items()] + [f"train.lr={lr!r}"]


def _lr_sweep(data, path: Path) -> LrSweep | None:
    if data is None:
        return None
    if not isinstance(data, dict) or sorted(data) != ["overrides", "values"]:
        raise PeftkitError(f"{path}: lr_sweep must map values (learning rates) and overrides (the short "
                           "runs' recipe keys, e.g. train.max_steps)")
    values = data["values"]
    if not isinstance(values, list) or len(values) < 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        raise PeftkitError(f"{path}: lr_sweep.values must list two or more positive learning rates, got {values!r}")
    overrides = data["overrides"]
    if not isinstance(overrides, dict) or "train.lr" in overrides:
        raise PeftkitError(f"{path}: lr_sweep.overrides must map dotted recipe keys other than train.lr")
    return LrSweep([float(v) for v in values], dict(overrides))


def _variant(name: str, settings: dict, path: Path) -> Variant:
    if not isinstance(settings, dict):
        raise PeftkitError(f"{path}: variant {name} must map settings (method, quantize, dotted recipe keys)")
    settings = dict(settings)
    method = str(settings.pop("method", name))
    quantize = settings.pop("quantize", None)
    if method not in SPECIAL:
        resolve_spec(method)  # an unknown preset fails here, before anything trains
    elif quantize is not None:
        raise PeftkitError(f"{path}: variant {name}: {method} runs on the unquantized base; drop quantize")
    return Variant(name, method, quantize, settings)
