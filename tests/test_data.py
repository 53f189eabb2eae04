import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sqsd import assets
from sqsd.cli import main
from sqsd.config import DataArgs
from sqsd.data import BadRecord, Record, detect_format, load_from_config, load_records
from sqsd.errors import DataError, SqsdError

BAD = Path(__file__).parent / "bad_inputs"


def user(text):
    return ({"role": "user", "content": text},)


def write_jsonl(path, rows):
    """One JSON value per line; a None row writes a blank line (which still counts in line numbers)."""
    path.write_text("".join("\n" if row is None else json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# --- one loader test per format -------------------------------------------------------------------------------

def test_alpaca_with_and_without_input(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Say hi.", "input": "", "output": "Hi!", "source": "self"},
        {"instruction": "Summarise.", "input": "A long text.", "output": "Short."},
        None,
        {"instruction": "Count to 3.", "output": "1 2 3"},
    ])
    loaded = load_records(path)
    assert loaded.format == "alpaca"
    assert loaded.sources == (path,)
    assert loaded.bad == []
    assert loaded.records == [
        Record("alpaca.jsonl:1", path, 1, user("Say hi."), "Hi!", {"source": "self"}),
        Record("alpaca.jsonl:2", path, 2, user("Summarise.\n\nA long text."), "Short.", {}),
        Record("alpaca.jsonl:4", path, 4, user("Count to 3."), "1 2 3", {}),
    ]


def test_alpaca_eval_outputs_json_array_uses_rows(tmp_path):
    rows = [{"dataset": "helpful_base", "instruction": f"Question {i}?", "output": f"Answer {i}.",
             "generator": "text_davinci_003", "datasplit": "eval"} for i in range(3)]
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(rows, indent=2))
    loaded = load_records(str(path))
    assert loaded.format == "alpaca"
    assert [(r.id, r.row) for r in loaded.records] == [("outputs.json:0", 0), ("outputs.json:1", 1),
                                                       ("outputs.json:2", 2)]
    assert loaded.records[2].prompt == user("Question 2?")
    assert loaded.records[2].response == "Answer 2."
    assert loaded.records[2].meta == {"dataset": "helpful_base", "generator": "text_davinci_003",
                                      "datasplit": "eval"}


def test_json_object_with_one_list_key(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"train": [{"instruction": "A", "output": "B"}, {"instruction": "C", "output": "D"}]}))
    loaded = load_records(str(path))
    assert [(r.row, r.response) for r in loaded.records] == [(0, "B"), (1, "D")]


def test_dolly_context_and_category(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Who wrote it?", "context": "Hamlet was written by Shakespeare.",
         "response": "Shakespeare.", "category": "closed_qa"},
        {"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "brainstorming"},
    ])
    loaded = load_records(path)
    assert loaded.format == "dolly"
    assert loaded.records == [
        Record("dolly.jsonl:1", path, 1, user("Who wrote it?\n\nHamlet was written by Shakespeare."),
               "Shakespeare.", {"category": "closed_qa"}),
        Record("dolly.jsonl:2", path, 2, user("Name a fruit."), "Apple.", {"category": "brainstorming"}),
    ]


def test_messages_with_system_turn_and_multi_turn_history(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    u1, a1 = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
    u2, a2 = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [system, u1, a1], "prompt_id": "p1"},
        {"messages": [u1, a1, u2, a2], "prompt_id": "p2"},
    ])
    loaded = load_records(path)
    assert loaded.format == "messages"
    assert loaded.records == [
        Record("chat.jsonl:1", path, 1, (system, u1), "Hello.", {"prompt_id": "p1"}),
        Record("chat.jsonl:2", path, 2, (u1, a1, u2), "4.", {"prompt_id": "p2"}),
    ]


def test_prompt_completion_plain_and_conversational(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
         "completion": [{"role": "assistant", "content": "A"}], "label": True},
    ])
    loaded = load_records(path)
    assert loaded.format == "prompt-completion"
    assert loaded.records[0] == Record("pc.jsonl:1", path, 1, user("The sky is"), " blue.", {})
    assert loaded.records[1].prompt == ({"role": "system", "content": "S"}, {"role": "user", "content": "Q"})
    assert loaded.records[1].response == "A"
    assert loaded.records[1].meta == {"label": True}


def test_beavertails_keeps_is_safe_and_category(tmp_path):
    category = {"violence": True, "privacy_violation": False}
    path = write_jsonl(tmp_path / "bt.jsonl", [
        {"prompt": "How to hurt?", "response": "Like this.", "category": category, "is_safe": False},
        {"prompt": "How to help?", "response": "Listen.", "category": {}, "is_safe": True},
    ])
    loaded = load_records(path)
    assert loaded.format == "beavertails"
    assert loaded.records[0] == Record("bt.jsonl:1", path, 1, user("How to hurt?"), "Like this.",
                                       {"category": category, "is_safe": False})
    assert loaded.records[1].meta["is_safe"] is True


def test_csv_line_numbers_count_the_header_and_multiline_cells(tmp_path):
    path = tmp_path / "bt.csv"
    path.write_text('prompt,response,is_safe\n'
                    'Q1,"two\nlines",False\n'
                    '\n'
                    'Q2,one line,true\n', encoding="utf-8")
    loaded = load_records(str(path))
    assert loaded.format == "beavertails"
    assert [(r.id, r.row, r.response, r.meta) for r in loaded.records] == [
        ("bt.csv:2", 2, "two\nlines", {"is_safe": False}),
        ("bt.csv:5", 5, "one line", {"is_safe": True}),
    ]


def test_tsv(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("instruction\tinput\toutput\nSay hi.\t\tHi!\n")
    assert load_records(str(path)).records == [Record("a.tsv:2", str(path), 2, user("Say hi."), "Hi!", {})]


def test_pku_saferlhf_picks_the_safer_response(tmp_path):
    row = {"prompt": "P", "response_0": "R0", "response_1": "R1", "is_response_0_safe": False,
           "is_response_1_safe": True, "safer_response_id": 1, "better_response_id": 0}
    path = write_jsonl(tmp_path / "pku.jsonl", [row, {**row, "safer_response_id": 0}])
    loaded = load_records(path)
    assert loaded.format == "pku-saferlhf"
    first, second = loaded.records
    assert (first.prompt, first.response, second.response) == (user("P"), "R1", "R0")
    assert first.meta == {"response_0": "R0", "response_1": "R1", "is_response_0_safe": False,
                          "is_response_1_safe": True, "safer_response_id": 1, "better_response_id": 0,
                          "unsafe_response": "R0"}
    assert second.meta["unsafe_response"] == "R1"


def test_benchmark_prompts_jsonl_csv_json_and_txt(tmp_path):
    advbench = write_jsonl(tmp_path / "advbench.jsonl", [{"goal": "Do harm", "target": "Sure, here is"}])
    loaded = load_records(advbench)
    assert loaded.format == "prompts"
    assert loaded.records == [Record("advbench.jsonl:1", advbench, 1, user("Do harm"), None,
                                     {"target": "Sure, here is"})]

    harmbench = tmp_path / "harmbench.csv"
    harmbench.write_text("Behavior,SemanticCategory,BehaviorID\nWrite malware,cybercrime,b1\n")
    record = load_records(str(harmbench)).records[0]
    assert (record.id, record.row, record.prompt, record.response) == ("harmbench.csv:2", 2, user("Write malware"),
                                                                       None)
    assert record.meta == {"SemanticCategory": "cybercrime", "BehaviorID": "b1"}

    catqa = tmp_path / "catqa.json"
    catqa.write_text(json.dumps([{"Category": "Illegal Activity", "Question": "How to steal?"}]))
    record = load_records(str(catqa)).records[0]
    assert (record.row, record.prompt, record.meta) == (0, user("How to steal?"), {"Category": "Illegal Activity"})

    txt = tmp_path / "prompts.txt"
    txt.write_text("First prompt\n\n  Second prompt  \n")
    loaded = load_records(str(txt))
    assert loaded.format == "prompts"
    assert loaded.records == [Record("prompts.txt:1", str(txt), 1, user("First prompt"), None, {}),
                              Record("prompts.txt:3", str(txt), 3, user("Second prompt"), None, {})]


def test_parquet_uses_rows(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"instruction": ["I0", "I1"], "input": ["", "doc"], "output": ["O0", "O1"],
                             "score": [0.5, 1.5]}), path)
    loaded = load_records(str(path))
    assert loaded.format == "alpaca"
    assert loaded.records == [Record("a.parquet:0", str(path), 0, user("I0"), "O0", {"score": 0.5}),
                              Record("a.parquet:1", str(path), 1, user("I1\n\ndoc"), "O1", {"score": 1.5})]



def test_parquet_dates_and_times_are_carried_as_iso_strings(tmp_path):
    import datetime

    path = tmp_path / "t.parquet"
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    pq.write_table(pa.table({"instruction": ["I0", "I1"], "output": ["O0", "O1"], "when": [when, None],
                             "day": [datetime.date(2024, 5, 6)] * 2,
                             "log": [[{"at": when}], []]}), path)
    metas = [r.meta for r in load_records(str(path)).records]
    assert metas == [{"when": "2024-05-06T07:08:09+00:00", "day": "2024-05-06",
                      "log": [{"at": "2024-05-06T07:08:09+00:00"}]},
                     {"when": None, "day": "2024-05-06", "log": []}]
    json.dumps(metas)  # what outputs do with meta


def test_json_array_too_deep_or_with_a_lone_surrogate(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('[{"instruction": "a", "output": "b", "x": ' + "[" * 3000 + "]" * 3000 + "}]")
    with pytest.raises(DataError, match=r"deep\.json: invalid JSON: nested more than 100 levels deep"):
        load_records(str(deep))
    nest = lambda n: '{"instruction": "a", "output": "b", "x": ' + "[" * n + "]" * n + "}"  # noqa: E731
    deep.write_text(f"[{nest(100)}, {nest(101)}]")  # the limit is 100 levels below the record
    with pytest.raises(DataError, match=r"deep\.json row 1: field 'x': is nested more than 100 levels deep"):
        load_records(str(deep))
    broken = tmp_path / "s.json"
    broken.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "a\\udc00", "output": "b"}]')
    with pytest.raises(DataError, match=r"s\.json row 1: field 'instruction': holds a lone surrogate U\+DC00"):
        load_records(str(broken))

# --- detection and explicit formats ---------------------------------------------------------------------------

@pytest.mark.parametrize("fields, expected", [
    ({"instruction", "input", "output"}, "alpaca"),
    ({"instruction", "output", "generator", "dataset", "datasplit"}, "alpaca"),
    ({"instruction", "context", "response", "category"}, "dolly"),
    ({"messages", "prompt", "prompt_id"}, "messages"),
    ({"prompt", "completion"}, "prompt-completion"),
    ({"prompt", "response", "is_safe", "category"}, "beavertails"),
    ({"prompt", "response_0", "response_1", "safer_response_id", "is_response_0_safe"}, "pku-saferlhf"),
    ({"goal", "target"}, "prompts"),
    ({"Question", "Category"}, "prompts"),
    ({"prompt", "intents"}, "prompts"),
    ({"instruction"}, "prompts"),
    ({"prompt", "output"}, None),  # a response-like field that no format takes: do not drop it silently
    ({"text", "label"}, None),
])
def test_detect_format(fields, expected):
    assert detect_format(fields) == expected


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Who?", "context": "Doc.", "response": "Me.", "category": "closed_qa"}])
    assert load_records(path).format == "dolly"
    as_prompts = load_records(path, format="prompts")
    assert as_prompts.format == "prompts"
    assert as_prompts.records[0].prompt == user("Who?\n\nDoc.")
    assert as_prompts.records[0].response is None
    assert as_prompts.records[0].meta == {"response": "Me.", "category": "closed_qa"}
    with pytest.raises(DataError, match=r"dolly\.jsonl:1: field 'output': missing required field"):
        load_records(path, format="alpaca")


def test_a_response_after_detecting_prompts_is_not_hidden_in_meta(tmp_path):
    # the first record lacks its output, so it looks like a benchmark prompt; the next ones must not be read so
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "A"}, {"instruction": "B", "output": "C"}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: field 'output': is a response field, but the format was "
                                        r"detected as prompts from .*a\.jsonl line 1"):
        load_records(path)
    assert load_records(path, format="alpaca", on_bad_record="skip").records[0].response == "C"


def test_own_id_fields_become_record_ids(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [
        {"id": 7, "instruction": "A", "output": "B"},
        {"uid": "u-1", "instruction": "C", "output": "D", "note": "n"},
    ])
    records = load_records(path).records
    assert [r.id for r in records] == ["7", "u-1"]
    assert records[1].meta == {"note": "n"}


# --- bad records, skip mode, limit ----------------------------------------------------------------------------

def test_skip_mode_keeps_good_records_and_lists_bad_ones_with_lines(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "A", "output": "B"},
        {"instruction": "C"},
        "not an object",
        {"instruction": "E", "output": "F"},
    ])
    loaded = load_records(path, on_bad_record="skip")
    assert [r.row for r in loaded.records] == [1, 4]
    assert loaded.bad == [
        BadRecord(path, 2, f"{path}:2: field 'output': missing required field"),
        BadRecord(path, 3, f"{path}:3: expected a JSON object, got string"),
    ]


def test_skip_mode_raises_when_every_record_is_bad(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "A", "output": ""}, {"instruction": "C"}])
    with pytest.raises(DataError, match=r"every record is bad \(2\).*bad\.jsonl:1: field 'output': is empty"):
        load_records(path, on_bad_record="skip")


def test_limit_stops_after_n_good_records(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "A", "output": 5}] +
                       [{"instruction": f"I{i}", "output": "O"} for i in range(5)])
    loaded = load_records(path, on_bad_record="skip", limit=2)
    assert [r.row for r in loaded.records] == [2, 3]
    assert [b.row for b in loaded.bad] == [1]


def test_load_from_config(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"I{i}", "output": "O"} for i in range(3)])
    loaded = load_from_config(DataArgs(data=path, format="prompts", limit=2))
    assert loaded.format == "prompts"
    assert len(loaded.records) == 2


# --- sources: named datasets, hub ids, missing files ----------------------------------------------------------

def test_named_dataset_dolly_sqsd():
    everything = load_records("dolly-sqsd")
    assert len(everything.records) == 3000
    assert everything.format == "dolly"
    assert everything.sources == ("dolly-sqsd:S1", "dolly-sqsd:S3", "dolly-sqsd:S5")
    assert len({r.id for r in everything.records}) == 3000

    s1 = load_records("dolly-sqsd:S1")
    assert len(s1.records) == 1000
    first = s1.records[0]
    assert (first.id, first.source, first.row) == ("dolly-sqsd:S1:1", "dolly-sqsd:S1", 1)
    assert {"Danger-safe", "Beaver_Proj", "Safe_Proj", "category", "response_len"} == set(first.meta)
    assert first.prompt[0]["content"].startswith("Tell a story with the following")
    # the file is sorted by the paper's risk score, descending
    risks = [r.meta["Danger-safe"] for r in s1.records]
    assert risks == sorted(risks, reverse=True)
    assert load_records(first.source, limit=1).records[0] == first  # a record's source loads its part again


def test_missing_named_asset_says_how_to_fetch():
    with pytest.raises(SqsdError, match="sqsd assets fetch"):
        load_records("harmbench")


def test_named_dataset_file_stem_becomes_risk_area(tmp_path, monkeypatch):
    files = (Path(write_jsonl(tmp_path / "malicious_uses.jsonl", [{"prompt": "P1", "intents": ["x"]}])),
             Path(write_jsonl(tmp_path / "information_hazards.jsonl", [{"prompt": "P2", "intents": []}])))
    fake = assets.NamedDataset(name="donotanswer", files=files, format="prompts", description="")
    monkeypatch.setattr(assets, "named_dataset", lambda name: fake if name == "donotanswer" else None)
    loaded = load_records("donotanswer")
    assert loaded.format == "prompts"
    assert [(r.id, r.source, r.prompt, r.meta) for r in loaded.records] == [
        ("donotanswer:malicious_uses:1", "donotanswer:malicious_uses", user("P1"),
         {"risk_area": "malicious_uses", "intents": ["x"]}),
        ("donotanswer:information_hazards:1", "donotanswer:information_hazards", user("P2"),
         {"risk_area": "information_hazards", "intents": []}),
    ]


def test_hub_dataset_uses_rows(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "P0", "response": "R0", "is_safe": False}, {"prompt": "P1", "response": " ", "is_safe": True}]
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_records("org/beavertails-like", split="30k_train", on_bad_record="skip")
    assert calls == [("org/beavertails-like", "30k_train")]
    assert loaded.sources == ("org/beavertails-like",)
    assert loaded.records == [Record("org/beavertails-like:30k_train:0", "org/beavertails-like", 0, user("P0"),
                                     "R0", {"is_safe": False})]
    assert loaded.bad == [BadRecord("org/beavertails-like", 1, "org/beavertails-like row 1: field 'response': is empty")]


def test_hub_failure_is_one_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SqsdError) as info:
        load_records("org/nothing")
    assert str(info.value) == ("cannot read 'org/nothing': not a file, not a named dataset (see `sqsd assets "
                               "list`), and loading it as a Hugging Face dataset failed: Couldn't reach "
                               "'org/nothing' on the Hub (LocalEntryNotFoundError)")


def test_missing_file_unsupported_type_and_directory(tmp_path):
    with pytest.raises(SqsdError, match="no such file: nothing/here.jsonl"):
        load_records("nothing/here.jsonl")
    with pytest.raises(SqsdError, match="no such file: typo-dataset"):
        load_records("typo-dataset")
    (tmp_path / "a.xlsx").write_bytes(b"PK")
    with pytest.raises(SqsdError, match=r"unsupported file type '\.xlsx'"):
        load_records(str(tmp_path / "a.xlsx"))
    with pytest.raises(SqsdError, match="is a directory"):
        load_records(str(tmp_path))


# --- the malformed files in tests/bad_inputs ------------------------------------------------------------------

# file, explicit format, where the error is (None = the whole file), field, message, records kept in skip mode
# (None = a file-level error that always raises)
BAD_INPUTS = [
    ("bad_completion.jsonl", "auto", ":2", "completion", "must be exactly one assistant message", 2),
    ("bad_is_safe.csv", "auto", ":4", "is_safe", "must be true or false, got string 'maybe'", 2),
    ("bad_json_line.jsonl", "auto", ":3", None, "invalid JSON: Expecting ',' delimiter (column 33)", 4),
    ("bad_messages.jsonl", "auto", ":2", "messages[1].role", "the last message must be the assistant response", 2),
    ("bad_row.json", "auto", " row 1", "instruction", "is empty", 2),
    ("broken.json", "auto", ":4", None, "invalid JSON: Expecting ',' delimiter (column 3)", None),
    ("bytes_column.parquet", "auto", " row 1", "audio", "holds a bytes value, which sqsd cannot carry", None),
    ("deep_nesting.jsonl", "auto", ":2", None, "invalid JSON: nested more than 100 levels deep", 2),
    ("duplicate_id.jsonl", "auto", ":3", "id", "duplicate id 'a'", 3),
    ("empty.jsonl", "auto", None, None, "file is empty", None),
    ("empty_response.jsonl", "auto", ":4", "response", "is empty", 3),
    ("latin1.jsonl", "auto", ":2", None, "not valid UTF-8 at byte 99", None),
    ("lone_surrogate.jsonl", "auto", ":2", "messages[1].content", "holds a lone surrogate U+D83D", 2),
    ("missing_column.csv", "alpaca", ":1", "output", "missing required column", None),
    ("missing_field.jsonl", "auto", ":2", "output", "missing required field", 3),
    ("nested_too_deep.jsonl", "auto", ":2", "extra", "is nested more than 100 levels deep", 2),
    ("not_a_list.json", "auto", None, None, "expected a list of records", None),
    ("not_object.jsonl", "auto", ":2", None, "expected a JSON object, got list", 2),
    ("pku_bad_safer_id.jsonl", "auto", ":2", "safer_response_id", "must be 0 or 1, got int 2", 2),
    ("short_row.csv", "auto", ":3", None, "has 2 values but the header has 3 columns", 2),
    ("unknown_format.jsonl", "auto", ":1", None, "cannot detect the format from the fields ['label', 'text']", None),
    ("wrong_type.jsonl", "auto", ":2", "output", "must be a non-empty string, got int", 2),
    ("wrong_type.parquet", "auto", " row 1", "output", "must be a non-empty string, got null", 2),
]


def test_every_bad_input_file_is_tested_and_documented():
    files = {p.name for p in BAD.iterdir() if p.is_file() and p.name != "README.md"}  # folders: other readers
    assert files == {name for name, *_ in BAD_INPUTS}
    readme = (BAD / "README.md").read_text()
    assert all(f"| {name} |" in readme for name in files)


@pytest.mark.parametrize("name, fmt, where, field, message, kept", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(name, fmt, where, field, message, kept):
    path = str(BAD / name)
    with pytest.raises(DataError) as info:
        load_records(path, format=fmt)
    text = str(info.value)
    assert text.startswith(f"{path}{where or ':'}" + ("" if where is None else ": "))
    if field is not None:
        assert f"field '{field}': " in text
    assert message in text
    if kept is None:  # a file-level problem stops the load in skip mode too
        with pytest.raises(DataError) as again:
            load_records(path, format=fmt, on_bad_record="skip")
        assert str(again.value) == text
        return
    loaded = load_records(path, format=fmt, on_bad_record="skip")
    assert len(loaded.records) == kept
    assert loaded.bad == [BadRecord(path, info.value.line, text)]


@pytest.mark.parametrize("name, location, field", [("missing_field.jsonl", ":2", "output"),
                                                   ("wrong_type.parquet", " row 1", "output"),
                                                   ("bytes_column.parquet", " row 1", "audio"),
                                                   ("lone_surrogate.jsonl", ":2", "messages[1].content"),
                                                   ("nested_too_deep.jsonl", ":2", "extra")])
def test_cli_reports_bad_input_without_traceback(name, location, field, capsys):
    path = str(BAD / name)
    assert main(["data", "inspect", path]) == 2
    err = capsys.readouterr().err
    assert f"{path}{location}: field '{field}'" in err
    assert "Traceback" not in err


def test_held_out_splits_are_disjoint_stable_and_cover_everything(tmp_path):
    from sqsd.data import SPLITS, split_of

    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt number {i}" for i in range(300)) + "\n")
    everything = load_records(str(path)).records
    parts = {name: load_records(f"{path}@{name}").records for name in SPLITS}
    ids = {name: {r.id for r in recs} for name, recs in parts.items()}
    assert not ids["align"] & ids["directions"] and not ids["align"] & ids["eval"]
    assert not ids["directions"] & ids["eval"]
    assert set().union(*ids.values()) == {r.id for r in everything}
    for name, fraction in SPLITS.items():  # 300 draws: within 4 standard deviations of the fraction
        assert abs(len(ids[name]) / 300 - fraction) < 4 * (fraction * (1 - fraction) / 300) ** 0.5
    # membership is a function of the id alone: file order does not matter
    path.write_text("\n".join(reversed(path.read_text().splitlines())) + "\n")
    assert all(split_of(r.id) == name for name, recs in parts.items() for r in recs)
    assert len(load_records(f"{path}@eval", limit=5).records) == 5


def test_split_of_the_packaged_pool_and_unknown_split(tmp_path):
    assert len(load_records("dolly-sqsd:S1@eval").records) < 1000
    with pytest.raises(SqsdError, match="no such file"):
        load_records(str(tmp_path / "p.txt@nosuchsplit"))
