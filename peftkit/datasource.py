"""A recipe's data: an embedded data set, a local file or folder, or a hub id,
always as train/validation/test splits."""
from pathlib import Path

from datasets import DatasetDict, load_dataset

from .errors import PeftkitError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLITS = ("train", "validation", "test")


def load_splits(data, seed: int) -> DatasetDict:
    """DatasetDict with train/validation/test, cut to the recipe's sample limits."""
    splits = _load(data.dataset, seed)
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


def require_columns(splits: DatasetDict, columns: list[str], dataset: str) -> None:
    present = splits["train"].column_names
    for column in columns:
        if column not in present:
            raise PeftkitError(f"{dataset} has no column {column!r}; its columns: {', '.join(present)}")


def _load(dataset: str, seed: int) -> DatasetDict:
    from .data import EMBEDDED_DATASETS, load_embedded, load_squad_json

    if dataset in EMBEDDED_DATASETS:
        return load_embedded(dataset)
    path = Path(dataset).expanduser()
    if path.is_file() and path.suffix == ".json" and _is_squad(path):
        return _split(DatasetDict({"train": load_squad_json(path)}), seed)
    if path.is_file():
        if path.suffix not in FORMATS:
            raise PeftkitError(f"{path}: unsupported file type; use one of {', '.join(FORMATS)}")
        return _split(load_dataset(FORMATS[path.suffix], data_files=str(path)), seed)
    if path.is_dir():
        files = {s: sorted(str(p) for p in path.glob(f"{s}.*") if p.suffix in FORMATS) for s in SPLITS}
        found = {s: f for s, f in files.items() if f}
        if not found:
            raise PeftkitError(f"{path} holds no train/validation/test file ({', '.join(FORMATS)})")
        kind = FORMATS[Path(next(iter(found.values()))[0]).suffix]
        return _split(load_dataset(kind, data_files=found), seed)
    if dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:
        raise PeftkitError(
            f"data file {dataset} does not exist; give a local file or folder, a hub dataset id, "
            f"or an embedded data set ({', '.join(EMBEDDED_DATASETS)})")
    try:
        return _split(load_dataset(dataset), seed)
    except Exception as err:  # the hub is a network service: say what failed, not a traceback
        raise PeftkitError(f"could not load data set {dataset!r} from the hub: {err}") from None


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
