"""What the scripts in benchmarks/ share: the command line that wrote a result, and writing a
result as JSON (raw) and markdown (read) side by side."""
import json
import sys
from pathlib import Path


def script_command(script: str, argv=None) -> str:
    """`python benchmarks/<script> ...` as it was run, for the file's "Regenerate" line."""
    return " ".join([f"python benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def write_result(out_dir, stem: str, result: dict, markdown: str) -> None:
    """<out_dir>/<stem>.json and .md, each written whole or not at all; the markdown is printed too."""
    from ..saving import atomic_write

    out = Path(out_dir) / stem
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    atomic_write(out.with_suffix(".md"), markdown)
    print(markdown)
