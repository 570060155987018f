"""A recipe's data: an embedded data set, a local file or folder, or a hub id,
always as train/validation/test splits.

Every mistake in the data is refused with one line naming the file, the line or row, and what
would be valid, before a model is loaded: an empty or header-only file, bytes that are not
UTF-8, a JSONL line that is not one JSON object, a missing column, and a row whose text is
empty or not a string or whose label (or answer) is missing. Empty texts are refused, not
skipped: dropping rows silently would change what the metrics count.
"""
import csv
import io
import json
from pathlib import Path

from datasets import DatasetDict, load_dataset

from .errors import PeftkitError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLITS = ("train", "validation", "test")


def load_splits(recipe) -> DatasetDict:
    """DatasetDict with train/validation/test, checked for the recipe's task and cut to its sample limits."""
    from .tasks import task_module

    data, seed = recipe.data, recipe.train.seed
    splits = _load(data.dataset, seed, task_module(recipe.task).columns(data))
    for name in SPLITS:
        if len(splits[name]) == 0:
            raise PeftkitError(f"the {name} split of {data.dataset} is empty")
    if data.max_train_samples:
        splits["train"] = splits["train"].shuffle(seed=seed).select(range(min(data.max_train_samples,
                                                                                len(splits["train"]))))
    if data.max_eval_samples:
        for name in ("validation", "test"):
            splits[name] = splits[name].select(range(min(data.max_eval_samples, len(splits[name]))))
    return splits


def _load(dataset: str, seed: int, columns: dict[str, str]) -> DatasetDict:
    from .data import EMBEDDED_DATASETS, load_embedded, load_squad_json

    if dataset in EMBEDDED_DATASETS:
        return _checked(load_embedded(dataset), columns, dataset)
    path = Path(dataset).expanduser()
    if path.is_file() and path.suffix == ".json" and _is_squad(path):
        return _split(_checked(DatasetDict({"train": load_squad_json(path)}), columns, str(path)), seed)
    if path.is_file():
        if path.suffix not in FORMATS:
            raise PeftkitError(f"{path}: unsupported file type; use one of {', '.join(FORMATS)}")
        lines = check_file(path)
        splits = _read(FORMATS[path.suffix], str(path), path)
        check_rows(splits["train"], columns, str(path), lines)
        return _split(splits, seed)
    if path.is_dir():
        files = {s: sorted(str(p) for p in path.glob(f"{s}.*") if p.suffix in FORMATS) for s in SPLITS}
        found = {s: f for s, f in files.items() if f}
        if not found:
            raise PeftkitError(f"{path} holds no train/validation/test file ({', '.join(FORMATS)})")
        kinds = {Path(f).suffix for fs in found.values() for f in fs}
        if len({FORMATS[k] for k in kinds}) > 1:
            raise PeftkitError(f"{path} mixes file types ({', '.join(sorted(kinds))}); use one format for every split")
        lines = {name: [check_file(Path(f)) for f in fs] for name, fs in found.items()}
        splits = _read(FORMATS[kinds.pop()], found, path)
        for name, fs in found.items():
            single = len(fs) == 1  # rows map to one file's lines
            check_rows(splits[name], columns, fs[0] if single else f"the {name} files of {path}",
                       lines[name][0] if single else None)
        return _split(splits, seed)
    if dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:
        raise PeftkitError(
            f"data file {dataset} does not exist; give a local file or folder, a hub dataset id, "
            f"or an embedded data set ({', '.join(EMBEDDED_DATASETS)})")
    try:
        splits = load_dataset(dataset)
    except Exception as err:  # the hub is a network service: say what failed, not a traceback
        raise PeftkitError(f"could not load data set {dataset!r} from the hub: {err}") from None
    return _split(_checked(splits, columns, dataset), seed)


def _checked(splits, columns: dict[str, str], dataset: str):
    for name in splits:
        check_rows(splits[name], columns, f"the {name} split of {dataset}")
    return splits


def _read(kind: str, files, path: Path) -> DatasetDict:
    try:
        return load_dataset(kind, data_files=files)
    except Exception as err:  # the reader's own message (a CSV row with extra cells, ...), in one line
        raise PeftkitError(f"could not read {path} as {kind}: {str(err).splitlines()[0]}") from None


def check_file(path: Path) -> list[int] | None:
    """Refuse a file that cannot hold rows. For JSONL, the line number of each row (blank lines
    are skipped, as the reader skips them), so row errors can name the line."""
    if path.suffix == ".parquet":
        return None  # binary, checked by its reader
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise PeftkitError(f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} "
                           f"(line {line}) cannot be decoded; save the file as UTF-8") from None
    if not text.strip():
        raise PeftkitError(f"{path} is empty; it needs {_EXPECTED[path.suffix]}")
    if path.suffix == ".csv":
        rows = csv.reader(io.StringIO(text))
        header = next(rows)
        if not any(any(cell.strip() for cell in row) for row in rows):
            raise PeftkitError(f"{path} has a header ({', '.join(header)}) but no rows")
        return None
    if path.suffix == ".json" and text.lstrip()[:1] in "[{":
        try:
            json.loads(text)
            return None  # one JSON document; the reader takes it as a whole
        except json.JSONDecodeError:
            pass  # JSON lines under a .json name
    numbers = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PeftkitError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}); "
                               "each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise PeftkitError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object; "
                               "each line must be one JSON object such as {\"text\": ..., \"label\": ...}")
        numbers.append(number)
    return numbers


_EXPECTED = {".csv": "a header line and one row per example",
             ".jsonl": "one JSON object per line", ".json": "one JSON object per line"}


def check_rows(rows, columns: dict[str, str], where: str, lines: list[int] | None = None) -> None:
    """Every column the task reads is there, and every row's cell holds what the task needs:
    `text` a non-empty string, `label` and `answers` a value."""
    present = rows.column_names
    for column in columns:
        if column not in present:
            raise PeftkitError(f"{where} has no column {column!r}; its columns: {', '.join(present)} "
                               f"(set the recipe's data keys to the columns your data uses)")
    for column, kind in columns.items():
        for index, value in enumerate(rows[column]):
            problem = _cell_problem(value, kind)
            if problem:
                at = f"line {lines[index]}" if lines else f"row {index + 1}"
                raise PeftkitError(f"{where}, {at}: {column!r} {problem}; fill it in or remove the row")


NEEDS = {"text": "a non-empty text", "label": "a label", "answers": "its answers"}


def _cell_problem(value, kind: str) -> str | None:
    if value is None:  # a JSONL row without the key, or an empty CSV cell
        return f"is missing; every row needs {NEEDS[kind]}"
    if kind == "text" and not isinstance(value, str):
        return f"is a {type(value).__name__}, not text"
    if isinstance(value, str) and not value.strip():
        return f"is empty; every row needs {NEEDS[kind]}"
    return None


def _split(splits: DatasetDict, seed: int) -> DatasetDict:
    """Make the missing validation/test splits from train (seeded 80/10/10)."""
    splits = DatasetDict(splits)
    if "train" not in splits:
        raise PeftkitError(f"the data has splits {list(splits)} but no train split")
    if "test" not in splits:
        parts = splits["train"].train_test_split(test_size=0.1, seed=seed)
        splits["train"], splits["test"] = parts["train"], parts["test"]
    if "validation" not in splits:
        parts = splits["train"].train_test_split(test_size=1 / 9, seed=seed)
        splits["train"], splits["validation"] = parts["train"], parts["test"]
    return splits


def _is_squad(path: Path) -> bool:
    with open(path) as f:
        head = f.read(100_000)
    return head.lstrip().startswith("{") and '"data"' in head
