"""`sqsd filter` on a hand-made scores file: exact selections per mode, skipped rows never selected, output rows
in the dataset's own format, and clear errors for bad options."""

import csv
import json
from pathlib import Path

import pytest

from sqsd.cli import main
from sqsd.config import FilterConfig
from sqsd.errors import SqsdError
from sqsd.filter import filter_scores, window_starts
from sqsd.score import write_scores

# risk by dataset index; None = skipped. Ranked (desc): 1, 10, 5, 11, 0, 6, 4, 8, 2, 7; 3 and 9 are skipped.
RISK = [0.5, 0.9, -0.2, None, 0.1, 0.7, 0.3, -0.5, 0.0, None, 0.8, 0.6]
LENGTH = [7, 3, 9, 4, 3, 12, 3, 8, 5, 2, 6, 10]  # n_response_tokens: ties at 3 (indices 1, 4, 6)


def dolly(i):
    return {"instruction": f"Instruction {i}", "context": "" if i % 2 else f"Context {i}",
            "response": f"Response {i}", "category": ["open_qa", "summarization"][i % 2]}


@pytest.fixture
def scored(tmp_path):
    """A dolly JSONL, its scores.jsonl (as `sqsd score` writes it) and the run.json beside it."""
    data = tmp_path / "dolly.jsonl"
    data.write_text("".join(json.dumps(dolly(i)) + "\n" for i in range(len(RISK))))
    rows = []
    for i, risk in enumerate(RISK):
        ok = risk is not None
        rows.append({"index": i, "id": f"dolly.jsonl:{i + 1}", "danger": risk + 1 if ok else None,
                     "safety": 1.0 if ok else None, "risk": risk, "risk_z": 2 * risk if ok else None,
                     "n_response_tokens": LENGTH[i] if ok else None, "loss": 2.0 if ok else None,
                     "status": "ok" if ok else "skipped: record has no response"})
    folder = tmp_path / "scored"
    folder.mkdir()
    scores = write_scores(rows, folder / "scores.jsonl")
    (folder / "run.json").write_text(json.dumps({"config": {"data": str(data), "format": "auto", "split": "train",
                                                            "on_bad_record": "error", "limit": None}}))
    return scores, data, rows


def run(scores, out, **kw):
    filter_scores(FilterConfig(scores=str(scores), output_dir=str(out), **kw))
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(out.glob("*.jsonl"))}


def test_window_starts_are_evenly_spaced_and_rounded():
    assert window_starts(10, 4, 2) == [0, 3, 5, 8]  # 8/3 = 2.67 -> 3, 16/3 = 5.33 -> 5
    assert window_starts(15000, 5, 1000) == [0, 3500, 7000, 10500, 14000]  # the paper's setup
    assert window_starts(9, 2, 3) == [0, 6] and window_starts(9, 1, 3) == [0]


def test_windows_select_exact_ids_in_the_original_format(scored, tmp_path):
    scores, _, _ = scored
    out = run(scores, tmp_path / "w", windows=4, window_size=2)  # data read from the scores' run.json
    assert set(out) == {"S1", "S2", "S3", "S4"}
    # ranks 0-1, 3-4, 5-6, 8-9, each in rank order (riskiest first)
    assert out == {"S1": [dolly(1), dolly(10)], "S2": [dolly(11), dolly(0)], "S3": [dolly(6), dolly(4)],
                   "S4": [dolly(2), dolly(7)]}
    assert list(out["S1"][0]) == ["instruction", "context", "response", "category"]  # a dolly row stays one
    info = json.loads((tmp_path / "w" / "filter.json").read_text())
    assert (info["n_rows"], info["n_ok"], info["n_skipped"]) == (12, 10, 2)
    assert info["subsets"]["S1"] == {"file": "S1.jsonl", "count": 2, "min": 0.8, "max": 0.9, "ranks": [0, 2]}
    assert info["subsets"]["S4"] == {"file": "S4.jsonl", "count": 2, "min": -0.5, "max": -0.2, "ranks": [8, 10]}
    assert info["config"]["windows"] == 4 and info["config"]["by"] == "risk"


def test_drop_and_keep_modes_never_select_skipped_rows(scored, tmp_path):
    scores, data, _ = scored
    out = run(scores, tmp_path / "p", drop_top_percent=25)  # 25% of 10 ok rows = 2.5 -> 3
    assert out["dropped"] == [dolly(i) for i in (1, 10, 5)]  # rank order
    assert out["kept"] == [dolly(i) for i in (0, 2, 4, 6, 7, 8, 11)]  # dataset order; 3 and 9 (skipped) in neither
    out = run(scores, tmp_path / "k", drop_top=2, data=str(data))
    assert out["dropped"] == [dolly(1), dolly(10)] and out["kept"] == [dolly(i) for i in (0, 2, 4, 5, 6, 7, 8, 11)]
    assert run(scores, tmp_path / "b", keep_bottom=3) == {"kept": [dolly(2), dolly(7), dolly(8)]}
    # another column: risk_z ranks like risk; length ranks 5, 11, 2, 7, 0, 10, 8, then the ties at 3 by index
    assert run(scores, tmp_path / "z", keep_bottom=3, by="risk_z") == {"kept": [dolly(2), dolly(7), dolly(8)]}
    assert run(scores, tmp_path / "n", keep_bottom=2, by="n_response_tokens") == {"kept": [dolly(4), dolly(6)]}
    assert run(scores, tmp_path / "t", drop_top=1, by="n_response_tokens")["dropped"] == [dolly(5)]


def test_parquet_scores_and_csv_data(scored, tmp_path):
    scores, _, rows = scored
    table = [{k: str(v) for k, v in dolly(i).items()} for i in range(len(RISK))]
    data = tmp_path / "dolly.csv"
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    folder = tmp_path / "pq"
    folder.mkdir()
    # a CSV record's id is its line: the header is line 1
    parquet = write_scores([{**r, "id": f"dolly.csv:{r['index'] + 2}"} for r in rows], folder / "scores.parquet")
    out = run(parquet, tmp_path / "o", drop_top=2, data=str(data))  # no run.json: --data is needed
    assert out["dropped"] == [table[1], table[10]] and len(out["kept"]) == 8


def test_bad_options_are_clear_errors(scored, tmp_path):
    scores, data, rows = scored
    cases = [({}, "choose exactly one of --drop-top-percent, --drop-top, --keep-bottom, --windows"),
             ({"drop_top": 1, "keep_bottom": 2}, r"exactly one of .*\(got --drop-top, --keep-bottom\)"),
             ({"window_size": 5}, "--window-size needs --windows"),
             ({"windows": 5}, "--windows needs --window-size"),
             ({"drop_top_percent": 100.0}, "--drop-top-percent must be between 0 and 100"),
             ({"keep_bottom": 0}, "--keep-bottom must be positive"),
             ({"windows": 2, "window_size": 0}, "--window-size must be positive")]
    for kw, message in cases:
        with pytest.raises(SqsdError, match=message):
            FilterConfig(scores="s.jsonl", output_dir="o", **kw)
    with pytest.raises(SqsdError, match="--windows 6 --window-size 2 needs 12 scored samples .* 10 ok row"):
        run(scores, tmp_path / "a", windows=6, window_size=2)
    with pytest.raises(SqsdError, match="--by length: .* no such column; numeric columns: danger, safety, risk"):
        run(scores, tmp_path / "b", drop_top=1, by="length")
    only_safety = [{**r, "danger": None} for r in rows]
    write_scores(only_safety, scores)
    with pytest.raises(SqsdError, match=r"--by danger: .*row index 0 .*is empty \(null\); was that term scored"):
        run(scores, tmp_path / "c", drop_top=1, by="danger")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**dolly(i), "id": f"x{i}"}) + "\n" for i in range(len(RISK))))
    with pytest.raises(SqsdError, match=r"scores.jsonl:1: field 'id': 'dolly.jsonl:1' at index 0, but .*other.jsonl "
                                        r"has 'x0' there; pass the --data that was scored"):
        run(scores, tmp_path / "d", drop_top=1, data=str(other))
    (scores.parent / "run.json").unlink()
    with pytest.raises(SqsdError, match="no --data given"):
        run(scores, tmp_path / "e", drop_top=1)
    run(scores, tmp_path / "f", drop_top=1, data=str(data))
    with pytest.raises(SqsdError, match="different config.*drop_top: 1 -> 2.*--overwrite"):
        run(scores, tmp_path / "f", drop_top=2, data=str(data))
    assert len(run(scores, tmp_path / "f", drop_top=2, data=str(data), overwrite=True)["dropped"]) == 2


# --- the malformed scores files in tests/bad_inputs/scores, all against the dataset dolly.jsonl there ----------

BAD_SCORES = Path(__file__).parent / "bad_inputs" / "scores"
# file, where the error is (None = the file as a whole), message fragment
BAD_SCORE_FILES = [
    ("array_line.jsonl", ":2", "expected a JSON object, got list"),
    ("duplicate_row.jsonl", ":3", "field 'index': index 1 is also on line 2: a sample has two rows"),
    ("index_outside.jsonl", ":3", "field 'index': index 7 is not a record of"),
    ("missing_index.jsonl", ":2", "field 'index': missing required field"),
    ("missing_row.jsonl", None, "has 2 rows but"),
    ("other_data.jsonl", ":2", "field 'id': 'alpaca.jsonl:2' at index 1, but"),
    ("truncated.parquet", None, "not a readable Parquet file"),
]


def test_every_bad_scores_file_is_tested_and_documented():
    assert {p.name for p in BAD_SCORES.iterdir()} - {"dolly.jsonl"} == {name for name, *_ in BAD_SCORE_FILES}
    readme = (BAD_SCORES.parent / "README.md").read_text()
    assert all(f"| scores/{name} |" in readme for name, *_ in BAD_SCORE_FILES)


@pytest.mark.parametrize("name, where, message", BAD_SCORE_FILES, ids=[b[0] for b in BAD_SCORE_FILES])
def test_bad_scores_file_is_one_located_error_and_writes_nothing(name, where, message, tmp_path, capsys):
    path, data, out = str(BAD_SCORES / name), str(BAD_SCORES / "dolly.jsonl"), tmp_path / "out"
    with pytest.raises(SqsdError) as info:
        filter_scores(FilterConfig(scores=path, data=data, output_dir=str(out), drop_top=1))
    assert str(info.value).startswith(f"{path}{where or ''}")
    assert message in str(info.value)
    assert not out.exists()
    assert main(["filter", path, "--data", data, "--output-dir", str(out), "--drop-top", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_parquet_timestamps_reach_the_subsets_as_iso_strings(scored, tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    scores, _, rows = scored
    when = [datetime.datetime(2024, 1, 1 + i, 12, 0) for i in range(len(RISK))]
    data = tmp_path / "dolly.parquet"
    pq.write_table(pa.Table.from_pylist([{**dolly(i), "when": when[i]} for i in range(len(RISK))]), data)
    write_scores([{**r, "id": f"dolly.parquet:{r['index']}"} for r in rows], scores)
    out = run(scores, tmp_path / "t", drop_top=1, data=str(data))
    assert out["dropped"] == [{**dolly(1), "when": "2024-01-02T12:00:00"}]


def test_a_row_without_the_ranking_column_is_named(scored, tmp_path):
    scores, _, rows = scored
    scores.write_text("".join(json.dumps({k: v for k, v in r.items() if not (k == "risk" and r["index"] == 4)}) + "\n"
                              for r in rows))
    with pytest.raises(SqsdError, match=r"--by risk: .*scores.jsonl, row index 4 \(id 'dolly.jsonl:5'\): the value "
                                        r"is missing"):
        run(scores, tmp_path / "m", drop_top=1)


def test_overwrite_into_the_scores_own_folder_never_deletes_the_scores(scored):
    scores, data, _ = scored
    before = scores.read_bytes()
    # the folder is the scoring run's (its run.json, a different command's config): a plain rerun refuses ...
    with pytest.raises(SqsdError, match="holds a run made with a different config or inputs"):
        run(scores, scores.parent, drop_top=1)
    # ... and --overwrite would delete the scores this command reads: refused, nothing lost
    with pytest.raises(SqsdError, match="would delete .*scores.jsonl.*an input of this command"):
        run(scores, scores.parent, drop_top=1, overwrite=True)
    assert scores.read_bytes() == before and (scores.parent / "run.json").exists()
    assert data.exists()


def test_an_output_dir_that_is_a_file_is_one_clear_line(scored, tmp_path, capsys):
    from sqsd.cli import main

    scores, data, _ = scored
    (tmp_path / "taken").write_text("mine")
    assert main(["filter", str(scores), "--output-dir", str(tmp_path / "taken"), "--drop-top", "1"]) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "is a file, not a folder" in err and "Traceback" not in err
    assert (tmp_path / "taken").read_text() == "mine"
