"""Output folders (and files) that remember how they were made: the one protocol of every command that writes.

`open_run(path, config, inputs)` claims an output folder, or with `file=True` an output file and its sidecar
`<file>.run.json`, and says what the command finds there:
- "fresh": nothing of this run yet (the folder was missing or empty, or `overwrite` cleared an older run);
- "resume": an earlier run of the same config and inputs stopped part-way; reuse what it wrote;
- "done": an earlier run of the same config and inputs finished (`Run.finish` stored its `result`).
A run with a different config or different inputs refuses unless `overwrite`, which then removes only what sqsd
wrote there (the manifest `files` of run.json), never an input of the command; a non-empty folder without
run.json (or a file without its sidecar) was not made by sqsd and is always refused. Fields that say where the
output goes or how a run proceeds (CONTROL_FIELDS) are not compared, and inputs are compared by their
fingerprints, not by their paths, so the same folder or input spelt another way, or moved, is the same run.

While a command writes, it holds a lock (`fcntl.flock` on `.sqsd.lock` in the folder, `.<name>.lock` beside a
file): a second command into the same place refuses at once instead of redoing or duplicating the work.

Under a distributed launcher pass the accelerate `PartialState`: rank 0 alone fingerprints the inputs, decides
and writes; the other ranks get its decision, or its refusal, through `broadcast`. `on_main` runs a whole command
on rank 0 while the others wait.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from sqsd import __version__
from sqsd.config import to_dict
from sqsd.errors import SqsdError

RUN_FILE = "run.json"
LOCK_FILE = ".sqsd.lock"
# Fields that say where the output goes or how a run is carried out, not what it computes.
CONTROL_FIELDS = frozenset({"overwrite", "resume", "output_dir", "output", "config"})  # config: a YAML path
T = TypeVar("T")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_record(path: Path) -> dict[str, Any]:
    """run.json (or a sidecar), with a clear error when an earlier run left it unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        record = f"not valid JSON ({e})"
    if not isinstance(record, dict):
        raise SqsdError(f"{path} is corrupt ({record if isinstance(record, str) else 'not a JSON object'}); it "
                        "records how the output beside it was made: restore it, or move that output away and "
                        "run again to start afresh")
    return record


def _differences(old: dict[str, Any], new: dict[str, Any], skip: Iterable[str] = (),
                 prefix: str = "config.") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key not in skip and a != b and not _same_path(a, b):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _same_path(a: Any, b: Any) -> bool:
    """Two spellings of one existing file or folder (`./d.jsonl`, `d.jsonl`, an absolute path)."""
    try:
        return isinstance(a, str) and isinstance(b, str) and os.path.samefile(a, b)
    except OSError:
        return False


def _compare(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...],
             input_fields: tuple[str, ...]) -> str | list[str]:
    """"done" or "resume" when `old` is a run of the same config and inputs, else the differences."""
    skip = CONTROL_FIELDS | set(input_fields)
    before = old.get("config", {})
    diff = (_differences(before, new["config"], skip | set(ignore))
            + _differences(old.get("inputs", {}), new["inputs"], prefix="inputs."))
    if diff:
        return diff
    return "done" if "result" in old and not _differences(before, new["config"], skip) else "resume"


@dataclass
class Run:
    """A claimed output folder or file: what was found (`state`), its record (run.json or the sidecar:
    config, inputs, manifest, result) and, on rank 0, the lock. Use it as a context manager: leaving it
    updates the manifest and releases the lock."""

    path: Path
    record_file: Path
    state: str
    record: dict[str, Any]
    main: bool = True
    keep: tuple[Path, ...] = ()
    lock: IO | None = field(default=None, repr=False)

    @property
    def inputs(self) -> dict[str, Any]:
        return self.record.get("inputs", {})

    @property
    def result(self) -> dict[str, Any] | None:
        return self.record.get("result")

    def finish(self, result: dict[str, Any]) -> None:
        """Mark the run done with a summary of what it produced (written by rank 0 only)."""
        self.record = {**self.record, "result": result}
        self._save()

    def close(self) -> None:
        if self.lock is not None:
            if self.state != "done":
                self._save()
            self.lock.close()  # releases the flock
            self.lock = None

    def _save(self) -> None:
        if self.main:
            if self.record_file.name == RUN_FILE:
                self.record["files"] = _manifest(self.path, self.record.get("files", []), self.keep)
            write_json_atomic(self.record_file, self.record)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name != LOCK_FILE}


def _manifest(folder: Path, files: Iterable[str], keep: tuple[Path, ...]) -> list[str]:
    """What sqsd wrote in `folder`: the files named before plus everything there now, except the command's own
    inputs (an input that lives inside the folder stays the user's)."""
    current = {name for name in _entries(folder) if not any(_within(k, folder / name) for k in keep)}
    return sorted((set(files) | current) - {RUN_FILE})


def _within(path: Path, folder: Path) -> bool:
    folder = folder.resolve()
    return path == folder or folder in path.parents


def _lock(path: Path, what: Path, flag: str) -> IO:
    handle = open(path, "a")  # noqa: SIM115 - held open for as long as the run holds the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SqsdError(f"{flag} {what}: another sqsd command is writing it right now (lock {path}); wait for "
                        f"it to finish, or choose another {flag}") from None
    return handle


def _reuse(run: Run, old: dict[str, Any], overwrite: bool, flag: str, ignore: tuple[str, ...],
           input_fields: tuple[str, ...]) -> bool:
    """True when `old` (the record found) is a run of the same config and inputs: `run` continues it ("resume",
    with what a killed run wrote added to the manifest) or takes its record ("done"). False when it is another
    run and `overwrite` is set (the caller removes it); otherwise a refusal naming the differences."""
    diff = _compare(old, run.record, ignore, input_fields)
    if isinstance(diff, list):
        if overwrite:
            return False
        raise SqsdError(f"{flag} {run.path} holds a run made with a different config or inputs ("
                        + "; ".join(diff[:5]) + ("; ..." if len(diff) > 5 else "")
                        + f"); pass --overwrite to replace it (removing what that run wrote), or choose another "
                        f"{flag}")
    run.state = diff
    if diff == "done":
        run.record = old
    else:
        if "files" in old:
            run.record["files"] = old["files"]
        run._save()
    return True


def output_folder(folder: Path, flag: str) -> Path:
    """Create the output folder `folder` (given by `flag`), or say clearly why it cannot be one."""
    if folder.exists() and not folder.is_dir():
        raise SqsdError(f"{flag} {folder}: is a file, not a folder; choose another {flag}")
    return _mkdir(folder, flag, folder)


def output_file(output: Path, flag: str) -> Path:
    """Create the folder of the output file `output` (given by `flag`), or say clearly why it cannot be one."""
    if output.is_dir():
        raise SqsdError(f"{flag} {output}: is a folder, not a file; name a file")
    _mkdir(output.parent, flag, output)
    return output


def _mkdir(folder: Path, flag: str, named: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SqsdError(f"{flag} {named}: a parent of it is a file, not a folder") from None
    return folder


def _claim_folder(folder: Path, record: dict[str, Any], overwrite: bool, keep: tuple[Path, ...], flag: str,
                  ignore: tuple[str, ...], input_fields: tuple[str, ...]) -> Run:
    output_folder(folder, flag)
    run_file = folder / RUN_FILE
    if not run_file.exists() and _entries(folder):
        raise SqsdError(f"{flag} {folder}: the folder is not empty and was not made by sqsd (no {RUN_FILE}); "
                        f"choose another {flag} (--overwrite only replaces what sqsd itself wrote)")
    run = Run(folder, run_file, "fresh", record, keep=keep, lock=_lock(folder / LOCK_FILE, folder, flag))
    try:
        if run_file.exists():
            old = read_record(run_file)
            if _reuse(run, old, overwrite, flag, ignore, input_fields):
                return run
            _clear(folder, old, keep)
        run.record["files"] = []
        run._save()
        return run
    except BaseException:
        run.lock.close()  # type: ignore[union-attr]
        raise


def _clear(folder: Path, old: dict[str, Any], keep: tuple[Path, ...]) -> None:
    """Remove what an earlier run wrote (its manifest; a run.json from before manifests: the whole folder),
    refusing when that would delete an input of this command."""
    names = old["files"] if "files" in old else sorted(_entries(folder))
    for name in names:
        target = folder / name
        inside = [k for k in keep if _within(k, target)]
        if inside:
            raise SqsdError(f"--overwrite would delete {target}, which holds {inside[0]}, an input of this "
                            "command; choose another output folder")
    for name in names:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    (folder / RUN_FILE).unlink(missing_ok=True)


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".run.json")


def _claim_file(output: Path, record: dict[str, Any], overwrite: bool, flag: str, ignore: tuple[str, ...],
                input_fields: tuple[str, ...]) -> Run:
    output_file(output, flag)
    sidecar = sidecar_path(output)
    run = Run(output, sidecar, "fresh", record, lock=_lock(output.with_name(f".{output.name}.lock"), output, flag))
    try:
        if output.exists():
            if not sidecar.exists():
                raise SqsdError(f"{flag} {output} exists but has no {sidecar.name}, so it was not made by sqsd; "
                                f"choose another {flag}, or move the file away")
            if _reuse(run, read_record(sidecar), overwrite, flag, ignore, input_fields):
                return run
            output.unlink()
        run._save()
        return run
    except BaseException:
        run.lock.close()  # type: ignore[union-attr]
        raise


def open_run(path: str | os.PathLike, config: Any, inputs: dict[str, Any] | Callable[[], dict[str, Any]], *,
             input_fields: tuple[str, ...] = (), ignore: tuple[str, ...] = (), overwrite: bool = False,
             state: Any = None, file: bool = False, flag: str | None = None) -> Run:
    """Claim `path` for a run of `config` on `inputs` (name -> fingerprint; a callable is called on rank 0 only).

    `input_fields`: the config fields that name the inputs fingerprinted in `inputs`; they are compared by those
    fingerprints, not by how the path is spelt (a moved input is the same input), and `overwrite` never removes
    what they name. `ignore`: config fields that may change between a run and its resume (how much is done, how
    fast); a run is "done" only when they match too. `state`: an accelerate PartialState under a launcher (rank
    0 decides, the others get its decision; only rank 0 holds the lock and writes). `flag` names the output in
    messages.
    """
    path = Path(path)
    flag = flag or ("--output" if file else "--output-dir")
    main = state is None or state.is_main_process
    decision: Any = None
    run: Run | None = None
    if main:
        try:
            record = {"config": to_dict(config), "inputs": inputs() if callable(inputs) else inputs,
                      "sqsd_version": __version__}
            if file:
                run = _claim_file(path, record, overwrite, flag, ignore, input_fields)
            else:
                named = [getattr(config, f) for f in input_fields]
                paths = [p for v in named for p in (v if isinstance(v, (tuple, list)) else [v]) if isinstance(p, str)]
                kept = tuple(Path(p).resolve() for p in paths if Path(p).exists())
                run = _claim_folder(path, record, overwrite, kept, flag, ignore, input_fields)
            decision = (run.state, run.record)
        except SqsdError as e:
            decision = e
    decision = broadcast(state, decision)
    if isinstance(decision, SqsdError):
        raise decision
    if run is None:
        run = Run(path, sidecar_path(path) if file else path / RUN_FILE, decision[0], decision[1], main=False)
    return run


def last_good_checkpoint(output_dir: Path) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest Trainer checkpoint-N folder of a run that is complete, and (name, problem) of the newer ones
    that are not (a kill while the Trainer was saving leaves files missing or cut short)."""
    found = sorted((p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                   key=lambda p: int(p.name[11:]), reverse=True)
    bad = []
    for folder in found:
        problem = _checkpoint_problem(folder)
        if problem is None:
            return str(folder), bad
        bad.append((folder.name, problem))
    return None, bad


def _checkpoint_problem(folder: Path) -> str | None:
    names = {p.name for p in folder.iterdir()}
    for needed in ("trainer_state.json", "optimizer.pt"):
        if needed not in names:
            return f"no {needed}"
    if not names & {"adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json"}:
        return "no weights"
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                if path.stat().st_size != 8 + n + end:
                    return f"{path.name} is cut short"
            elif path.suffix in (".pt", ".pth", ".bin"):
                zipfile.ZipFile(path).close()  # torch.save writes a zip; a cut one has no central directory
        except (ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
            return f"{path.name} is unreadable: {e}"
    return None


_on_main_depth = 0


def on_main(fn: Callable[[], T], device: str = "cpu") -> T:
    """Run a command that writes files on rank 0 only: under a launcher the other ranks wait for it and return
    its result (or raise its error), so N processes never write the same output N times. A single process (no
    launcher's WORLD_SIZE) just runs it, without setting up accelerate's state."""
    global _on_main_depth
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _on_main_depth:  # or inside another on_main: on rank 0
        return fn()
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    out: Any = None
    if state.is_main_process:
        _on_main_depth += 1
        try:
            out = fn()
        except Exception as e:
            broadcast(state, SqsdError(f"rank 0 failed: {e}"))
            raise
        finally:
            _on_main_depth -= 1
    out = broadcast(state, out)
    if isinstance(out, SqsdError):
        raise out
    return out


def broadcast(state: Any, obj: Any) -> Any:
    """`obj` from rank 0 on every rank of an accelerate `PartialState` (itself when not distributed or when
    `state` is None): how rank 0 tells the others what it decided, so that a refusal stops every rank."""
    if state is None or not state.use_distributed:
        return obj
    import torch.distributed

    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
