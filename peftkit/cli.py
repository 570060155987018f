"""The `peftkit` command: train, sweep, eval, predict, merge, serve, presets, recipes."""
import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from .bench import add_bench_parser, run_bench
from .combinations import COMBINATIONS
from .errors import PeftkitError
from .presets import QUANTIZE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="peftkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train, evaluate and export an adapter from a recipe")
    p.add_argument("recipe", help="a recipe YAML file or the name of a shipped recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method=houlsby train.epochs=2")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")

    p = commands.add_parser("sweep", help="train a recipe over a grid of settings, or search them with optuna; "
                                          "the best by validation is tested")
    p.add_argument("recipe", help="a recipe YAML file or the name of a shipped recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUES",
                   help="KEY=V1,V2 a list (values parsed as YAML; lists make the grid), KEY=LOW:HIGH a range "
                        "(with --trials; log scale when positive and 10x apart or more), KEY=V a fixed setting; "
                        "e.g. train.lr=1e-4,3e-4 method.r=8,16")
    p.add_argument("--trials", type=int, help="an optuna (TPE) search of N trials over the ranges, lists as choices")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, a cut-short one resumes")
    p.add_argument("--name", help="the sweep's folder under the recipe's output_dir (default: <recipe name>-sweep)")

    p = commands.add_parser("eval", help="evaluate a run on a split of its data")
    p.add_argument("run")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])

    p = commands.add_parser("predict", help="one JSON object per line in, one out")
    p.add_argument("run", nargs="?", help="a run folder; or give --base and --adapter NAME=DIR (several)")
    p.add_argument("--input", required=True, help="a .jsonl file, or - for standard input")
    p.add_argument("--base", help="one base model for several adapters; each input row names its \"adapter\"")
    _bank_arguments(p)
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass, adapters mixed")

    p = commands.add_parser("serve", help="serve adapters over HTTP: OpenAI-style completions, classify, answer")
    p.add_argument("--base", required=True, help="the base model: an embedded name, a folder or a hub id")
    _bank_arguments(p)
    p.add_argument("--task", choices=["causal-lm", "classification", "qa"],
                   help="the base's task when no --adapter tells it (default causal-lm)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--adapter-dir", help="the only folder the admin API may load adapters from")
    p.add_argument("--admin-token", default=os.environ.get("PEFTKIT_ADMIN_TOKEN"),
                   help="turns on the admin endpoints (load/unload); default $PEFTKIT_ADMIN_TOKEN")
    p.add_argument("--max-batch", type=int, default=8, help="rows per batch, across concurrent requests")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body; larger ones get 413")
    p.add_argument("--max-input-tokens", type=int, default=8192,
                   help="most tokens of text one classify or answer request may send")

    p = commands.add_parser("merge", help="fold a LoRA run into its base and save a plain model; or, with "
                                          "--combine, make one adapter of several",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="combine types (LoRA; bottleneck adapters take linear only):\n" + "\n".join(
                                textwrap.fill(what, 96, initial_indent=f"  {name:<12} ", subsequent_indent=" " * 15)
                                for name, what in COMBINATIONS.items()))
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a run folder (or, with --combine, two or more run or adapter folders)")
    p.add_argument("--out", required=True, help="the merged model's folder, or the combined adapter's")
    p.add_argument("--combine", metavar="TYPE",
                   help=f"combine the adapters into one instead: {', '.join(COMBINATIONS)} for LoRA "
                        "(peft's add_weighted_adapter), linear for bottleneck adapters")
    p.add_argument("--weights", metavar="W1,W2,...", help="one weight per adapter, taken as given (0.5,0.5 "
                                                          "averages, 1,1 adds; --weights=-1,1 to subtract)")
    p.add_argument("--density", type=float, help="share of each matrix ties, dare_ties and dare_linear keep, "
                                                 "in (0, 1]")

    commands.add_parser("presets", help="list the method presets in adapters/")
    commands.add_parser("recipes", help="list the shipped recipes")
    add_bench_parser(commands)

    # argparse ends a `nargs="*"` positional at the first option, so overrides written after one
    # (`bench train B --only lora train.max_steps=4`) come back unparsed: they belong to `overrides`.
    args, rest = parser.parse_known_args(argv)
    if rest and hasattr(args, "overrides") and not any(arg.startswith("-") for arg in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return COMMANDS[args.command](args) or 0
    except PeftkitError as err:
        print(f"peftkit: error: {err}", file=sys.stderr)
        return 2


def _train(args):
    from .recipe import load_recipe
    from .train import train
    train(load_recipe(args.recipe, args.overrides), resume=args.resume)


def _sweep(args):
    from .sweep import sweep
    sweep(args.recipe, args.overrides, trials=args.trials, resume=args.resume, name=args.name)


def _eval(args):
    from .runs import open_run
    run = open_run(args.run)
    print(json.dumps(run.evaluate(args.split), indent=2))


def _predict(args):
    if args.base or args.adapter:
        return _predict_bank(args)
    if not args.run:
        raise PeftkitError("predict needs a run folder, or --base with one or more --adapter NAME=DIR")
    from .runs import open_run
    run = open_run(args.run)
    source = sys.stdin if args.input == "-" else open(args.input)
    rows = [_parse_row(line, n) for n, line in enumerate(source, 1) if line.strip()]
    for row in run.predict(rows):
        print(json.dumps(row))


def _predict_bank(args):
    from .bank import AdapterBank
    if args.run or not args.base or not args.adapter:
        raise PeftkitError("with --base give one or more --adapter NAME=DIR and no run folder")
    bank = AdapterBank.from_adapters(args.base, _named(args.adapter), quantize=args.quantize,
                                     batch_size=args.batch_size)
    source = sys.stdin if args.input == "-" else open(args.input)
    rows = [_parse_row(line, n) for n, line in enumerate(source, 1) if line.strip()]
    for row in bank.predict(rows):
        print(json.dumps(row))


def _serve(args):
    import importlib.util
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise PeftkitError(f"peftkit serve needs {' and '.join(missing)}: pip install 'peftkit[serve]'")
    from .bank import AdapterBank
    from .serve import create_app, serve
    bank = AdapterBank.from_adapters(args.base, _named(args.adapter), task=args.task, quantize=args.quantize,
                                     batch_size=args.max_batch)
    app = create_app(bank, adapter_dir=args.adapter_dir, admin_token=args.admin_token, max_batch=args.max_batch,
                     max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                     batch_wait_ms=args.batch_wait_ms, max_body_bytes=int(args.max_body_mb * 2**20),
                     max_input_tokens=args.max_input_tokens)
    serve(app, args.host, args.port)


def _bank_arguments(p) -> None:
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter folder and the name rows/requests use for it (repeat for more)")
    p.add_argument("--quantize", choices=QUANTIZE, help="load the base in 4 or 8 bits")


def _named(items: list[str]) -> dict:
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PeftkitError(f"--adapter {item!r} must look like NAME=DIR")
        if name in named:
            raise PeftkitError(f"--adapter name {name!r} is given twice")
        named[name] = path
    return named


def _merge(args):
    if args.combine is not None:
        return _combine(args)
    if len(args.runs) > 1 or args.weights is not None or args.density is not None:
        raise PeftkitError(f"merge folds one run into its base; to make one adapter of several give "
                           f"--combine TYPE ({', '.join(COMBINATIONS)}) and --weights")
    from .runs import open_run
    open_run(args.runs[0], as_trained=False).merge(Path(args.out))  # folded into the full-precision base
    print(f"merged model saved to {args.out}")


def _combine(args):
    from .combine import apply_plan, plan_combination
    from .runs import adapter_base
    from .saving import save_adapter
    checked = plan_combination(args.runs, args.combine, _weights(args.weights), args.density)  # before the base loads
    save_adapter(apply_plan(adapter_base(args.runs[0]), checked), Path(args.out))
    print(f"{args.combine} combination of {len(args.runs)} adapters saved to {args.out} (task heads, if any, "
          f"from {args.runs[0]})")


def _weights(text: str | None) -> list[float]:
    try:
        return [float(w) for w in text.split(",")] if text else []
    except ValueError:
        raise PeftkitError(f"--weights {text!r} must be numbers separated by commas, e.g. 0.5,0.5") from None


def _presets(args):
    from .presets import PRESETS_DIR, describe_spec, preset_names, read_yaml
    for name in preset_names():
        print(f"{name:<12} {describe_spec(read_yaml(PRESETS_DIR / f'{name}.yaml'))}")


def _recipes(args):
    from .recipe import RECIPES_DIR, recipe_names
    from .presets import describe_spec, read_yaml
    for name in recipe_names():
        r = read_yaml(RECIPES_DIR / f"{name}.yaml")
        print(f"{name:<22} {r.get('task', '?'):<15} {r.get('model', '?'):<14} "
              f"{r.get('data', {}).get('dataset', '?'):<16} {describe_spec(r.get('method', '?'))}")


def _parse_row(line: str, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise PeftkitError(f"input line {number} is not JSON: {err}") from None
    if not isinstance(row, dict):
        raise PeftkitError(f"input line {number} must be a JSON object")
    return row


COMMANDS = {"train": _train, "sweep": _sweep, "eval": _eval, "predict": _predict, "merge": _merge, "presets": _presets,
            "recipes": _recipes, "bench": run_bench, "serve": _serve}

if __name__ == "__main__":
    sys.exit(main())
