"""Fingerprints of the inputs a run records in its run.json, so a rerun on other inputs is refused.

Data files are hashed whole (they are small). Model folders are fingerprinted from every file's name, each small
file's bytes and, for a big weight file, its size, its safetensors header and evenly spaced sample blocks: a few
MiB read per file however big, instead of every weight byte. Each result is cached for the process.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

# A weight file above this size is fingerprinted from its header, its size and SAMPLE_BLOCKS blocks of
# SAMPLE_SIZE bytes at evenly spaced offsets (16 MiB read per file, however big); smaller files are hashed whole.
SAMPLE_SIZE = 1 << 18
SAMPLE_BLOCKS = 64
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf"})
FULL_HASH_LIMIT = 2 * SAMPLE_SIZE * SAMPLE_BLOCKS


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _sampled_sha256(path: Path, size: int) -> str:
    """Hash of a big weight file: size, safetensors header (every name, dtype, shape and offset, and the
    metadata) and evenly spaced blocks. A change confined to bytes between the blocks goes unseen: the price of
    not reading gigabytes on every command."""
    digest = hashlib.sha256(f"sampled {size}\n".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            digest.update(f.read(n) if 0 < n <= size - 8 else b"bad header")
        for i in range(SAMPLE_BLOCKS):
            f.seek((size - SAMPLE_SIZE) * i // (SAMPLE_BLOCKS - 1))
            digest.update(f.read(SAMPLE_SIZE))
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    size = path.stat().st_size
    if path.suffix in WEIGHT_SUFFIXES and size > FULL_HASH_LIMIT:
        return _sampled_sha256(path, size)
    return sha256_file(path)


_CACHE: dict[tuple[Any, ...], str] = {}


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (names and contents); a non-path (hub id) is kept as given.

    Data files are hashed whole; big weight files are sampled (see `_sampled_sha256`). A result is cached for
    the process while the files keep their size and modification time, so a command hashes each input once.
    """
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
    else:
        return f"id:{path}"
    key = (str(p.resolve()), p.is_dir(), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _CACHE:
        if p.is_file():
            _CACHE[key] = _file_sha256(p)
        else:
            digest = hashlib.sha256()
            for f in files:
                digest.update(f"{f.relative_to(p).as_posix()}:{_file_sha256(f)}\n".encode())
            _CACHE[key] = digest.hexdigest()
    return _CACHE[key]


def model_fingerprint(name: str) -> str:
    """Fingerprint of the model input: its files, or for the packaged default the pinned asset archive."""
    from sqsd import assets
    from sqsd.model import SMOLLM2

    if name == SMOLLM2:
        manifest = assets.read_manifest(SMOLLM2) or {}
        return f"{SMOLLM2}:{manifest.get('archive_sha256', 'missing')}"
    return fingerprint(name)


def data_fingerprints(data: str) -> dict[str, str]:
    """Fingerprints of the data input: the file, each file of a named dataset, or a hub id as given.

    A held-out split (`SOURCE@eval`) is fingerprinted by its source's files plus the split name; a rephrased one
    (`SOURCE@eval-rephrased`) also by the templates' version.
    """
    from sqsd import assets
    from sqsd.data import held_out
    from sqsd.rephrase import VERSION

    parts = held_out(data)
    if parts:
        base, part, rephrased = parts
        out = {f"{key}@{part}": value for key, value in data_fingerprints(base).items()}
        return {**out, "rephrase": VERSION} if rephrased else out

    if Path(data).expanduser().is_file():
        return {"data": fingerprint(Path(data).expanduser())}
    named = assets.named_dataset(data)
    if named is not None:
        return {f"data:{f.name}": fingerprint(f) for f in named.files}
    return {"data": fingerprint(data)}
