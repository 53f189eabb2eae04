"""Batched generation: equal to one prompt at a time, independent of batch size, resumable, reproducible."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sqsd.cli import main
from sqsd.config import GenerateConfig
from sqsd.data import Record
from sqsd.errors import SqsdError
from sqsd.generate import generate, generate_records, read_done
from sqsd.render import encode_prompt
from sqsd.runs import sidecar_path
from tiny import tiny_model, tiny_tokenizer

# Varied lengths so that left padding matters in every batch (each character is one byte-level token).
TEXTS = ["hi", "tell me a long story about a dragon and a knight who meet in a castle at night", "x" * 40,
         "what?", "abc def ghi", "q" * 90, "z", "a short one", "how do I bake bread", "2 + 2 = ?"]
NEW = 8


def records(texts=TEXTS):
    return [Record(id=f"r{i}", source="test", row=i + 1, prompt=({"role": "user", "content": t},), response=None,
                   meta={"category": f"c{i % 3}"}) for i, t in enumerate(texts)]


def alone(model, tokenizer, record, eos, max_new_tokens=NEW):
    """Reference: plain HF greedy decoding of one unpadded prompt."""
    ids = torch.tensor([encode_prompt(record.prompt, tokenizer)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_batched_greedy_equals_one_prompt_at_a_time(model, tokenizer):
    recs = records()
    expected = [alone(model, tokenizer, r, tokenizer.eos_token_id) for r in recs]
    for batch_size in (1, 3, 8):
        out = generate_records(model, tokenizer, recs, max_new_tokens=NEW, batch_size=batch_size, progress=False)
        assert [g.id for g in out] == [r.id for r in recs]
        assert [list(g.token_ids) for g in out] == expected, batch_size
        assert all((g.finish_reason == "eos") == (g.token_ids[-1] == tokenizer.eos_token_id) for g in out)


def test_eos_ends_a_row_while_others_continue(model, tokenizer):
    """Pick as end token one that makes rows of one batch end at different steps: batched must still equal
    alone (HF fills finished rows with padding, which must not leak into responses)."""
    recs = records()
    free = [alone(model, tokenizer, r, None) for r in recs]

    def cut(ids, ends):
        return ids[:next((k + 1 for k, t in enumerate(ids) if t in ends), len(ids))]

    # The tokenizer's own eos always ends a response too.
    stop = next(t for ids in free for t in ids
                if len({len(cut(other, {t, tokenizer.eos_token_id})) for other in free}) > 1)
    model.generation_config.eos_token_id = stop
    out = generate_records(model, tokenizer, recs, max_new_tokens=NEW, batch_size=len(recs), progress=False)
    for g, ids in zip(out, free, strict=True):
        expected = cut(ids, {stop, tokenizer.eos_token_id})
        assert list(g.token_ids) == expected
        assert g.finish_reason == ("eos" if expected[-1] in (stop, tokenizer.eos_token_id) else "length")
    assert any(g.token_ids[-1] == stop for g in out)


def test_long_prompts_are_cut_from_the_left(model, tokenizer):
    recs = records()
    full = [encode_prompt(r.prompt, tokenizer) for r in recs]
    out = generate_records(model, tokenizer, recs, max_new_tokens=NEW, batch_size=4, max_prompt_length=40,
                           progress=False)
    for g, ids in zip(out, full, strict=True):
        assert g.prompt_truncated == (len(ids) > 40) and g.n_prompt_tokens == min(len(ids), 40)
    long = next(i for i, ids in enumerate(full) if len(ids) > 40)
    kept = torch.tensor([full[long][-40:]])
    ref = model.generate(kept, attention_mask=torch.ones_like(kept), do_sample=False, max_new_tokens=NEW,
                         pad_token_id=tokenizer.pad_token_id)
    assert list(out[long].token_ids) == ref[0, 40:].tolist()


def test_sampling_is_seeded_per_prompt_and_sample(model, tokenizer):
    recs = records()
    kw = {"max_new_tokens": NEW, "do_sample": True, "n": 3, "seed": 7, "progress": False}
    a = generate_records(model, tokenizer, recs, batch_size=4, **kw)
    b = generate_records(model, tokenizer, recs, batch_size=7, **kw)
    c = generate_records(model, tokenizer, list(reversed(recs)), batch_size=4, **kw)
    assert len(a) == 3 * len(recs) and [(g.id, g.sample) for g in a][:3] == [("r0", 0), ("r0", 1), ("r0", 2)]
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert sorted((g.id, g.sample, g.token_ids) for g in a) == sorted((g.id, g.sample, g.token_ids) for g in c)
    assert len({g.token_ids for g in a if g.id == "r0"}) == 3  # samples of one prompt differ
    other = generate_records(model, tokenizer, recs, batch_size=4, **{**kw, "seed": 8})
    assert [g.token_ids for g in other] != [g.token_ids for g in a]
    assert [g.token_ids for g in generate_records(model, tokenizer, recs, **{**kw, "temperature": 0.01})] != \
        [g.token_ids for g in a]


def test_done_pairs_are_skipped_and_on_batch_sees_every_batch(model, tokenizer):
    seen = []
    out = generate_records(model, tokenizer, records(), max_new_tokens=2, batch_size=4, done={("r1", 0), ("r5", 0)},
                           on_batch=lambda batch: seen.append(len(batch)), progress=False)
    assert {g.id for g in out} == {f"r{i}" for i in range(10)} - {"r1", "r5"} and seen == [4, 4]


def test_greedy_n_above_one_and_duplicate_ids_are_refused(model, tokenizer):
    with pytest.raises(SqsdError, match="do_sample"):
        generate_records(model, tokenizer, records(), n=2, progress=False)
    with pytest.raises(SqsdError, match="ids must be unique"):
        generate_records(model, tokenizer, records() + records(), progress=False)


def test_the_system_prompt_is_rendered(model, tokenizer):
    recs = records()[:2]
    plain = generate_records(model, tokenizer, recs, max_new_tokens=2, progress=False)
    system = generate_records(model, tokenizer, recs, max_new_tokens=2, system_prompt="Be brief.", progress=False)
    default = len(encode_prompt(recs[0].prompt, tokenizer))  # the tiny template's own default system turn
    assert plain[0].n_prompt_tokens == default
    assert system[0].n_prompt_tokens == len(encode_prompt(recs[0].prompt, tokenizer, "Be brief.")) != default


# -- the command: output file, sidecar, resume ----------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA whose B is random (init_lora_weights=False), so it really changes the model."""
    folder = tmp_path_factory.mktemp("tiny-adapter")
    torch.manual_seed(1)
    lora = get_peft_model(tiny_model(tiny_tokenizer()), LoraConfig(r=4, lora_alpha=32, init_lora_weights=False,
                                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    lora.save_pretrained(folder)
    return folder


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t, "category": f"c{i % 3}"}) + "\n"
                            for i, t in enumerate(TEXTS)))
    return path


def run(prompts_file, model_dir, output, **kw):
    config = GenerateConfig(data=str(prompts_file), model=str(model_dir), output=str(output),
                            **{"max_new_tokens": NEW, "batch_size": 4, **kw})
    return generate(config)


def lines(path):
    return {(d["id"], d["sample"]): d for d in map(json.loads, path.read_text().split("\n")[:-1])}


def test_output_lines_and_sidecar(prompts_file, model_dir, tmp_path):
    out = run(prompts_file, model_dir, tmp_path / "out" / "gen.jsonl")
    got = lines(out)
    assert set(got) == {(f"p{i}", 0) for i in range(len(TEXTS))}
    line = got[("p5", 0)]
    assert line["prompt"] == TEXTS[5] and line["messages"] == [{"role": "user", "content": TEXTS[5]}]
    assert line["meta"] == {"category": "c2"} and line["model"] == str(model_dir) and line["adapter"] is None
    assert isinstance(line["response"], str) and 0 < line["n_new_tokens"] <= NEW
    assert all(d["finish_reason"] == "eos" or d["n_new_tokens"] == NEW for d in got.values())
    assert line["generation"]["do_sample"] is False and "seed" not in line["generation"]
    run_file = json.loads(sidecar_path(out).read_text())
    assert run_file["config"]["max_new_tokens"] == NEW and run_file["inputs"]["model"]


def test_resume_after_interrupt_equals_uninterrupted(prompts_file, model_dir, tmp_path, monkeypatch):
    whole = lines(run(prompts_file, model_dir, tmp_path / "whole.jsonl"))
    import sqsd.generate as G

    real = G.generate_records

    def interrupted(*args, on_batch, **kw):
        def first_then_stop(batch):
            on_batch(batch)
            raise KeyboardInterrupt

        return real(*args, on_batch=first_then_stop, **kw)

    monkeypatch.setattr(G, "generate_records", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(prompts_file, model_dir, tmp_path / "resumed.jsonl")
    assert len(lines(tmp_path / "resumed.jsonl")) == 4  # the first batch was flushed before the interrupt
    monkeypatch.setattr(G, "generate_records", real)
    # A different batch size does not change any response, so it may resume.
    resumed = lines(run(prompts_file, model_dir, tmp_path / "resumed.jsonl", batch_size=3))
    assert resumed == whole


def test_half_written_last_line_is_dropped_and_redone(prompts_file, model_dir, tmp_path):
    out = run(prompts_file, model_dir, tmp_path / "gen.jsonl")
    whole = lines(out)
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:3]) + text[3][: len(text[3]) // 2])
    assert len(read_done(out)) == 3 and out.read_text() == "".join(text[:3])
    out.write_text("".join(text[:3]) + text[3][: len(text[3]) // 2])
    assert lines(run(prompts_file, model_dir, out)) == whole


def test_bad_complete_line_names_the_line(prompts_file, model_dir, tmp_path):
    out = run(prompts_file, model_dir, tmp_path / "gen.jsonl")
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + "{oops\n" + "".join(text[2:]))
    with pytest.raises(SqsdError, match=r"gen\.jsonl:3: not a generation line"):
        run(prompts_file, model_dir, out)


def test_a_different_config_refuses_and_overwrite_restarts(prompts_file, model_dir, tmp_path):
    out = run(prompts_file, model_dir, tmp_path / "gen.jsonl")
    before = out.read_text()
    with pytest.raises(SqsdError, match="max_new_tokens: 8 -> 3.*--overwrite"):
        run(prompts_file, model_dir, out, max_new_tokens=3)
    assert out.read_text() == before  # nothing lost
    run(prompts_file, model_dir, out, max_new_tokens=3, overwrite=True)
    assert lines(out) == lines(run(prompts_file, model_dir, tmp_path / "fresh.jsonl", max_new_tokens=3))
    assert json.loads(sidecar_path(out).read_text())["config"]["max_new_tokens"] == 3


def test_an_output_without_sidecar_or_with_changed_prompts_refuses(prompts_file, model_dir, tmp_path):
    stranger = tmp_path / "stranger.jsonl"
    stranger.write_text('{"x": 1}\n')
    with pytest.raises(SqsdError, match="has no stranger.jsonl.run.json"):
        run(prompts_file, model_dir, stranger)
    out = run(prompts_file, model_dir, tmp_path / "gen.jsonl")
    prompts_file.write_text(prompts_file.read_text().replace("what?", "what now?"))
    with pytest.raises(SqsdError, match="different prompt for record 'p3'"):
        run(prompts_file, model_dir, out)


def test_sampling_through_the_command_is_reproducible(prompts_file, model_dir, tmp_path):
    a = lines(run(prompts_file, model_dir, tmp_path / "a.jsonl", do_sample=True, n=3, seed=3, temperature=0.8))
    b = lines(run(prompts_file, model_dir, tmp_path / "b.jsonl", do_sample=True, n=3, seed=3, temperature=0.8,
                  batch_size=5))
    assert len(a) == 3 * len(TEXTS) and {k: v["response"] for k, v in a.items()} == \
        {k: v["response"] for k, v in b.items()}
    assert a[("p0", 0)]["generation"]["seed"] == 3


def test_an_adapter_changes_the_outputs(prompts_file, model_dir, adapter_dir, tmp_path):
    base = lines(run(prompts_file, model_dir, tmp_path / "base.jsonl"))
    tuned = lines(run(prompts_file, model_dir, tmp_path / "tuned.jsonl", adapter=str(adapter_dir)))
    assert tuned[("p0", 0)]["adapter"] == str(adapter_dir)
    assert sum(base[k]["response"] != tuned[k]["response"] for k in base) >= len(TEXTS) // 2
    with pytest.raises(SqsdError, match="adapter"):  # the same file with another adapter is another run
        run(prompts_file, model_dir, tmp_path / "base.jsonl", adapter=str(adapter_dir))


def test_cli_end_to_end(prompts_file, model_dir, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    argv = ["generate", str(prompts_file), "--model", str(model_dir), "--output", str(out), "--max-new-tokens", "4",
            "--batch-size", "3", "--limit", "5"]
    assert main(argv) == 0
    assert set(lines(out)) == {(f"p{i}", 0) for i in range(5)}
    assert main(argv[:-1] + ["7"]) == 0  # a larger --limit extends the same file
    assert set(lines(out)) == {(f"p{i}", 0) for i in range(7)}
    assert "2 to generate, 5 already in" in capsys.readouterr().out
    assert main(argv + ["--max-new-tokens", "5"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_a_second_command_writing_the_same_file_refuses(prompts_file, model_dir, tmp_path):
    from sqsd.runs import open_run

    out = tmp_path / "gen.jsonl"
    config = GenerateConfig(data=str(prompts_file), model=str(model_dir), output=str(out), max_new_tokens=NEW)
    with open_run(out, config, {}, file=True), pytest.raises(SqsdError, match="another sqsd command is writing"):
        generate(config)  # the first command is still writing
    assert not out.exists()  # the second wrote nothing
    with pytest.raises(SqsdError, match="--output .*: is a folder, not a file"):
        run(prompts_file, model_dir, tmp_path)
    run(prompts_file, model_dir, out)
    sidecar_path(out).write_text("{")
    with pytest.raises(SqsdError, match="gen.jsonl.run.json is corrupt"):
        run(prompts_file, model_dir, out)
