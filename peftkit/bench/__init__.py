"""`peftkit bench`: what each method trains on a model (`params`), and every method trained on one
recipe side by side (`train`).

    peftkit bench params --model llama-2-70b --method lora --format csv
    peftkit bench train benchmarks/train-sentiment.yaml --only lora,reference train.max_steps=4

This module is the command line only, and imports only the standard library: `peftkit` builds
its parser for every command (and `--help`), so a subcommand's modules, and torch with them, are
imported when it runs. The parts:

    params.py, params_report.py     the parameter counts and their table, csv, json, markdown
    benchfile.py                    a benchmark file: its recipe, shared overrides and variants
    train.py, variant.py            the driver, and one variant trained in its own process
    train_report.py, seeds.py       the training table, JSON and plots; the paired-seeds table
    machine.py                      the machine's description and matmul peaks
"""
import argparse
import sys

FORMATS = ("table", "csv", "json", "markdown")  # of `bench params`; params_report.py renders them
# `bench train --help`: what the benchmark measures, for the user about to run it
TRAIN_DESCRIPTION = """`peftkit bench train`: every method trained on one recipe, side by side, in one run.

    peftkit bench train benchmarks/train-sentiment.yaml
    peftkit bench train benchmarks/train-headlines.yaml --only lora,reference train.max_steps=4

A benchmark file names a recipe, overrides shared by every variant (same data,
seed, steps and batch shape) and the variants: a method preset (optionally on a
4-bit/8-bit base), `full` (every weight trains), `reference` (peft's LoRA
through a plain Trainer script, benchmarks/reference/, the way users write it
today) or `reference-tuned` (the same script with what a knowledgeable Trainer
user adds: length grouping, padding to 8, bf16 where native, fused AdamW). Each
variant trains in its own process, so its peak memory is its own. A file with
`lr_sweep` first trains short runs of each variant at every listed learning
rate and trains its row at the one that scored best on the validation split.

Per variant: trainable ratio, adapter file size, samples/s and tokens/s (real,
non-padding tokens), peak memory while training, the recipe's test metric, and
model FLOP utilization (MFU): the step's model FLOPs (forward 2*N*tokens,
backward through frozen weights 2*N*tokens, weight gradients 2*N_trainable*tokens,
N summed over the linear layers a token passes through) per second, over the
peak matmul FLOP/s measured on this machine in this run in the dtype the variant
computes in (fp32, or bf16 under autocast). Results: a markdown
table, a JSON file, the loss curves and a trainable-ratio vs metric chart.
"""


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench params ...` and `bench train ...` to the peftkit command's subparsers."""
    bench = subparsers.add_parser("bench", help="benchmarks: parameter counts per method; training side by side")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    _add_params(kinds)
    _add_train(kinds)
    return bench


def run_bench(args) -> int:
    return _train(args) if args.bench_command == "train" else _params(args)


def main(argv=None) -> int:
    """`python -m peftkit.bench params ...`, the same command before it is wired into `peftkit`."""
    from ..errors import PeftkitError

    parser = argparse.ArgumentParser(prog="peftkit")  # usage then reads as the wired command
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_bench(args)
    except PeftkitError as err:
        print(f"peftkit: error: {err}", file=sys.stderr)
        return 2


def _add_params(kinds) -> None:
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


def _add_train(kinds) -> None:
    p = kinds.add_parser("train", help="train every method on a recipe side by side: speed, memory, MFU, metric",
                         description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", help="a benchmark file, e.g. benchmarks/train-sentiment.yaml")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides for every variant, e.g. train.max_steps=4")
    p.add_argument("--only", help="comma-separated variant names to run")
    # no default value here: the results folder is found from the installed package, which the parser doesn't import
    p.add_argument("--out", help="folder for the results (default benchmarks/results)")
    p.add_argument("--seeds", help="train every variant at each of these seeds (e.g. 1-8) and pair them "
                                   "seed by seed: metric difference with its interval, speed and memory ratios")
    p.add_argument("--against", help="with --seeds: the variant the others are paired with "
                                     "(default reference-tuned)")


def _params(args) -> int:
    import warnings

    from ..errors import PeftkitError
    from .params import param_table, shipped_configs
    from .params_report import format_rows

    models = list(args.model) + (shipped_configs() if args.shipped else [])
    if not models:
        raise PeftkitError("give --model NAME_OR_CONFIG (repeatable) or --shipped; shipped configs: "
                           + ", ".join(shipped_configs()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from transformers/peft about meta models
        tables = [param_table(m, args.method, args.task) for m in models]
    print(format_rows(tables, args.format, _params_command(args)), end="")
    return 0


def _params_command(args) -> str:
    """The command line that made this table, for the markdown report's "regenerate with"."""
    import shlex

    parts = ["peftkit", "bench", "params"]
    parts += [x for m in args.model for x in ("--model", m)]
    parts += ["--shipped"] if args.shipped else []
    parts += [x for m in (args.method or []) for x in ("--method", m)]
    parts += ["--task", args.task] if args.task else []
    parts += ["--format", args.format]
    return shlex.join(parts)


def _train(args) -> int:
    from pathlib import Path

    from ..errors import PeftkitError
    from .benchfile import RESULTS_DIR, load_bench, repo_path, selected
    from .seeds import parse_seeds, run_seeds
    from .train import run

    bench = load_bench(repo_path(args.bench))
    only = args.only.split(",") if args.only else None
    out = Path(args.out) if args.out else RESULTS_DIR
    if args.seeds:
        seeds = parse_seeds(args.seeds)
        if any(item.startswith("train.seed=") for item in args.overrides):
            raise PeftkitError("--seeds sets train.seed for every run; drop the train.seed override")
        if bench.lr_sweep:
            raise PeftkitError(f"--seeds trains at fixed learning rates, and {args.bench} sweeps them (lr_sweep): "
                               "run it without --seeds, or pair seeds on a file that sets each variant's train.lr")
        run_seeds(bench, seeds, args.overrides, selected(bench, only, args.overrides), out,
                  Path("runs") / "bench", args.against)
    elif args.against:
        raise PeftkitError("--against pairs seeds: use it with --seeds")
    else:
        run(bench, args.overrides, only, out)
    return 0
