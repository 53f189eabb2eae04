"""Output folders that remember how they were made.

Every stage writes into a folder that holds its resolved config and the fingerprints of its inputs
(`run.json`). Rerunning the same command into the same folder resumes (the stage reuses what is done); a
rerun with a different config or different inputs refuses unless `overwrite` is set, so a result never sits
next to a config that did not produce it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from sqsd import __version__
from sqsd.config import to_dict
from sqsd.errors import SqsdError

RUN_FILE = "run.json"
# Fields that steer how a run is carried out, not what it computes: they may differ between a run and its resume.
CONTROL_FIELDS = {"overwrite", "resume"}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (names and contents); a non-path (hub id) is kept as given."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        digest = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            digest.update(f"{f.relative_to(p).as_posix()}:{sha256_file(f)}\n".encode())
        return digest.hexdigest()
    return f"id:{path}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if key in CONTROL_FIELDS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def prepare_run(folder: str | os.PathLike, config: Any, inputs: dict[str, str], overwrite: bool = False) -> bool:
    """Create `folder` with run.json, or check it against an earlier run. Returns True when resuming.

    `inputs` maps input names to fingerprints (see `fingerprint`).
    """
    folder = Path(folder)
    record = {"config": to_dict(config), "inputs": inputs, "sqsd_version": __version__}
    run_file = folder / RUN_FILE
    if run_file.exists():
        old = json.loads(run_file.read_text())
        diff = _differences({"config": old.get("config", {}), "inputs": old.get("inputs", {})},
                            {"config": record["config"], "inputs": inputs})
        if not diff:
            return True
        if not overwrite:
            raise SqsdError(f"{folder} holds a run made with a different config or inputs ("
                            + "; ".join(diff[:5]) + ("; ..." if len(diff) > 5 else "")
                            + "); pass --overwrite to replace it, or choose another output folder")
        shutil.rmtree(folder)
    elif folder.exists() and any(folder.iterdir()) and not overwrite:
        raise SqsdError(f"{folder} exists, is not empty and was not made by sqsd; pass --overwrite to replace it")
    elif folder.exists() and overwrite:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_file, record)
    return False


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

    A held-out split (`SOURCE@eval`) is fingerprinted by its source's files plus the split name.
    """
    from sqsd import assets
    from sqsd.data import SPLITS

    base, _, part = data.rpartition("@")
    if base and part in SPLITS and not Path(data).exists():
        return {f"{key}@{part}": value for key, value in data_fingerprints(base).items()}

    if Path(data).expanduser().is_file():
        return {"data": fingerprint(Path(data).expanduser())}
    named = assets.named_dataset(data)
    if named is not None:
        return {f"data:{f.name}": fingerprint(f) for f in named.files}
    return {"data": fingerprint(data)}


def broadcast(state: Any, obj: Any) -> Any:
    """`obj` from rank 0 on every rank of an accelerate `PartialState` (itself when not distributed): how rank 0
    tells the others what it decided about the output folder, so that a refusal stops every rank."""
    if not state.use_distributed:
        return obj
    import torch.distributed

    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
