"""Readers: one file -> its raw rows (`RawRecord`: the field dict plus its file and line or row), with errors
that name the file, the line (JSONL/CSV/TXT, 1-based) or row (JSON array/Parquet, 0-based) and the field.

A reader yields a `DataError` for a bad record (the caller decides whether to skip it) and raises one for a bad
file. `sqsd.data` reads datasets through them; `read_rows` reads back the files commands wrote (scores, judged
responses), so every kind of file gets the same messages.

Every field of a record is carried into outputs as JSON (`filter` subsets, generation lines), so the readers
keep only what JSON can hold, decided where the data is read rather than when an output is written: Parquet
and hub dates and times become ISO 8601 strings (lossless, and what a user reads them as); any other cell
JSON cannot hold (bytes, durations, decimals, images) stops the load naming the column, rather than being
written as a lossy stand-in. JSON text that decodes to what no writer or tokenizer accepts is a bad record: a
lone surrogate code point (a "\\ud800" escape without its pair) or nesting deeper than 100 levels.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from sqsd.errors import DataError, SqsdError
from sqsd.formats import RawRecord, type_name

__all__ = ["READERS", "json_value", "read_rows"]


def _read_text(path: Path, file: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SqsdError(f"cannot read {file}: {e.strerror}") from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(file, f"not valid UTF-8 at byte {e.start}; save the file as UTF-8", line=line) from None


# Nesting levels a record may have. Python's JSON reader recurses once per level and gives up near 1000, its
# writer (every output that carries a record's fields) a few levels earlier, after the work is done.
_MAX_DEPTH = 100
_TOO_DEEP = f"nested more than {_MAX_DEPTH} levels deep (sqsd's limit; Python's JSON reader and writer fail near 1000)"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a surrogate code point is written in JSON
_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_value(value: Any) -> tuple[str, str] | None:
    """(field, what is wrong) for the first value nested deeper than _MAX_DEPTH or string holding a lone UTF-16
    surrogate, else None.

    JSON may write "\\ud800" without its pair; Python decodes it into a string no UTF-8 writer or tokenizer
    accepts, so such a record is refused where it is read. A valid pair decodes to one code point and passes.
    """
    stack: list[tuple[str, Any, int]] = [("", value, 0)]  # a loop, not recursion: the value may be ~1000 deep
    while stack:
        path, v, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return path.split(".")[0].split("[")[0], f"is {_TOO_DEEP}"  # the top-level field: the path is long
        if isinstance(v, str) and (m := _SURROGATE.search(v)):
            return path, (f"holds a lone surrogate U+{ord(m.group()):04X} (a \\u escape without its pair), which "
                          "is not valid Unicode; fix or remove it")
        if isinstance(v, dict):
            stack += reversed([(f"{path}.{k}" if path else str(k), x, depth + 1) for k, x in v.items()])
        elif isinstance(v, list):
            stack += reversed([(f"{path}[{i}]", x, depth + 1) for i, x in enumerate(v)])
    return None


def _suspect(text: str) -> bool:
    """Whether JSON `text` could decode to what `_bad_value` finds; ordinary records are not walked."""
    return text.count("[") + text.count("{") > _MAX_DEPTH or bool(_SURROGATE_ESCAPE.search(text))


def _checked(value: Any, suspect: bool, file: str, row: int, kind: str) -> RawRecord | DataError:
    """A decoded JSON record, or the error for a non-object, a value nested too deep or a lone surrogate (looked
    for when its text is `suspect`)."""
    found = _bad_value(value) if suspect else None
    if found:
        return DataError(file, found[1], line=row, field=found[0] or None, kind=kind)
    if isinstance(value, dict):
        return RawRecord(value, file, row, kind)
    return DataError(file, f"expected a JSON object, got {type_name(value)}", line=row, kind=kind)


def _read_jsonl(path: Path, file: str) -> Iterator[RawRecord | DataError]:
    # split on "\n" only: str.splitlines() also breaks at characters like U+2028 and would shift line numbers
    for number, line in enumerate(_read_text(path, file).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            yield DataError(file, f"invalid JSON: {e.msg} (column {e.colno})", line=number)
            continue
        except RecursionError:
            yield DataError(file, f"invalid JSON: {_TOO_DEEP}", line=number)
            continue
        yield _checked(value, _suspect(line), file, number, "line")


def _read_json(path: Path, file: str) -> Iterator[RawRecord | DataError]:
    text = _read_text(path, file)
    if not text.strip():
        raise DataError(file, "file is empty")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; one JSON object per line is JSON Lines: name the file .jsonl" if e.msg == "Extra data" else ""
        raise DataError(file, f"invalid JSON: {e.msg} (column {e.colno}){hint}", line=e.lineno) from None
    except RecursionError:
        raise DataError(file, f"invalid JSON: {_TOO_DEEP}") from None
    if isinstance(doc, dict) and len(doc) == 1 and isinstance(next(iter(doc.values())), list):
        doc = next(iter(doc.values()))  # {"data": [...]} / {"train": [...]}
    if not isinstance(doc, list):
        got = f"an object with keys {sorted(doc)[:8]}" if isinstance(doc, dict) else type_name(doc)
        raise DataError(file, f"expected a list of records (or an object with one key holding that list), got {got}")
    suspect = _suspect(text)
    for index, value in enumerate(doc):
        yield _checked(value, suspect, file, index, "row")


def _read_csv(path: Path, file: str, delimiter: str = ",") -> Iterator[RawRecord | DataError]:
    reader = csv.reader(io.StringIO(_read_text(path, file), newline=""), delimiter=delimiter)
    header: list[str] | None = None
    end = 0
    try:
        for cells in reader:
            start, end = end + 1, reader.line_num  # a quoted cell may span lines; report the record's first
            if not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header = [cell.strip() for cell in cells]
                duplicates = sorted({c for c in header if header.count(c) > 1})
                if duplicates:
                    raise DataError(file, f"duplicate column(s) {duplicates} in the header", line=start)
            elif len(cells) != len(header):
                yield DataError(file, f"has {len(cells)} values but the header has {len(header)} columns",
                                line=start)
            else:
                yield RawRecord(dict(zip(header, cells, strict=True)), file, start, "line", typed=False)
    except csv.Error as e:
        raise DataError(file, f"invalid CSV: {e}", line=end + 1) from None


def json_value(value: Any, file: str, row: int, column: str) -> Any:
    """An Arrow cell as a JSON value, since every column is carried into JSON outputs (`filter` subsets,
    generations): dates and times become ISO 8601 strings; a type with no faithful JSON form (bytes, durations,
    decimals, images) refuses the file, naming the column, rather than writing a lossy stand-in."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (datetime.date, datetime.time)):  # datetime.datetime is a date
        return value.isoformat()
    if isinstance(value, list):
        return [json_value(v, file, row, f"{column}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: json_value(v, file, row, f"{column}.{k}" if column else k) for k, v in value.items()}
    raise DataError(file, f"holds a {type(value).__name__} value, which sqsd cannot carry into its JSON outputs; "
                          "drop the column or convert it to text", line=row, field=column, kind="row")


def _read_parquet(path: Path, file: str) -> Iterator[RawRecord | DataError]:
    import pyarrow  # imported here: only Parquet files need it
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(file, f"not a readable Parquet file: {e}") from None
    for index, fields in enumerate(rows):
        yield RawRecord(json_value(fields, file, index, ""), file, index, "row")


def _read_txt(path: Path, file: str) -> Iterator[RawRecord | DataError]:
    for number, line in enumerate(_read_text(path, file).split("\n"), start=1):
        if line.strip():
            yield RawRecord({"prompt": line.strip()}, file, number, "line")


READERS: dict[str, Callable[[Path, str], Iterator[RawRecord | DataError]]] = {
    ".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
    ".tsv": partial(_read_csv, delimiter="\t"), ".parquet": _read_parquet, ".txt": _read_txt,
}


def read_rows(path: str | Path, required: dict[str, type | tuple[type, ...]] | None = None) -> list[RawRecord]:
    """Every row of a JSONL, JSON or Parquet file that a command reads back (scores, judged responses), each a
    JSON object holding the `required` fields with (one of) their types; the first bad line or row raises its
    DataError.
    The same readers as for datasets, so the same messages: file, line or row, field, what is wrong."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        raise SqsdError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; use .jsonl or .parquet")
    rows = []
    for item in READERS[path.suffix.lower()](path, str(path)):
        if isinstance(item, DataError):
            raise item
        for name, kind in (required or {}).items():
            kinds = kind if isinstance(kind, tuple) else (kind,)
            if name not in item.fields:
                raise item.error("missing required field", name)
            value = item.fields[name]
            if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
                raise item.error(f"must be {' or '.join(type_name(k()) for k in kinds)}, got {type_name(value)}",
                                 name)
        rows.append(item)
    return rows
