"""`peftkit sweep`: one recipe trained over a grid of settings, or searched with optuna; every
trial is judged by validation and only the best one is tested.

    peftkit sweep sentiment-lora train.lr=1e-4,3e-4 method.r=8,16
    peftkit sweep sentiment-lora train.lr=1e-5:1e-2 method.r=4:32 --trials 12

KEY=V1,V2 is a list (values parsed as YAML, as train's overrides are), KEY=V one fixed setting,
KEY=LOW:HIGH a range. Without --trials the lists make a grid: every combination trains, in order.
With --trials N, optuna's TPE sampler picks N trials: ranges continuous (log scale when positive
and 10x apart or more), lists as choices. Every trial's recipe is checked before the first one
trains. Trials are run folders runs/<sweep>/trial-NNN/ trained without a test; the best by
validation is tested once, and runs/<sweep>/sweep.json and sweep.md hold the table. --resume
keeps finished trials, continues an interrupted one from its last checkpoint and, for a search,
the optuna study stored in runs/<sweep>/optuna.db.

One module over 400 lines on purpose: parsing the axes, planning, running the trials and the
summary are one command read top to bottom, and no other module uses its parts.
"""
import contextlib
import copy
import importlib.util
import io
import itertools
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import PeftkitError
from .recipe import Recipe, build, check_trackers, read_recipe, set_key
from .saving import atomic_write

# YAML 1.1 reads 1e-4 (no dot) as a string; in a sweep it is always meant as a number
EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
# LOW:HIGH, unquoted, with no comma, bracket or space: anything else is a list of YAML values
RANGE = re.compile(r"[^,:\s\[\]{}\"']+:[^,:\s\[\]{}\"']+")
PER_TRIAL = ("name", "output_dir")  # every trial is runs/<sweep>/trial-NNN
STUDY = "optuna.db"


def sweep(recipe: str, settings: list[str], trials: int | None = None, resume: bool = False,
          name: str | None = None) -> Path:
    """Train every trial (or `trials` picked by optuna), test the best by validation once, and
    write sweep.json and sweep.md into the sweep folder, which is returned."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would run every trial's bookkeeping
        raise PeftkitError("peftkit sweep runs in one process; start it without torchrun or accelerate launch")
    plan = make_plan(recipe, settings, trials, name)
    _start(plan, resume)
    records = _grid(plan) if trials is None else _search(plan)
    return _finish(plan, records)


@dataclass
class Axis:
    """One KEY=... setting: a list of values, or a range LOW:HIGH (of ints, or of floats)."""
    key: str
    text: str  # as typed
    values: list | None = None
    low: float | None = None
    high: float | None = None

    @property
    def is_range(self) -> bool:
        return self.values is None

    @property
    def log(self) -> bool:
        # a range over a decade or more (a learning rate) is searched evenly per decade
        return self.is_range and self.low > 0 and self.high >= 10 * self.low

    def suggest(self, trial):
        if not self.is_range:
            return self.value_of(trial.suggest_categorical(self.key, [label(v) for v in self.values]))
        if isinstance(self.low, int):
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def value_of(self, param):
        """A value from optuna's record of it (choices are stored by their labels)."""
        if self.is_range:
            return param
        return self.values[[label(v) for v in self.values].index(param)]


def parse_axis(item: str) -> Axis:
    key, sep, text = item.partition("=")
    if not sep or not key or not text:
        raise PeftkitError(f"sweep setting {item!r} must look like KEY=V1,V2 (a list), KEY=LOW:HIGH (a range, "
                           "with --trials) or KEY=V (fixed), e.g. train.lr=1e-4,3e-4")
    if RANGE.fullmatch(text):
        low, high = (_bound(item, part) for part in text.split(":"))
        if low >= high:
            raise PeftkitError(f"sweep range {item!r}: the low end {low} must be below the high end {high}")
        if isinstance(low, float) or isinstance(high, float):
            low, high = float(low), float(high)
        return Axis(key, text, low=low, high=high)
    try:
        values = yaml.safe_load(f"[{text}]")
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise PeftkitError(f"sweep setting {item!r}: the values are not a YAML list ({problem}); separate them "
                           "with commas, e.g. train.lr=1e-4,3e-4, and quote a value that holds a comma") from None
    if not values:
        raise PeftkitError(f"sweep setting {item!r} has no values; give one or more, e.g. {key}=V1,V2")
    values = [_number(v) for v in values]
    if len({label(v) for v in values}) < len(values):
        raise PeftkitError(f"sweep setting {item!r} lists a value twice; give each once")
    return Axis(key, text, values=values)


def _bound(item: str, text: str):
    try:
        value = _number(yaml.safe_load(text))
    except yaml.YAMLError:
        value = None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise PeftkitError(f"sweep range {item!r}: {text!r} is not a number; a range is LOW:HIGH, e.g. "
                           "train.lr=1e-5:1e-3 (quote a value that holds a colon)")
    return value


def _number(value):
    return float(value) if isinstance(value, str) and EXPONENT.fullmatch(value) else value


def label(value) -> str | int | float | bool | None:
    """A list value as optuna can store a choice: itself, or a mapping or list as its YAML text."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else show(value)


def show(value, exact: bool = True) -> str:
    """A value as a command line gives it (exact) or as a table shows it (3 digits)."""
    if isinstance(value, float):
        return repr(value) if exact else f"{value:.3g}"
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


@dataclass
class Plan:
    recipe: str  # as given
    items: list[str]  # the settings as given
    trials: int | None  # None: the whole grid
    name: str | None  # as given (--name)
    folder: Path  # the sweep folder, runs/<sweep>/
    data: dict  # the recipe file, as read
    fixed: dict  # {key: value} every trial shares
    swept: list[Axis]
    metric: str  # what trials are judged by (validation)
    seed: int  # the recipe's train.seed; the optuna sampler's seed too

    @property
    def command(self) -> str:
        return shlex.join(["peftkit", "sweep", self.recipe, *self.items,
                           *(["--trials", str(self.trials)] if self.trials else []),
                           *(["--name", self.name] if self.name else [])])

    def recipe_for(self, settings: dict, trial: str) -> Recipe:
        return _recipe(self.data, {**self.fixed, **settings, "output_dir": str(self.folder), "name": trial})

    def grid(self) -> list[dict]:
        return [dict(zip((a.key for a in self.swept), values))
                for values in itertools.product(*(a.values for a in self.swept))]


def make_plan(recipe: str, items: list[str], trials: int | None = None, name: str | None = None) -> Plan:
    """The sweep, every trial's recipe checked (a search: every choice and both ends of each
    range): bad input fails here, before anything trains."""
    axes = [parse_axis(item) for item in items]
    keys = [a.key for a in axes]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice:
        raise PeftkitError(f"sweep key {twice} is given twice; give all its values in one list: {twice}=V1,V2")
    swept = [a for a in axes if a.is_range or len(a.values) > 1]
    fixed = {a.key: a.values[0] for a in axes if a not in swept}
    if not swept:
        raise PeftkitError("nothing to sweep: give a key several values (train.lr=1e-4,3e-4), or a range "
                           "with --trials (train.lr=1e-5:1e-3 --trials 8)")
    for a in swept:
        if a.key in PER_TRIAL:
            raise PeftkitError(f"{a.key} cannot be swept: each trial is <output_dir>/<sweep>/trial-NNN; name the "
                               "sweep with --name")
    ranges = [a for a in swept if a.is_range]
    if trials is None and ranges:
        r = ranges[0]
        raise PeftkitError(f"{r.key}={r.text} is a range, which needs --trials N (an optuna search); for a grid "
                           f"list the values instead, e.g. {r.key}={r.low},{r.high}")
    if trials is not None:
        _check_search(trials, swept, ranges)
    data = read_recipe(recipe)
    points = itertools.product(*(a.values if not a.is_range else (a.low, a.high) for a in swept))
    recipes = [_checked_trial(data, fixed, dict(zip((a.key for a in swept), values))) for values in points]
    metrics = sorted({(r.task, r.best_metric) for r in recipes})
    if len(metrics) > 1:
        raise PeftkitError(f"the trials would be judged by different metrics ({', '.join(m for _, m in metrics)}); "
                           "a sweep compares one task by one train.metric_for_best")
    base = recipes[0]
    folder = Path(base.output_dir) / (name or f"{base.name}-sweep")
    return Plan(recipe, list(items), trials, name, folder, data, fixed, swept, base.best_metric, base.train.seed)


def _check_search(trials: int, swept: list[Axis], ranges: list[Axis]) -> None:
    if trials < 1:
        raise PeftkitError(f"--trials must be 1 or more, got {trials}")
    if not ranges:
        size = 1
        for a in swept:
            size *= len(a.values)
        raise PeftkitError(f"--trials searches ranges with optuna, and every swept key here is a list: drop --trials "
                           f"to train the whole grid ({size} trials), or give a range, e.g. train.lr=1e-5:1e-3")
    if importlib.util.find_spec("optuna") is None:
        raise PeftkitError("peftkit sweep --trials searches with optuna: pip install 'peftkit[sweep]'")


def _recipe(data: dict, settings: dict) -> Recipe:
    data = copy.deepcopy(data)
    for key in sorted(settings, key=lambda k: k.count(".")):  # `method` before `method.r`, which changes it
        set_key(data, key, copy.deepcopy(settings[key]))
    return build(Recipe, data, "")


def _checked_trial(data: dict, fixed: dict, settings: dict) -> Recipe:
    try:
        return _checked(_recipe(data, {**fixed, **settings}))
    except PeftkitError as err:
        shown = " ".join(f"{k}={show(v)}" for k, v in settings.items())
        raise PeftkitError(f"{err} (in the trial {shown})") from None


def _checked(recipe: Recipe) -> Recipe:
    """What train() would refuse, as far as it can be told without the data or the model."""
    from .attach import check_spec
    check_spec(recipe.method)
    check_trackers(recipe.train.report_to)
    t = recipe.train
    if t.eval_steps == 0:
        raise PeftkitError("a sweep judges its trials by validation, but train.eval_steps is 0 (off); remove it "
                           "or set a positive number")
    if t.max_steps > 0 and t.eval_steps and t.eval_steps > t.max_steps:
        raise PeftkitError(f"train.eval_steps {t.eval_steps} is longer than the run ({t.max_steps} optimizer "
                           f"steps); set it to at most {t.max_steps}")
    return recipe


def _start(plan: Plan, resume: bool) -> None:
    """A new sweep gets a fresh folder and its plan; --resume continues the same sweep only."""
    saved = plan.folder / "plan.json"
    wanted = {"recipe": plan.recipe, "settings": plan.items, "trials": plan.trials, "command": plan.command}
    if resume:
        if not saved.is_file():
            raise PeftkitError(f"--resume: {plan.folder} holds no sweep to continue; start it without --resume")
        before = json.loads(saved.read_text())
        if {k: before.get(k) for k in wanted if k != "command"} != {k: v for k, v in wanted.items() if k != "command"}:
            raise PeftkitError(f"--resume: {plan.folder} holds another sweep ({before.get('command')}); resume it "
                               "with the same settings, or start this one under another --name")
        return
    if plan.folder.exists() and any(plan.folder.iterdir()):
        raise PeftkitError(f"{plan.folder} already holds a sweep; continue it with --resume, or start this one "
                           "under another --name (or delete the folder)")
    atomic_write(saved, json.dumps(wanted, indent=2) + "\n")


def _grid(plan: Plan) -> list[dict]:
    points = plan.grid()
    return [_trial(plan, f"trial-{i:03d}", point, i + 1, len(points)) for i, point in enumerate(points)]


def _search(plan: Plan) -> list[dict]:
    """Optuna's ask-and-tell loop over a study stored in the sweep folder: a resumed sweep goes on
    with the trials it finished, and its sampler sees them."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial
    # TPE starts with random trials, 10 by default: nearly all of a short CPU sweep; a third of it here
    sampler = optuna.samplers.TPESampler(seed=plan.seed, n_startup_trials=min(10, max(2, plan.trials // 3)))
    study = optuna.create_study(storage=f"sqlite:///{plan.folder / STUDY}", study_name="sweep",
                                direction="maximize", sampler=sampler, load_if_exists=True)
    _requeue(study)
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.user_attrs["trial"])
    records = [_trial(plan, t.user_attrs["trial"], _settings(plan, t.params), n, plan.trials)
               for n, t in enumerate(done[:plan.trials], 1)]
    while len(records) < plan.trials:
        trial = study.ask()
        name = trial.user_attrs.get("trial") or f"trial-{_next_index(study):03d}"
        trial.set_user_attr("trial", name)
        settings = {a.key: a.suggest(trial) for a in plan.swept}
        try:
            record = _trial(plan, name, settings, len(records) + 1, plan.trials)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, record["score"])
        records.append(record)
    return records


def _requeue(study) -> None:
    """Trials an interruption cut short go back in the queue with their settings and folder, so
    each resumes from its checkpoint in its place."""
    from optuna.trial import TrialState
    queued = {t.user_attrs.get("trial") for t in study.get_trials(deepcopy=False,
                                                                   states=(TrialState.COMPLETE, TrialState.WAITING))}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        if t.state == TrialState.RUNNING:  # its process is gone (one process runs a sweep)
            study.tell(t.number, state=TrialState.FAIL)
        name = t.user_attrs.get("trial")
        if name and name not in queued:
            study.enqueue_trial(t.params, user_attrs={"trial": name})
            queued.add(name)


def _next_index(study) -> int:
    names = [t.user_attrs["trial"] for t in study.get_trials(deepcopy=False) if "trial" in t.user_attrs]
    return max((int(n.split("-")[-1]) for n in names), default=-1) + 1


def _settings(plan: Plan, params: dict) -> dict:
    return {a.key: a.value_of(params[a.key]) for a in plan.swept}


def _trial(plan: Plan, name: str, settings: dict, number: int, total: int) -> dict:
    """One trial trained (resumed from its last checkpoint if it was cut short), or read back if it
    finished before; one progress line."""
    from .train import last_checkpoint, train, work_dir

    recipe = plan.recipe_for(settings, name)
    run_dir = plan.folder / name
    shown = "  ".join(f"{k}={show(v, exact=False)}" for k, v in settings.items())
    how = "done before"
    if not (run_dir / "metrics.json").is_file():
        checkpoint = last_checkpoint(work_dir(recipe))
        how = f"resumed from {checkpoint.name}" if checkpoint else "trained"
        print(f"[{number}/{total}] {name}  {shown}  training" + (f" from {checkpoint.name}" if checkpoint else ""),
              flush=True)
        # the trial's summary is its run folder's README.md and metrics.json; the sweep prints one line
        with contextlib.redirect_stdout(io.StringIO()):
            train(recipe, resume=checkpoint is not None, test=False)
    record = _record(name, settings, run_dir, plan.metric)
    print(f"[{number}/{total}] {name}  {shown}  validation {plan.metric} {record['score']:.4f} at step "
          f"{record['best_step']}  ({how}, {record['train_seconds']} s)", flush=True)
    return record


def _record(name: str, settings: dict, run_dir: Path, metric: str) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"trial": name, "settings": settings, "score": m["kept_validation"][metric], "best_step": m["best_step"],
            "stopped_step": m["stopped_step"], "planned_steps": m["planned_steps"],
            "train_seconds": m["train_seconds"], "validation_seconds": m["validation_seconds"],
            "validation_examples": m["validation_examples"], "test_examples": m["test_examples"]}


def _finish(plan: Plan, records: list[dict]) -> Path:
    """The best trial by validation (the first of equals) tested once; sweep.json and sweep.md."""
    from .bench.machine import default_device, machine_info
    from .runs import open_run

    best = max(records, key=lambda r: r["score"])
    saved = plan.folder / "sweep.json"
    before = json.loads(saved.read_text()) if saved.is_file() else {}
    if before.get("best") == best["trial"] and before.get("test"):
        test = before["test"]  # a resumed sweep that had finished: its best was tested already
    else:
        test = open_run(plan.folder / best["trial"]).evaluate("test")
    result = {
        "command": plan.command, "recipe": plan.recipe,
        "search": "grid" if plan.trials is None else f"optuna TPE (seed {plan.seed})",
        "fixed": plan.fixed, "swept": {a.key: a.text for a in plan.swept}, "metric": plan.metric,
        "best": best["trial"], "best_settings": best["settings"], "validation": best["score"],
        "test": test, "test_examples": best["test_examples"], "seed": plan.seed,
        "machine": machine_info(default_device()),
        "trials": records,
    }
    atomic_write(saved, json.dumps(result, indent=2) + "\n")
    atomic_write(plan.folder / "sweep.md", markdown(result, plan.folder))
    print(summary(result, plan.folder))
    return plan.folder


def _rows(result: dict, bold: str = "") -> tuple[list[str], list[list[str]]]:
    """The table, best validation first (the first trial of equals first)."""
    keys, metric = list(result["swept"]), result["metric"]
    header = ["trial", *keys, f"validation {metric}", "best step", "steps", "train s"]
    ranked = sorted(result["trials"], key=lambda r: -r["score"])
    rows = [[bold + r["trial"] + bold if r["trial"] == result["best"] else r["trial"],
             *(show(r["settings"][k], exact=False) for k in keys), f"{r['score']:.4f}", str(r["best_step"]),
             str(r["stopped_step"]), str(r["train_seconds"])] for r in ranked]
    return header, rows


def _outcome(result: dict, folder: Path) -> list[tuple[str, str]]:
    best = next(r for r in result["trials"] if r["trial"] == result["best"])
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result["test"].items())
    settings = " ".join(f"{k}={show(v)}" for k, v in best["settings"].items())
    return [("best", f"{result['best']} ({settings}): validation {result['metric']} {result['validation']:.4f} "
                     f"on {best['validation_examples']} examples"),
            ("test", f"{scores} on {result['test_examples']} examples (the best trial only, once)"),
            ("its run", f"{folder / result['best']}  (recipe.yaml, adapter, metrics.json, training.png)")]


def summary(result: dict, folder: Path, limit: int = 20) -> str:
    header, rows = _rows(result)
    widths = [max(len(c) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows[:limit]]]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in {folder / 'sweep.md'}")
    outcome = [f"{name:<12} {text}" for name, text in _outcome(result, folder)]
    return "\n".join([f"sweep        {folder}  ({result['search']}, {len(rows)} trials)", *lines, *outcome,
                      "files        sweep.json, sweep.md, plan.json, trial-NNN/"])


def markdown(result: dict, folder: Path) -> str:
    header, rows = _rows(result, bold="**")
    m = result["machine"]
    fixed = " ".join(f"`{k}={show(v)}`" for k, v in result["fixed"].items()) or "none"
    return "\n".join([
        f"# Sweep {folder.name}", "",
        f"```\n{result['command']}\n```", "",
        f"Machine: {m['machine']} ({m['device']}), torch {m['torch']}, {m['threads']} torch threads. "
        f"Search: {result['search']}. Fixed settings: {fixed}. Trials are judged by validation "
        f"{result['metric']} (the kept adapter's); only the best is tested.", "",
        "| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows), "",
        *(f"- {name}: {text}" for name, text in _outcome(result, folder)), ""])
