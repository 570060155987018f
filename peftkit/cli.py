"""The `peftkit` command: train, eval, predict, merge, presets, recipes."""
import argparse
import json
import sys
from pathlib import Path

from .bench import add_bench_parser, run_bench
from .errors import PeftkitError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="peftkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train, evaluate and export an adapter from a recipe")
    p.add_argument("recipe", help="a recipe YAML file or the name of a shipped recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method=houlsby train.epochs=2")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")

    p = commands.add_parser("eval", help="evaluate a run on a split of its data")
    p.add_argument("run")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])

    p = commands.add_parser("predict", help="one JSON object per line in, one out")
    p.add_argument("run")
    p.add_argument("--input", required=True, help="a .jsonl file, or - for standard input")

    p = commands.add_parser("merge", help="fold a LoRA run into its base and save a plain model")
    p.add_argument("run")
    p.add_argument("--out", required=True)

    commands.add_parser("presets", help="list the method presets in adapters/")
    commands.add_parser("recipes", help="list the shipped recipes")
    add_bench_parser(commands)

    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except PeftkitError as err:
        print(f"peftkit: error: {err}", file=sys.stderr)
        return 2


def _train(args):
    from .recipe import load_recipe
    from .train import train
    train(load_recipe(args.recipe, args.overrides), resume=args.resume)


def _eval(args):
    from .runs import open_run
    run = open_run(args.run)
    print(json.dumps(run.evaluate(args.split), indent=2))


def _predict(args):
    from .runs import open_run
    run = open_run(args.run)
    source = sys.stdin if args.input == "-" else open(args.input)
    rows = [_parse_row(line, n) for n, line in enumerate(source, 1) if line.strip()]
    for row in run.predict(rows):
        print(json.dumps(row))


def _merge(args):
    from .runs import open_run
    open_run(args.run).merge(Path(args.out))
    print(f"merged model saved to {args.out}")


def _presets(args):
    from .presets import PRESETS_DIR, preset_names, read_yaml
    for name in preset_names():
        options = read_yaml(PRESETS_DIR / f"{name}.yaml")
        print(f"{name:<12} " + " ".join(f"{k}={v}" for k, v in options.items()))


def _recipes(args):
    from .recipe import RECIPES_DIR, recipe_names
    from .presets import read_yaml
    for name in recipe_names():
        r = read_yaml(RECIPES_DIR / f"{name}.yaml")
        print(f"{name:<22} {r.get('task', '?'):<15} {r.get('model', '?'):<14} {r.get('method', '?')!s:<10} "
              f"{r.get('data', {}).get('dataset', '?')}")


def _parse_row(line: str, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise PeftkitError(f"input line {number} is not JSON: {err}") from None
    if not isinstance(row, dict):
        raise PeftkitError(f"input line {number} must be a JSON object")
    return row


COMMANDS = {"train": _train, "eval": _eval, "predict": _predict, "merge": _merge, "presets": _presets,
            "recipes": _recipes, "bench": run_bench}

if __name__ == "__main__":
    sys.exit(main())
