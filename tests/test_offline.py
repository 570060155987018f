"""benchmarks/offline.py: files for an offline machine, in bounded parts, checked before use."""
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from peftkit.data import bbc, rotten_tomatoes
from peftkit.embedded import package_dir

ROOT = Path(__file__).resolve().parents[1]


def _load_offline():
    spec = importlib.util.spec_from_file_location("offline", ROOT / "benchmarks" / "offline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


offline = _load_offline()


def _wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel with one member meant to be dropped."""
    folder.mkdir()
    path = folder / "tinypkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("tinypkg/__init__.py", "VALUE = 7\n")
        wheel.writestr("tinypkg/lib_cuda118.so", b"\0" * 1000)
        wheel.writestr("tinypkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n")
        wheel.writestr("tinypkg-0.1.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr("tinypkg-0.1.dist-info/RECORD", "")
    return path


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    base = tmp_path_factory.mktemp("offline")
    wheels = base / "wheels"
    _wheel(wheels)
    manifest = offline.pack(base / "stage", 2, models=[], wheels=wheels, drop=["*cuda118*"])
    return base / "stage", manifest


def test_parts_are_bounded_and_listed(packed):
    stage, manifest = packed
    assert len(manifest["parts"]) > 1
    for part in manifest["parts"]:
        assert (stage / part["name"]).stat().st_size == part["bytes"] <= 2 << 20
    assert sum(p["bytes"] for p in manifest["parts"]) == manifest["stream"]["bytes"]
    assert json.loads((stage / "manifest.json").read_text()) == manifest


def test_unpack_gives_the_same_files_and_installs_trimmed_wheels(packed, tmp_path, monkeypatch):
    stage, _ = packed
    offline.unpack(stage, tmp_path)
    sources = [(dist, inside, package_dir(dist) / inside) for dist, inside in (rotten_tomatoes.SOURCE, bbc.SOURCE)]
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))  # what the far side sets: peftkit must find them there
    for dist, inside, source in sources:
        copied = package_dir(dist) / inside
        assert tmp_path in copied.parents
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        assert files
        for path in files:
            twin = copied if source.is_file() else copied / path.relative_to(source)
            assert twin.read_bytes() == path.read_bytes()
    assert (tmp_path / "site" / "tinypkg" / "__init__.py").read_text() == "VALUE = 7\n"
    assert not (tmp_path / "site" / "tinypkg" / "lib_cuda118.so").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_bad_part_stops_unpack_before_anything_is_extracted(packed, tmp_path, damage):
    stage, manifest = packed
    parts = tmp_path / "parts"
    shutil.copytree(stage, parts)
    victim = parts / manifest["parts"][1]["name"]
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:-1])
    to = tmp_path / "to"
    with pytest.raises(offline.OfflineError, match=f"nothing extracted: {victim.name}"):
        offline.unpack(parts, to)
    assert not to.exists()


def test_unpack_without_manifest_says_so(tmp_path):
    with pytest.raises(offline.OfflineError, match="no manifest.json in"):
        offline.unpack(tmp_path, tmp_path / "to")


def test_packed_stream_holds_no_path_outside_its_root(packed, tmp_path):
    stage, manifest = packed
    with open(tmp_path / "whole.tar", "wb") as whole:
        for part in manifest["parts"]:
            whole.write((stage / part["name"]).read_bytes())
    with tarfile.open(tmp_path / "whole.tar") as tar:
        names = tar.getnames()
    assert all(n.split("/")[0] in ("packages", "wheels") and ".." not in n for n in names)


def test_unpack_needs_neither_peftkit_nor_its_dependencies(packed, tmp_path):
    # on the bare far side, datasets and the pinned transformers arrive inside the parts
    stage, _ = packed
    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('peftkit', 'datasets', 'transformers', 'torch')]"
    run = f"{blocked}; import runpy; runpy.run_path({str(ROOT / 'benchmarks' / 'offline.py')!r}, run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", run, "unpack", "--parts", str(stage), "--to", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "tinypkg" / "__init__.py").is_file()


def test_unknown_model_is_refused_before_writing(tmp_path):
    with pytest.raises(offline.OfflineError, match="unknown model 'bert-huge'.*minilm-l6"):
        offline.pack(tmp_path / "stage", 60, models=["bert-huge"], wheels=None)
    assert not (tmp_path / "stage").exists()
