"""Read datasets of any supported shape into one record type, with errors that name the file, line and field.

A source is a local file (`.jsonl`/`.ndjson`, `.json`, `.csv`/`.tsv`, `.parquet`, `.txt`), a named dataset
(`sqsd.assets.named_dataset`, e.g. `dolly-sqsd` or `dolly-sqsd:S1`) or a Hugging Face dataset id (`owner/name`).
Readers (`sqsd.readers`, which also says what of a field they keep) turn a file into raw field dicts; format
parsers (`sqsd.formats`: alpaca, dolly, messages, prompt-completion, beavertails, pku-saferlhf, prompts) turn a
field dict into a `Record`. The format is
detected once, from the field names of the first record, unless given explicitly.

Where a record sits: JSONL, CSV and TXT records are numbered by their 1-based line in the file (a CSV header is
line 1, so its first record is line 2; a record spanning several lines is numbered by its first line); JSON
arrays, Parquet files and Hugging Face datasets by their 0-based row index. `DataError` says "line" or "row"
accordingly.

Held-out splits: `SOURCE@align`, `SOURCE@directions` and `SOURCE@eval` (e.g. `harmbench@eval`) keep a fixed
part of any source, chosen by hashing each record id, so the three never share a record and do not depend on
file order. Alignment trains on `@align`, danger/safety directions and anchor adapters on `@directions`, and
every safety or over-refusal measurement uses `@eval` (see `SPLITS`). `SOURCE@align-rephrased` and
`SOURCE@eval-rephrased` are the same records, each request rephrased (past/future tense, indirect,
hypothetical, fiction, third person) by that split's template family (`sqsd.rephrase`), with ids `ID-rephrased`.

Bad records either stop the load (`on_bad_record="error"`) or are listed in `LoadedData.bad` and left out
("skip"); nothing is dropped silently. Problems with a whole file (empty, not UTF-8, not valid JSON, format
not detectable, a required column missing) always stop the load.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqsd.errors import DataError, SqsdError
from sqsd.formats import (
    PARSERS,
    REQUIRED,
    RESPONSE_FIELDS,
    Messages,
    RawRecord,
    detect_format,
    type_name,
    undetectable,
)
from sqsd.options import DATA_FORMATS, DataArgs
from sqsd.readers import READERS, json_value
from sqsd.rephrase import FAMILIES, SUFFIX, rephrase_record

__all__ = ["SPLITS", "BadRecord", "LoadedData", "Record", "detect_format", "held_out", "load_from_config",
           "load_records", "split_of"]

# Held-out split fractions, in order. Changing them (or the salt) changes every split: bump the salt's version.
SPLITS: dict[str, float] = {"align": 0.4, "directions": 0.3, "eval": 0.3}
_SPLIT_SALT = "sqsd-split-v1"


def split_of(record_id: str) -> str:
    """The held-out split a record belongs to: a pure function of its id (stable across files and orders)."""
    u = int.from_bytes(hashlib.sha256(f"{_SPLIT_SALT}:{record_id}".encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in SPLITS.items():
        edge += fraction
        if u < edge:
            return name
    return name


def held_out(data: str) -> tuple[str, str, bool] | None:
    """(source, split, rephrased) when `data` names a held-out split of a source (`harmbench@eval`,
    `harmbench@eval-rephrased`) rather than a file; else None."""
    base, _, part = data.rpartition("@")
    split = part.removesuffix(SUFFIX)
    rephrased = split != part
    if base and ((split in FAMILIES) if rephrased else (split in SPLITS)) and not Path(data).exists():
        return base, split, rephrased
    return None


@dataclass(frozen=True)
class Record:
    """One training or benchmark sample in a format-independent shape.

    `id` is the record's own `id` (else `uid`) field, else `"{file name or named part}:{row}"`; `row` is the
    1-based line (JSONL/CSV/TXT) or 0-based row (JSON array/Parquet/HF dataset), see the module docstring.
    `prompt` holds the chat messages before the response; `response` is None for prompt-only (benchmark)
    records; `meta` keeps every other input field so outputs can carry it along.
    """

    id: str
    source: str
    row: int
    prompt: Messages
    response: str | None
    meta: dict[str, Any]

    def messages_line(self, response: str | None = None) -> dict[str, Any]:
        """The record as one chat-messages line that keeps its id (`response` replaces its own), the shape every
        file the tool writes for training takes."""
        answer = self.response if response is None else response
        return {"id": self.id, "messages": [*self.prompt, {"role": "assistant", "content": answer}]}

    def prompt_key(self) -> str:
        """The prompt as a string: records with the same prompt have the same key."""
        return json.dumps(self.prompt, sort_keys=True)


@dataclass(frozen=True)
class BadRecord:
    """A record left out in skip mode; `reason` is the full DataError message (file, line/row, field, what)."""

    source: str
    row: int
    reason: str


@dataclass
class LoadedData:
    """The records of one load, the format used, the sources read, and the records left out."""

    records: list[Record]
    format: str
    sources: tuple[str, ...]
    bad: list[BadRecord] = field(default_factory=list)


# --- sources ---------------------------------------------------------------------------------------------------

@dataclass
class _Source:
    """One file (or hub split) to read, with what records and errors should call it."""

    name: str  # Record.source
    file: str  # what error messages name
    id_prefix: str  # automatic ids are f"{id_prefix}:{row}"
    rows: Iterator[RawRecord | DataError]  # lazy: file-level errors surface when reading starts
    format: str | None = None  # the format this source implies (.txt, named datasets), used when format="auto"
    tabular: bool = False  # every row has the same columns, so a missing required field is a file problem
    meta: dict[str, Any] = field(default_factory=dict)  # defaults for every record's meta
    empty: str = "file is empty"


# owner/name, as on the Hugging Face hub; anything else that is not a file is reported as a missing file
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# named datasets whose file stems carry a label, kept in each record's meta under this key
_STEM_META = {"donotanswer": "risk_area"}


def _file_source(path: Path, name: str, file: str, id_prefix: str, **kw: Any) -> _Source:
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise SqsdError(f"{file}: unsupported file type {suffix or '(no extension)'!r}; use one of "
                        f"{', '.join(READERS)}")
    kw.setdefault("format", "prompts" if suffix == ".txt" else None)
    tabular = suffix in (".csv", ".tsv", ".parquet")
    return _Source(name, file, id_prefix, READERS[suffix](path, file), tabular=tabular, **kw)


def _named_sources(data: str) -> list[_Source] | None:
    from sqsd import assets  # only named datasets need it

    dataset = assets.named_dataset(data)  # raises SqsdError (run `sqsd assets fetch`) if the asset is missing
    if dataset is None:
        return None
    base = dataset.name.partition(":")[0]
    fmt = None if dataset.format == "auto" else dataset.format
    sources = []
    for path in dataset.files:
        # "dolly-sqsd:S1" both names the part in records and selects it again when passed back as `data`
        part = f"{base}:{path.stem}"
        meta = {_STEM_META[base]: path.stem} if base in _STEM_META else {}
        sources.append(_file_source(path, part, str(path), part, format=fmt, meta=meta))
    return sources


def _hub_source(data: str, split: str) -> _Source:
    import datasets

    try:
        dataset = datasets.load_dataset(data, split=split)
    except Exception as e:  # offline, unknown id, gated, missing split, ...: all end in the same advice
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise SqsdError(f"cannot read '{data}': not a file, not a named dataset (see `sqsd assets list`), and "
                        f"loading it as a Hugging Face dataset failed: {reason}") from None
    rows = (RawRecord(json_value(dict(example), data, index, ""), data, index, "row")
            for index, example in enumerate(dataset))
    return _Source(data, data, f"{data}:{split}", rows, tabular=True, empty=f"split '{split}' has no records")


def _sources(data: str, split: str) -> list[_Source]:
    path = Path(data).expanduser()
    if path.is_file():
        return [_file_source(path, data, data, path.name)]
    if path.is_dir():
        raise SqsdError(f"{data} is a directory; pass a data file ({', '.join(READERS)})")
    named = _named_sources(data)
    if named is not None:
        return named
    if _HUB_ID.match(data) and path.suffix.lower() not in READERS:
        return [_hub_source(data, split)]
    raise SqsdError(f"no such file: {data} (nor a named dataset, see `sqsd assets list`, nor a Hugging Face "
                    f"dataset id like owner/name)")


# --- loading ---------------------------------------------------------------------------------------------------

def _check_columns(first: RawRecord, fmt: str, src: _Source) -> None:
    """In a table every row has the same columns: report a missing required one once, as a file error."""
    missing = [name for name in REQUIRED.get(fmt, ()) if name not in first.fields]
    if src.tabular and missing:
        raise DataError(src.file, f"missing required column for format {fmt}",
                        line=1 if first.kind == "line" else None, field=missing[0])


def _record(r: RawRecord, fmt: str, src: _Source, ids: dict[str, str], guessed: str | None = None) -> Record:
    """Parse one raw record; `ids` (id -> where first used) catches duplicates; `guessed` is where the format
    "prompts" was detected, if it was."""
    # A first record that lacks its response (say an Alpaca record without `output`) looks like a benchmark
    # prompt; without this check every later response would quietly end up in meta.
    responses = sorted(r.fields.keys() & RESPONSE_FIELDS) if guessed else []
    if responses:
        raise r.error(f"is a response field, but the format was detected as prompts from {guessed}, which has "
                      f"none; fix that record or pass --format", responses[0])
    parsed = PARSERS[fmt](r)
    id_field = next((k for k in ("id", "uid") if r.fields.get(k) is not None), None)
    if id_field is None:
        rid = f"{src.id_prefix}:{r.row}"
    else:
        value = r.fields[id_field]
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise r.error(f"must be a non-empty string or an integer, got {type_name(value)}", id_field)
        rid = str(value)
    if rid in ids:
        raise r.error(f"duplicate id {rid!r} (first used by {ids[rid]})", id_field or "id")
    skip = {*parsed.used, id_field}
    meta = {**src.meta, **{k: v for k, v in r.fields.items() if k not in skip}, **parsed.extra}
    return Record(rid, src.name, r.row, parsed.prompt, parsed.response, meta)


def load_records(data: str, format: str = "auto", split: str = "train", on_bad_record: str = "error",
                 limit: int | None = None) -> LoadedData:
    """Read `data` (a file, a named dataset or a hub id; see the module docstring) into Records.

    `format="auto"` detects the format from the first record's fields (a named dataset or a .txt file implies
    one); `split` applies to hub datasets; `on_bad_record` is "error" (raise at the first bad record) or
    "skip" (collect bad records in `.bad`, raise only if every record is bad); `limit` stops after that many
    good records. Raises DataError/SqsdError with file, line/row and field on bad input.
    """
    if format not in DATA_FORMATS:
        raise SqsdError(f"unknown format {format!r}; choose one of {', '.join(DATA_FORMATS)}")
    parts = held_out(data)
    if parts:
        base, part, rephrased = parts
        loaded = load_records(base, format, split, on_bad_record)
        kept = [r for r in loaded.records if split_of(r.id) == part][:limit]
        if not kept:
            raise SqsdError(f"{data}: the {part!r} split of {base} is empty")
        if rephrased:
            kept = [rephrase_record(r, part) for r in kept]
        return LoadedData(kept, loaded.format, loaded.sources, loaded.bad)
    if on_bad_record not in ("error", "skip"):
        raise SqsdError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    fmt = None if format == "auto" else format
    records: list[Record] = []
    bad: list[BadRecord] = []
    names: list[str] = []
    ids: dict[str, str] = {}  # id -> where it was first used
    guessed: str | None = None  # where "prompts" was detected, when it was
    for src in _sources(data, split):
        names.append(src.name)
        count, checked = 0, False
        for item in src.rows:
            count += 1
            if isinstance(item, RawRecord) and not checked:
                checked = True
                if fmt is None:
                    fmt = src.format or detect_format(set(item.fields))
                    if fmt is None:
                        raise undetectable(item)
                    if fmt == "prompts" and not src.format:
                        guessed = f"{item.file} {item.kind} {item.row}"
                _check_columns(item, fmt, src)
            try:
                if isinstance(item, DataError):
                    raise item
                assert fmt is not None  # set above by the first RawRecord, which comes before any record is parsed
                record = _record(item, fmt, src, ids, guessed)
            except DataError as e:
                if on_bad_record == "error":
                    raise
                bad.append(BadRecord(src.name, e.line if e.line is not None else -1, str(e)))
                continue
            ids[record.id] = f"{src.file} {item.kind} {item.row}"
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
        if count == 0:
            raise DataError(src.file, src.empty)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(data, f"every record is bad ({len(bad)}); the first: {bad[0].reason}")
    assert fmt is not None
    return LoadedData(records, fmt, tuple(names), bad)


def load_from_config(config: DataArgs) -> LoadedData:
    """`load_records` with the options of a command's DataArgs."""
    return load_records(config.data, config.format, config.split, config.on_bad_record, config.limit)


def raw_rows(data: str, split: str = "train") -> dict[tuple[str, int], dict[str, Any]]:
    """(Record.source, Record.row) -> the record's original fields, as the data layer read them."""
    parts = held_out(data)
    if parts:
        data = parts[0]  # a held-out split keeps its source's records and their rows
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for src in _sources(data, split):
        for item in src.rows:
            if not isinstance(item, Exception):
                out[(src.name, item.row)] = item.fields
    return out
