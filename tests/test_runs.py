import json
import os

import pytest
import torch
from safetensors.torch import save_file

from sqsd.config import TrainConfig
from sqsd.errors import SqsdError
from sqsd.fingerprints import SAMPLE_BLOCKS, SAMPLE_SIZE, fingerprint
from sqsd.runs import open_run, sidecar_path


def cfg(**kw):
    return TrainConfig(data="d.jsonl", output_dir="out", **kw)


def test_fresh_then_resume_then_done(tmp_path):
    out = tmp_path / "run"
    with open_run(out, cfg(), {"data": "abc"}) as run:
        assert run.state == "fresh"
        (out / "partial.txt").write_text("work so far")
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"]["learning_rate"] == 2e-4 and saved["inputs"] == {"data": "abc"}
    assert saved["files"] == ["partial.txt"] and "result" not in saved  # the manifest: what the run wrote
    with open_run(out, cfg(), {"data": "abc"}) as run:
        assert run.state == "resume"
        assert (out / "partial.txt").exists()  # resuming keeps the work
        run.finish({"steps": 3})
    with open_run(out, cfg(), {"data": "abc"}) as run:
        assert run.state == "done" and run.result == {"steps": 3}


def test_inputs_are_computed_once_by_the_deciding_process(tmp_path):
    calls = []
    with open_run(tmp_path / "r", cfg(), lambda: calls.append(1) or {"data": "abc"}) as run:
        assert run.inputs == {"data": "abc"}
    assert calls == [1]


def test_control_fields_and_other_spellings_of_the_folder_are_the_same_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_run("o", TrainConfig(data="d.jsonl", output_dir="o"), {}) as run:
        run.finish({"steps": 1})
    for spelling in ("./o", str(tmp_path / "o"), "o/"):
        with open_run(spelling, TrainConfig(data="d.jsonl", output_dir=spelling, resume=True), {}) as run:
            assert run.state == "done"
    os.rename(tmp_path / "o", tmp_path / "moved")
    with open_run("moved", TrainConfig(data="d.jsonl", output_dir="moved"), {}) as run:
        assert run.state == "done"


def test_ignored_fields_resume_but_only_equal_ones_are_done(tmp_path):
    with open_run(tmp_path / "r", cfg(batch_size=4), {}, ignore=("batch_size",)) as run:
        run.finish({})
    with open_run(tmp_path / "r", cfg(batch_size=2), {}, ignore=("batch_size",)) as run:
        assert run.state == "resume"
    with pytest.raises(SqsdError, match="batch_size: 2 -> 3"):
        open_run(tmp_path / "r", cfg(batch_size=3), {})


@pytest.mark.parametrize(("config", "inputs", "named"), [
    (cfg(learning_rate=1e-4), {"data": "abc"}, "config.learning_rate: 0.0002 -> 0.0001"),
    (cfg(), {"data": "xyz"}, "inputs.data: 'abc' -> 'xyz'"),
])
def test_different_rerun_refuses_and_overwrite_removes_only_what_the_run_wrote(tmp_path, config, inputs, named):
    out = tmp_path / "r"
    with open_run(out, cfg(), {"data": "abc"}):
        (out / "result.bin").write_text("old")
        (out / "sub").mkdir()
        (out / "sub" / "x").write_text("old")
    (out / "notes.txt").write_text("the user's own")  # put there after the run
    with pytest.raises(SqsdError, match="different config or inputs.*--overwrite") as e:
        open_run(out, config, inputs)
    assert named in str(e.value)
    assert (out / "result.bin").exists()  # nothing lost
    with open_run(out, config, inputs, overwrite=True) as run:
        assert run.state == "fresh"
    assert sorted(p.name for p in out.iterdir()) == [".sqsd.lock", "notes.txt", "run.json"]


def test_overwrite_never_deletes_an_input_of_the_command(tmp_path):
    out = tmp_path / "r"
    with open_run(out, cfg(), {}):
        (out / "scores.jsonl").write_text("{}\n")
    with pytest.raises(SqsdError, match="would delete .*scores.jsonl, an input of this command"):
        open_run(out, TrainConfig(data=str(out / "scores.jsonl"), output_dir="o", seed=1), {}, overwrite=True,
                 input_fields=("data",))
    assert (out / "scores.jsonl").read_text() == "{}\n"


def test_a_folder_sqsd_did_not_make_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(SqsdError, match="not empty and was not made by sqsd"):
            open_run(tmp_path, cfg(), {}, overwrite=overwrite)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_a_second_writer_refuses_while_the_first_holds_the_lock(tmp_path):
    with open_run(tmp_path / "r", cfg(), {}), pytest.raises(SqsdError, match="another sqsd command is writing"):
        open_run(tmp_path / "r", cfg(), {})
    with open_run(tmp_path / "r", cfg(), {}) as run:  # released on leaving
        assert run.state == "resume"
    out = tmp_path / "gen.jsonl"
    with open_run(out, cfg(), {}, file=True), pytest.raises(SqsdError, match="--output .*gen.jsonl: another sqsd"):
        open_run(out, cfg(), {}, file=True)


def test_output_paths_of_the_wrong_kind_name_the_flag(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SqsdError, match="--output-dir .*f: is a file, not a folder"):
        open_run(tmp_path / "f", cfg(), {})
    with pytest.raises(SqsdError, match="--output .*: is a folder, not a file"):
        open_run(tmp_path, cfg(), {}, file=True)
    with pytest.raises(SqsdError, match="--output-dir .*a parent of it is a file"):
        open_run(tmp_path / "f" / "sub", cfg(), {})
    with pytest.raises(SqsdError, match="--output .*f/x.jsonl: a parent of it is a file"):
        open_run(tmp_path / "f" / "x.jsonl", cfg(), {}, file=True)


def test_a_file_output_uses_a_sidecar_and_refuses_a_file_sqsd_did_not_make(tmp_path):
    out = tmp_path / "gen.jsonl"
    with open_run(out, cfg(), {"m": "1"}, file=True) as run:
        assert run.state == "fresh"
        out.write_text("line\n")
        run.finish({"lines": 1})
    assert json.loads(sidecar_path(out).read_text())["result"] == {"lines": 1}
    with open_run(out, cfg(), {"m": "1"}, file=True) as run:
        assert run.state == "done"
    with pytest.raises(SqsdError, match="inputs.m: '1' -> '2'"):
        open_run(out, cfg(), {"m": "2"}, file=True)
    with open_run(out, cfg(), {"m": "2"}, file=True, overwrite=True) as run:
        assert run.state == "fresh" and not out.exists()
    stranger = tmp_path / "stranger.jsonl"
    stranger.write_text("mine\n")
    with pytest.raises(SqsdError, match="has no stranger.jsonl.run.json, so it was not made by sqsd"):
        open_run(stranger, cfg(), {}, file=True, overwrite=True)
    assert stranger.read_text() == "mine\n"


@pytest.mark.parametrize("file", [False, True])
def test_a_corrupt_record_names_the_file_and_the_way_out(tmp_path, file):
    out = tmp_path / ("gen.jsonl" if file else "r")
    with open_run(out, cfg(), {}, file=file):
        pass
    record = sidecar_path(out) if file else out / "run.json"
    if file:
        out.write_text("")
    record.write_text('{"config": {"lr"')
    with pytest.raises(SqsdError, match=f"{record.name} is corrupt \\(not valid JSON.*restore it, or move"):
        open_run(out, cfg(), {}, file=file)
    record.write_text("[1, 2]")
    with pytest.raises(SqsdError, match="not a JSON object"):
        open_run(out, cfg(), {}, file=file)


# --- fingerprints -----------------------------------------------------------------------------------------------

def test_fingerprint_tracks_content(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"1")
    before = fingerprint(tmp_path / "m")
    assert fingerprint(tmp_path / "m") == before
    (tmp_path / "m" / "w.bin").write_bytes(b"2")
    assert fingerprint(tmp_path / "m") != before
    assert fingerprint("org/some-model") == "id:org/some-model"


def test_changing_one_weight_of_a_safetensors_model_changes_its_fingerprint(tmp_path):
    from tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(tok)
    model.save_pretrained(tmp_path / "a")
    before = fingerprint(tmp_path / "a")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 2] += 1e-3
    model.save_pretrained(tmp_path / "a")
    assert fingerprint(tmp_path / "a") != before


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts bytes read through /proc/self/io")
def test_a_big_weight_file_is_sampled_not_read_whole(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    weights = torch.zeros(64 << 20, dtype=torch.uint8)  # 64 MiB
    save_file({"w": weights}, str(folder / "model.safetensors"))
    size = (folder / "model.safetensors").stat().st_size
    start = _bytes_read()
    before = fingerprint(folder)
    read = _bytes_read() - start
    assert read < SAMPLE_BLOCKS * SAMPLE_SIZE + (1 << 20) and read < size / 3, (read, size)
    start = _bytes_read()
    assert fingerprint(folder) == before and _bytes_read() - start < 1 << 16  # cached for the process
    # a change inside a sampled block and a change of the header are both seen
    weights[-1] = 7  # the last block is always sampled
    save_file({"w": weights}, str(folder / "model.safetensors"))
    changed = fingerprint(folder)
    assert changed != before
    save_file({"w": weights}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert fingerprint(folder) not in (before, changed)


def test_data_fingerprints_hash_files_named_datasets_and_splits(tmp_path):
    from sqsd.fingerprints import data_fingerprints

    (tmp_path / "d.jsonl").write_text('{"prompt": "x"}\n')
    assert data_fingerprints(str(tmp_path / "d.jsonl")) == {"data": fingerprint(tmp_path / "d.jsonl")}
    named = data_fingerprints("dolly-sqsd:S1")
    assert list(named) == ["data:S1.jsonl"] and len(named["data:S1.jsonl"]) == 64
    split = data_fingerprints(str(tmp_path / "d.jsonl") + "@eval")
    assert split == {"data@eval": fingerprint(tmp_path / "d.jsonl")}
    assert data_fingerprints("org/dataset") == {"data": "id:org/dataset"}


def test_an_input_is_compared_by_its_fingerprint_not_by_how_its_path_is_spelt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("{}\n")
    with open_run("o", TrainConfig(data="d.jsonl", output_dir="o"), {"data": "abc"}, input_fields=("data",)) as run:
        run.finish({})
    (tmp_path / "moved").mkdir()
    os.rename(tmp_path / "d.jsonl", tmp_path / "moved" / "d.jsonl")  # same content, so the same fingerprint
    moved = TrainConfig(data="moved/d.jsonl", output_dir="o")
    with open_run("o", moved, {"data": "abc"}, input_fields=("data",)) as run:
        assert run.state == "done"
    with pytest.raises(SqsdError, match="inputs.data: 'abc' -> 'xyz'"):  # new content is a new input
        open_run("o", moved, {"data": "xyz"}, input_fields=("data",))
    # a field that is not fingerprinted is still compared, but two spellings of one path are the same
    with open_run("p", TrainConfig(data="moved/d.jsonl", output_dir="p"), {}) as run:
        run.finish({})
    with open_run("p", TrainConfig(data=str(tmp_path / "moved" / "d.jsonl"), output_dir="p"), {}) as run:
        assert run.state == "done"
