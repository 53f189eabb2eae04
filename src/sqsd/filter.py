"""`sqsd filter`: subsets of a scored dataset, written in the dataset's own format.

The ok rows of a scores file (`sqsd score`) are ranked by one column (`by`, risk by default), highest first,
ties by dataset index. Skipped rows are never selected. Modes (exactly one):
- drop_top_percent P / drop_top K: kept.jsonl = the rest, in dataset order; dropped.jsonl = the top, by rank;
- keep_bottom K: kept.jsonl = the K lowest, in dataset order;
- windows K, window_size N: S1.jsonl ... SK.jsonl, N consecutive ranks each, starting at
  round(i·(n_ok − N)/(K − 1)) for i = 0..K−1 (the paper's protocol: S1 = the riskiest N, SK = the safest N),
  each in rank order. Windows must not overlap.

Every output line is the record's original field dict as read from its file (a Dolly row stays a Dolly row:
instruction/context/response/category), so a subset feeds straight into `sqsd train` or any other tool. CSV
and Parquet rows become JSON objects with the same columns (dates and times as ISO 8601 strings, see
`sqsd.readers`). `filter.json` holds the counts and the score range and ranks of each subset; `run.json` the
config and fingerprints of the scores and the data (`runs.open_run`: `--overwrite` never removes the scores
file or the data, even when they lie in the output folder).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqsd.config import FilterConfig, to_dict
from sqsd.data import Record, load_records, raw_rows
from sqsd.errors import SqsdError
from sqsd.fingerprints import data_fingerprints, fingerprint
from sqsd.formats import RawRecord
from sqsd.runs import RUN_FILE, on_main, open_run, write_json_atomic
from sqsd.score import OK, score_rows

FILTER_FILE = "filter.json"


def window_starts(n: int, k: int, size: int) -> list[int]:
    """Start ranks of `k` windows of `size` over `n` ranked items: evenly spaced from 0 to n − size."""
    if k == 1:
        return [0]
    return [math.floor(i * (n - size) / (k - 1) + 0.5) for i in range(k)]  # round half up, not to even


def rank(rows: Sequence[dict[str, Any]], by: str, source: str = "the scores") -> list[dict[str, Any]]:
    """The ok rows, highest `by` first, ties by index; a clear error if `by` is not a numeric column."""
    if not rows:
        raise SqsdError(f"{source} holds no rows")
    if by not in rows[0]:
        numeric = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "index"]
        raise SqsdError(f"--by {by}: {source} has no such column; numeric columns: {', '.join(numeric)}")
    ok = [r for r in rows if r.get("status") == OK]
    for r in ok:
        value = r.get(by)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            what = ("is missing" if by not in r else "is empty (null)" if value is None
                    else f"is not a finite number ({value!r})")
            raise SqsdError(f"--by {by}: {source}, row index {r['index']} (id {r['id']!r}): the value {what}"
                            + ("; was that term scored? (`sqsd score --danger/--safety`)" if value is None else ""))
    return sorted(ok, key=lambda r: (-r[by], r["index"]))


def select(ranked: Sequence[dict[str, Any]], config: FilterConfig) -> dict[str, list[dict[str, Any]]]:
    """{subset name: rows} for the mode of `config`, from rows ranked by `rank`. kept is in dataset order,
    dropped and windows in rank order."""
    n = len(ranked)
    by_index = lambda rows: sorted(rows, key=lambda r: r["index"])  # noqa: E731
    if config.windows is not None:
        k, size = config.windows, config.window_size
        assert size is not None  # FilterConfig checks it
        if k * size > n:
            raise SqsdError(f"--windows {k} --window-size {size} needs {k * size} scored samples without overlap, "
                            f"but the scores have {n} ok row(s); use fewer or smaller windows")
        return {f"S{i + 1}": list(ranked[s:s + size]) for i, s in enumerate(window_starts(n, k, size))}
    if config.keep_bottom is not None:
        if config.keep_bottom > n:
            raise SqsdError(f"--keep-bottom {config.keep_bottom} exceeds the {n} ok row(s) of the scores")
        return {"kept": by_index(ranked[n - config.keep_bottom:])}
    if config.drop_top is not None:
        drop = config.drop_top
        if drop >= n:
            raise SqsdError(f"--drop-top {drop} would drop all {n} ok row(s) of the scores")
    else:
        assert config.drop_top_percent is not None
        drop = math.floor(config.drop_top_percent * n / 100 + 0.5)
    return {"kept": by_index(ranked[drop:]), "dropped": list(ranked[:drop])}


def _scored_config(scores: Path) -> dict[str, Any]:
    run = scores.parent / RUN_FILE
    if not run.is_file():
        return {}
    try:
        return json.loads(run.read_text(encoding="utf-8")).get("config", {})
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        raise SqsdError(f"{run} is not the run.json `sqsd score` writes, so which data was scored is unknown; "
                        "pass --data (the same dataset spec that was scored)") from None


def _records(config: FilterConfig, scores: Path) -> tuple[str, list[Record]]:
    """The records that were scored: `config.data`, else the scores' run.json data, read as it was read."""
    scored = _scored_config(scores)
    data = config.data or scored.get("data")
    if not data:
        raise SqsdError(f"no --data given and {scores.parent / RUN_FILE} does not name the scored dataset; pass "
                        "--data (the same dataset spec that was scored)")
    loaded = load_records(data, scored.get("format", "auto"), scored.get("split", "train"),
                          scored.get("on_bad_record", "error"), scored.get("limit"))
    return data, loaded.records


def _check_match(rows: Sequence[RawRecord], records: Sequence[Record], scores: Path, data: str) -> None:
    """Each record has exactly one row, at its index and with its id (`score_rows` refused repeated indices)."""
    hint = "pass the --data that was scored"
    for r in rows:
        i = r.fields["index"]
        if not 0 <= i < len(records):
            raise r.error(f"index {i} is not a record of {data}, which gives {len(records)}; {hint}", "index")
        if records[i].id != r.fields["id"]:
            raise r.error(f"{r.fields['id']!r} at index {i}, but {data} has {records[i].id!r} there; {hint}", "id")
    if len(rows) != len(records):
        missing = min(set(range(len(records))) - {r.fields["index"] for r in rows})
        raise SqsdError(f"{scores} has {len(rows)} rows but {data} gives {len(records)} records; none for index "
                        f"{missing} (id {records[missing].id!r}): {hint}, or rescore")


def _write_jsonl(path: Path, lines: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    tmp.replace(path)


def filter_scores(config: FilterConfig) -> Path:
    """`sqsd filter`: write the subsets of `config` into `config.output_dir`; returns the folder (rank 0 only
    under a launcher)."""
    return on_main(lambda: _filter_scores(config))


def _filter_scores(config: FilterConfig) -> Path:
    scores = Path(config.scores)
    located = score_rows(scores)
    rows = [r.fields for r in located]
    ranked = rank(rows, config.by, str(scores))
    subsets = select(ranked, config)
    data, records = _records(config, scores)
    _check_match(located, records, scores, data)

    out = Path(config.output_dir)
    inputs = lambda: {"scores": fingerprint(scores), **data_fingerprints(data)}  # noqa: E731
    with open_run(out, config, inputs, overwrite=config.overwrite, input_fields=("scores", "data")) as run:
        raw = raw_rows(data, _scored_config(scores).get("split", "train"))
        positions = {r["index"]: pos for pos, r in enumerate(ranked)}
        summary: dict[str, Any] = {}
        for name, chosen in subsets.items():
            _write_jsonl(out / f"{name}.jsonl", [raw[(records[r["index"]].source, records[r["index"]].row)]
                                                 for r in chosen])
            values = [r[config.by] for r in chosen]
            ranks = [positions[r["index"]] for r in chosen]
            summary[name] = {"file": f"{name}.jsonl", "count": len(chosen),
                             "min": min(values) if values else None, "max": max(values) if values else None,
                             "ranks": [min(ranks), max(ranks) + 1] if ranks else None}
        n_skipped = len(rows) - len(ranked)
        write_json_atomic(out / FILTER_FILE, {"config": to_dict(config), "scores": str(scores), "data": data,
                                              "n_rows": len(rows), "n_ok": len(ranked), "n_skipped": n_skipped,
                                              "subsets": summary})
        run.finish({name: s["count"] for name, s in summary.items()})
    print(f"{len(ranked)} scored row(s) ranked by {config.by} ({n_skipped} skipped row(s) never selected) -> {out}")
    for s in summary.values():
        span = "" if s["min"] is None else f", {config.by} {s['min']:.4g} .. {s['max']:.4g}"
        print(f"  {s['file']:<14} {s['count']:>6} row(s){span}")
    return out
