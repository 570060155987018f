"""Mistakes in a user's data file get one line naming the file, the line or row, and what would
be valid, before any model is loaded; good files of every layout still load."""
import json
import subprocess
import sys

import pytest

from peftkit.datasource import load_splits
from peftkit.errors import PeftkitError
from peftkit.recipe import load_recipe


def splits_of(path, *overrides):
    return load_splits(load_recipe("sentiment-lora", [f"data.dataset={path}", *overrides]))


def refused(path, match):
    with pytest.raises(PeftkitError, match=match):
        splits_of(path)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


GOOD = [{"text": f"review number {i}", "label": "fresh" if i % 2 else "rotten"} for i in range(40)]


def test_good_csv_jsonl_and_folder_layouts_load(tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("text,label\n" + "".join(f"\"review, number {i}\",{i % 2}\n" for i in range(40)))
    assert sum(len(s) for s in splits_of(csv).values()) == 40
    assert sum(len(s) for s in splits_of(jsonl(tmp_path / "rows.jsonl", GOOD)).values()) == 40
    folder = tmp_path / "folder"
    folder.mkdir()
    jsonl(folder / "train.jsonl", GOOD[:30]), jsonl(folder / "test.jsonl", GOOD[30:])
    splits = splits_of(folder)
    assert len(splits["test"]) == 10 and len(splits["train"]) + len(splits["validation"]) == 30


def test_a_missing_or_empty_label_names_its_line(tmp_path):
    rows = [*GOOD[:2], {"text": "no label here"}, *GOOD[2:]]
    refused(jsonl(tmp_path / "rows.jsonl", rows), r"rows.jsonl, line 3: 'label' is missing; every row needs a label")
    blank_line = tmp_path / "blank.jsonl"  # blank lines are skipped, and the count stays on file lines
    blank_line.write_text(json.dumps(GOOD[0]) + "\n\n" + json.dumps({"text": "x", "label": " "}) + "\n")
    refused(blank_line, r"blank.jsonl, line 3: 'label' is empty")
    csv = tmp_path / "rows.csv"
    csv.write_text("text,label\ngood film,1\nbad film,\n")
    refused(csv, r"rows.csv, row 2: 'label' is missing")


def test_empty_and_non_string_texts_are_refused(tmp_path):
    refused(jsonl(tmp_path / "a.jsonl", [GOOD[0], {"text": "  ", "label": "fresh"}, *GOOD[1:]]),
            r"line 2: 'text' is empty; every row needs a non-empty text")
    refused(jsonl(tmp_path / "b.jsonl", [{"text": 7, "label": "fresh"}, *GOOD]), r"line 1: 'text' is a int, not text")


def test_empty_header_only_and_undecodable_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    refused(empty, r"empty.jsonl is empty; it needs one JSON object per line")
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    refused(header, r"header.csv has a header \(text, label\) but no rows")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ngood,1\nd\xe9j\xe0 vu,0\n".encode("latin-1"))
    refused(latin, r"latin.csv is not UTF-8 text: byte 0xe9 at offset 19 \(line 3\)")


def test_a_truncated_jsonl_line_names_its_number(tmp_path):
    path = jsonl(tmp_path / "rows.jsonl", GOOD)
    with open(path, "a") as f:
        f.write('{"text": "cut off mid-wr')
    refused(path, r"rows.jsonl, line 41: not valid JSON \(Unterminated string")
    path.write_text(json.dumps(GOOD[0]) + "\n[1, 2]\n")
    refused(path, r"line 2: a JSON list, not an object")


def test_the_command_says_it_in_one_line_and_writes_no_run(tmp_path):
    rows = jsonl(tmp_path / "rows.jsonl", [*GOOD, {"text": "no label"}])
    done = subprocess.run([sys.executable, "-m", "peftkit", "train", "sentiment-lora", f"data.dataset={rows}",
                           f"output_dir={tmp_path / 'runs'}"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("peftkit: error: ")
    assert "line 41: 'label' is missing" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()
