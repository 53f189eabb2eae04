"""`sqsd score`: the file's numbers are the reference scorer's, per term and anchor; resume, skips, passes, torchrun.

Files are built once per module: a tiny float64 Llama folder, two different LoRA anchors with non-zero B (so
gradients w.r.t. A are not trivially zero), random low-rank direction files (the safety one on a subset of
modules) and an Alpaca JSONL whose records vary in length, one long enough to be truncated.
"""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from sqsd import directions, score
from sqsd.cli import main
from sqsd.config import ScoreConfig
from sqsd.data import Record, load_records
from sqsd.errors import SqsdError
from sqsd.model import load_model
from sqsd.projection import Projections
from sqsd.reference import reference_scores
from sqsd.render import encode_record
from sqsd.terms import Term, check_files, load_terms
from tiny import tiny_model, tiny_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ANSWERS = ["Yes.", "Paris is the capital of France.", "Four.", "Water boils at 100 degrees Celsius.", "No.",
           "Blue, mostly.", "Seven.", "Spiders have eight legs.", "Because the sky scatters blue light."]
MAX_LENGTH = 128


def _anchor(model_dir, folder, seed, r, alpha):
    torch.manual_seed(seed)
    model, _ = load_model(str(model_dir), "float64")
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False))
    peft.save_pretrained(folder)
    return folder


def _direction(model_dir, path, seed, modules=None, kind="lowrank"):
    model, _ = load_model(str(model_dir), "float64")
    g = torch.Generator().manual_seed(seed)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    terms = {}
    for name in sorted(modules or linears):
        out, inp = linears[name].weight.shape
        terms[name] = (directions.LowRank(torch.randn(3, inp, generator=g, dtype=torch.float64),
                                 torch.randn(out, 3, generator=g, dtype=torch.float64)) if kind == "lowrank"
                       else directions.Dense(torch.randn(out, inp, generator=g, dtype=torch.float64)))
    return directions.save(directions.Direction(terms, kind="direction"), path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    tok = tiny_tokenizer()
    model_dir = root / "model"
    tiny_model(tok, dtype=torch.float64).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "data.jsonl"
    prompts = [f"Question {i}?" for i in range(len(ANSWERS))]
    prompts[4] = "Please read this long preamble carefully before you answer. " * 3  # truncated at MAX_LENGTH
    data.write_text("".join(json.dumps({"instruction": p, "output": a, "tag": i}) + "\n"
                            for i, (p, a) in enumerate(zip(prompts, ANSWERS))))
    some = [f"model.layers.{layer}.{part}" for layer in (0, 1) for part in ("self_attn.q_proj", "mlp.down_proj")]
    return SimpleNamespace(
        root=root, model=model_dir, data=data,
        danger_anchor=_anchor(model_dir, root / "anchor-danger", seed=1, r=4, alpha=8),  # scaling 2
        safety_anchor=_anchor(model_dir, root / "anchor-safety", seed=2, r=2, alpha=6),  # scaling 3
        danger=_direction(model_dir, root / "danger.safetensors", seed=10),
        safety=_direction(model_dir, root / "safety.safetensors", seed=11, modules=some),
        dense=_direction(model_dir, root / "dense.safetensors", seed=12, kind="dense"))


def config(files, out, **kw):
    base = {"data": str(files.data), "model": str(files.model), "dtype": "float64", "danger": str(files.danger),
            "safety": str(files.safety), "danger_anchor": str(files.danger_anchor),
            "safety_anchor": str(files.safety_anchor), "max_length": MAX_LENGTH, "batch_size": 3, "chunk_size": 4,
            "output_dir": str(out)}
    return ScoreConfig(**{**base, **kw})


def reference(files, term, anchor=None, scaling=None, metric="cosine-sum"):
    """(metric, loss) per record from the slow reference scorer, with the model loaded afresh."""
    model, tok = load_model(str(files.model), "float64")
    records = load_records(str(files.data)).records
    encoded = [encode_record(r, tok, None, MAX_LENGTH) for r in records]
    assert [e.truncated for e in encoded] == [i == 4 for i in range(9)]  # one record loses prompt tokens
    if anchor is not None:
        model = PeftModel.from_pretrained(model, str(anchor))
    p = reference_scores(model, encoded, [directions.load(getattr(files, term))],
                         adapter=None if anchor is None else "default", scaling=scaling)
    return p.scores[metric][:, 0].tolist(), p.loss.tolist(), [e.n_response_tokens for e in encoded]


def close(a, b, rtol=1e-9, atol=1e-12):
    return all(math.isclose(x, y, rel_tol=rtol, abs_tol=atol) for x, y in zip(a, b, strict=True))


def test_file_equals_the_reference_per_term_and_anchor(files, tmp_path):
    out = score.score(config(files, tmp_path / "run"))
    assert out == tmp_path / "run" / "scores.parquet"
    table = pq.read_table(out)
    assert table.column_names == list(score.COLUMNS)
    rows = table.to_pylist()
    records = load_records(str(files.data)).records
    assert [r["index"] for r in rows] == list(range(9)) and [r["id"] for r in rows] == [r.id for r in records]
    assert all(r["status"] == "ok" for r in rows)

    danger, loss, n_tokens = reference(files, "danger", files.danger_anchor)  # at its own scaling alpha/r
    safety, _, _ = reference(files, "safety", files.safety_anchor, scaling=1.0)  # the paper's default
    assert close([r["danger"] for r in rows], danger) and close([r["safety"] for r in rows], safety)
    assert close([r["loss"] for r in rows], loss)  # the response-only loss at the danger anchor
    assert [r["n_response_tokens"] for r in rows] == n_tokens
    assert all(r["risk"] == r["danger"] - r["safety"] for r in rows)
    # not vacuous: the terms differ from each other and from sample to sample
    assert len({round(v, 9) for v in danger}) == 9 and not close(danger, safety, rtol=1e-3)
    # the safety scaling override is in effect: at the adapter's own scaling (3) the numbers differ
    own, _, _ = reference(files, "safety", files.safety_anchor, scaling=None)
    assert not close(own, safety, rtol=1e-3)

    d, s = torch.tensor(danger, dtype=torch.float64), torch.tensor(safety, dtype=torch.float64)
    z = (d - d.mean()) / d.std(unbiased=False) - (s - s.mean()) / s.std(unbiased=False)
    assert close([r["risk_z"] for r in rows], z.tolist())

    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["safety_scaling"] == 1.0 and run["config"]["danger_scaling"] is None
    assert {"model", "data", "danger", "safety", "danger_anchor", "safety_anchor"} <= set(run["inputs"])
    assert sorted(p.name for p in (tmp_path / "run" / "chunks").iterdir()) == ["00000.jsonl", "00001.jsonl",
                                                                               "00002.jsonl"]


def test_dense_term_next_to_an_anchored_term(files, tmp_path):
    """A term without anchor is scored at the model itself, even when the other term's adapter is loaded."""
    out = score.score(config(files, tmp_path / "run", danger=str(files.dense), danger_anchor=None, metric="projection",
                         format_out="jsonl"))
    rows = score.read_scores(out)
    danger, loss, _ = reference(files, "dense", metric="projection")
    safety, _, _ = reference(files, "safety", files.safety_anchor, scaling=1.0, metric="projection")
    assert close([r["danger"] for r in rows], danger) and close([r["safety"] for r in rows], safety)
    assert close([r["loss"] for r in rows], loss)  # the loss of the dense model: the adapter was switched off


def test_one_term_leaves_the_other_column_empty(files, tmp_path):
    out = score.score(config(files, tmp_path / "run", danger=None, danger_anchor=None))
    rows = score.read_scores(out)
    safety, loss, _ = reference(files, "safety", files.safety_anchor, scaling=1.0)
    assert all(r["danger"] is None for r in rows) and close([r["safety"] for r in rows], safety)
    assert [r["risk"] for r in rows] == [-r["safety"] for r in rows]
    assert close([r["loss"] for r in rows], loss)  # no danger term: the loss at the safety anchor


def test_same_anchor_one_pass_equals_two_passes(files, tmp_path, monkeypatch):
    calls = []
    real = score.project

    def spy(model, samples, directions, **kw):
        calls.append(len(directions))
        return real(model, samples, directions, **kw)

    monkeypatch.setattr(score, "project", spy)
    same = {"safety_anchor": str(files.danger_anchor), "danger_scaling": None}
    one = score.read_scores(score.score(config(files, tmp_path / "one", **same, safety_scaling=None)))
    assert calls == [2] * 5  # chunks of 4, 4, 1 in batches of 3: 5 batches, one pass each with both directions
    calls.clear()
    # the anchor's own scaling (alpha/r = 2) given explicitly: a different key, so two passes, same numbers
    two = score.read_scores(score.score(config(files, tmp_path / "two", **same, safety_scaling=2.0)))
    assert calls == [1] * 10
    for key in ("danger", "safety", "risk", "risk_z", "loss"):
        assert close([r[key] for r in one], [r[key] for r in two], rtol=1e-12, atol=1e-14), key
    safety, _, _ = reference(files, "safety", files.danger_anchor)
    assert close([r["safety"] for r in one], safety)
    # the shared folder is loaded once
    model, _ = load_model(str(files.model), "float64")
    wrapped, terms = load_terms(config(files, tmp_path / "x", **same), model)
    assert set(wrapped.peft_config) == {"danger"} and terms["safety"].adapter == "danger"


def test_resume_after_an_interrupt_gives_the_same_file(files, tmp_path, monkeypatch, capsys):
    full = score.read_scores(score.score(config(files, tmp_path / "full")))
    written = []
    real = score._write_chunk

    def interrupt_after_one(path, rows):
        real(path, rows)
        written.append(path.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(score, "_write_chunk", interrupt_after_one)
    cfg = config(files, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        score.score(cfg)
    assert written == ["00000.jsonl"] and not (tmp_path / "run" / "scores.parquet").exists()

    def record(path, rows):
        real(path, rows)
        written.append(path.name)

    monkeypatch.setattr(score, "_write_chunk", record)
    written.clear()
    out = score.score(cfg)
    assert written == ["00001.jsonl", "00002.jsonl"]  # the finished chunk was not scored again
    assert score.read_scores(out) == full  # identical, bit for bit

    def no_model(*args, **kw):
        raise AssertionError("a finished run must not load the model")

    monkeypatch.setattr("sqsd.model.load_model", no_model)
    capsys.readouterr()
    assert score.score(cfg) == out and "already done" in capsys.readouterr().out
    with pytest.raises(SqsdError, match="different config.*batch_size: 3 -> 2.*--overwrite"):
        score.score(config(files, tmp_path / "run", batch_size=2))
    monkeypatch.undo()
    again = score.read_scores(score.score(config(files, tmp_path / "run", batch_size=2, overwrite=True)))
    # another batch size: other batches, the same numbers (batch invariance)
    assert close([r["risk"] for r in again], [r["risk"] for r in full])


def test_skipped_records_have_null_scores_not_nan(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    direction = directions.Direction({n: directions.LowRank(torch.randn(2, m.in_features, generator=g, dtype=torch.float64),
                                           torch.randn(m.out_features, 2, generator=g, dtype=torch.float64))
                             for n, m in model.named_modules() if n.endswith(("q_proj", "up_proj"))})

    def rec(i, response):
        return Record(str(i), "t", i, ({"role": "user", "content": f"question {i}"},), response, {})

    records = [rec(0, "an answer"), rec(1, None), rec(2, "another answer"), rec(3, "   "), rec(4, "ok")]
    rows = score.add_risk_z(score.score_records(model, tok, records, danger=Term(direction), batch_size=2))
    assert [r["status"] for r in rows] == ["ok", "skipped: record has no response (a prompt-only record cannot be "
                                           "trained on or scored)", "ok", "skipped: empty response", "ok"]
    for r in (rows[1], rows[3]):
        assert all(r[k] is None for k in ("danger", "safety", "risk", "risk_z", "loss", "n_response_tokens"))
    alone = score.add_risk_z(score.score_records(model, tok, [records[i] for i in (0, 2, 4)], danger=Term(direction)))
    assert close([rows[i]["danger"] for i in (0, 2, 4)], [r["danger"] for r in alone])
    assert close([rows[i]["risk_z"] for i in (0, 2, 4)], [r["risk_z"] for r in alone])  # skips leave z alone
    for name in ("s.parquet", "s.jsonl"):
        back = score.read_scores(score.write_scores(rows, tmp_path / name))
        assert back[1]["danger"] is None and back[3]["loss"] is None and back[0]["danger"] == rows[0]["danger"]
    assert pq.read_table(tmp_path / "s.parquet").column("risk").null_count == 2
    assert "NaN" not in (tmp_path / "s.jsonl").read_text()


def test_bad_inputs_are_clear_errors(files, tmp_path):
    with pytest.raises(SqsdError, match="give --danger and/or --safety"):
        ScoreConfig(data="d.jsonl", output_dir="o")
    with pytest.raises(SqsdError, match="--danger-anchor is given but --danger is not"):
        ScoreConfig(data="d.jsonl", output_dir="o", safety="s", danger_anchor="a")
    with pytest.raises(SqsdError, match="--safety-scaling must be a positive number"):
        ScoreConfig(data="d.jsonl", output_dir="o", safety="s", safety_scaling=0.0)
    with pytest.raises(SqsdError, match="--chunk-size must be positive"):
        ScoreConfig(data="d.jsonl", output_dir="o", safety="s", chunk_size=0)
    with pytest.raises(SqsdError, match="direction file .*missing.safetensors does not exist"):
        score.score(config(files, tmp_path / "a", danger=str(tmp_path / "missing.safetensors")))
    with pytest.raises(SqsdError, match="--safety-anchor: .* is not a PEFT adapter folder"):
        score.score(config(files, tmp_path / "b", safety_anchor=str(tmp_path)))
    wide = directions.load(files.danger)
    name = next(iter(wide.modules))
    wrong = directions.Direction({**wide.modules, name: directions.LowRank(torch.ones(3, 5), torch.ones(7, 3))})
    directions.save(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(SqsdError, match=f"module {name}: shape \\(7, 5\\).*another model"):
        score.score(config(files, tmp_path / "c", danger=str(tmp_path / "wrong.safetensors")))
    lm_head = directions.Direction({"lm_head": directions.Dense(torch.ones(len(tiny_tokenizer()), 32, dtype=torch.float64))})
    directions.save(lm_head, tmp_path / "head.safetensors")
    with pytest.raises(SqsdError, match=r"the anchor adapter 'safety' has no LoRA on 1 module\(s\) the direction "
                                        r"uses, e.g. lm_head"):
        score.score(config(files, tmp_path / "d", safety=str(tmp_path / "head.safetensors")))


def test_the_non_finite_guard_skips_a_row_instead_of_writing_nan(monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_model(tok, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    direction = directions.Direction({n: directions.Dense(torch.randn(m.weight.shape, generator=g,
                                                                      dtype=torch.float64))
                                      for n, m in model.named_modules() if n.endswith("q_proj")})
    records = [Record(str(i), "t", i, ({"role": "user", "content": "q" * (i + 1)},), "an answer", {})
               for i in range(4)]
    real = score.project

    def overflowing(*args, **kw) -> Projections:  # the shortest sample of the batch overflows
        p = real(*args, **kw)
        p.dots[0] = float("nan")
        return p

    monkeypatch.setattr(score, "project", overflowing)
    rows = score.score_records(model, tok, records, danger=Term(direction), batch_size=4)
    assert rows[0]["status"].startswith("skipped: non-finite danger (nan); the model overflows in this dtype?")
    assert rows[0]["danger"] is None and rows[0]["risk"] is None and rows[0]["loss"] is None
    assert [r["status"] for r in rows[1:]] == ["ok"] * 3 and all(math.isfinite(r["risk"]) for r in rows[1:])


def _fresh_anchor(model_dir, folder, **kw):
    """A PEFT adapter as `get_peft_model` makes it: B = 0 (or DoRA, with `use_dora=True`)."""
    model, _ = load_model(str(model_dir), "float64")
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, **kw)).save_pretrained(folder)
    return str(folder)


def test_zero_and_dora_anchors_are_clear_errors(files, tmp_path, capsys):
    zero = _fresh_anchor(files.model, tmp_path / "zero")
    with pytest.raises(SqsdError, match="--safety-anchor .*zero: every lora_B is zero .*carries no signal.*"
                                        "--allow-zero-anchor"):
        score.score(config(files, tmp_path / "a", safety_anchor=zero))
    args = [str(files.data), "--model", str(files.model), "--safety", str(files.safety), "--safety-anchor", zero,
            "--max-length", str(MAX_LENGTH)]
    assert main(["score", *args, "--output-dir", str(tmp_path / "cli")]) == 2
    assert "every lora_B is zero" in capsys.readouterr().err
    rows = score.read_scores(score.score(config(files, tmp_path / "b", safety_anchor=zero, allow_zero_anchor=True,
                                                danger=None, danger_anchor=None)))
    assert all(r["status"] == "ok" for r in rows)  # overridden: scored at the fresh adapter
    torch.manual_seed(0)
    dora = _fresh_anchor(files.model, tmp_path / "dora", use_dora=True, init_lora_weights=False)
    with pytest.raises(SqsdError, match="anchor adapter 'safety' is a DoRA adapter"):
        score.score(config(files, tmp_path / "c", safety_anchor=dora))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((tmp_path / "zero" / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SqsdError, match="--danger-anchor: .*broken/adapter_model.safetensors: Error while "
                                        "deserializing header"):
        score.score(config(files, tmp_path / "d", danger_anchor=str(broken)))


def test_warnings_for_a_safety_anchor_that_is_not_the_directions_source_and_an_unfingerprinted_direction(
        files, tmp_path, capsys):
    from sqsd.fingerprints import model_fingerprint

    built = directions.from_adapter(files.safety_anchor, "safety")
    assert built.meta["source_fingerprint"] == directions.adapter_fingerprint(files.safety_anchor)
    meta = {**built.meta, "base_fingerprint": model_fingerprint(str(files.model)), "step": 100}
    safety = directions.save(directions.Direction(built.modules, "safety", meta), tmp_path / "safety.safetensors")
    capsys.readouterr()
    score.score(config(files, tmp_path / "same", safety=str(safety), danger=None, danger_anchor=None))
    assert "warning" not in capsys.readouterr().err  # the anchor is the very adapter; the base model is known
    score.score(config(files, tmp_path / "other", safety=str(safety), safety_anchor=str(files.danger_anchor)))
    err = capsys.readouterr().err
    assert (f"warning: --safety-anchor {files.danger_anchor} is not the adapter the safety direction was built "
            f"from ({files.safety_anchor}, step 100); the paper takes both at the same checkpoint") in err
    assert f"warning: --danger {files.danger} records no base model (imported without --model?)" in err
    assert "--safety " not in err  # the safety direction records its base model
    # a file without the fingerprint is compared by its adapter folder; a dense direction has no adapter source
    for source, warned in ((files.safety_anchor, False), (files.danger_anchor, True), ("tuned - base", False)):
        meta = {k: v for k, v in built.meta.items() if k != "source_fingerprint"} | {"source": str(source)}
        directions.save(directions.Direction(built.modules, "safety", meta), tmp_path / "old.safetensors")
        check_files(config(files, tmp_path / "x", safety=str(tmp_path / "old.safetensors")))
        assert ("is not the adapter the safety direction was built from" in capsys.readouterr().err) == warned


def test_an_anchor_for_another_model_size_is_a_clear_error(files, tmp_path):
    tok = tiny_tokenizer()
    wide = tmp_path / "wide"
    tiny_model(tok, hidden=48, dtype=torch.float64).save_pretrained(wide)
    tok.save_pretrained(wide)
    anchor = _anchor(wide, tmp_path / "wide-anchor", seed=1, r=2, alpha=4)
    with pytest.raises(SqsdError, match=r"--danger-anchor .*wide-anchor: module model.layers.0.mlp.down_proj: LoRA "
                                        r"factors A \(2, 96\) and B \(48, 2\) do not fit the model's layer "
                                        r"\(32 out × 64 in\)"):
        score.score(config(files, tmp_path / "a", danger_anchor=str(anchor)))


def test_direction_files_are_validated_before_the_model_is_loaded(files, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kw):
        raise AssertionError("the model must not be loaded before the direction files are validated")

    monkeypatch.setattr("sqsd.model.load_model", no_model)
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(files.danger.read_bytes()[:-10])
    with pytest.raises(SqsdError, match=f"direction file {bad} is not a readable safetensors file"):
        score.score(config(files, tmp_path / "a", danger=str(bad)))
    args = [str(files.data), "--model", str(files.model), "--danger", str(bad), "--output-dir", str(tmp_path / "b")]
    assert main(["score", *args]) == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err


def test_torchrun_two_processes_write_the_same_file_as_one(files, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = ["-m", "sqsd", "score", str(files.data), "--model", str(files.model), "--danger", str(files.danger),
            "--safety", str(files.safety), "--danger-anchor", str(files.danger_anchor), "--safety-anchor",
            str(files.safety_anchor), "--max-length", str(MAX_LENGTH), "--batch-size", "2", "--chunk-size", "2",
            "--method", "sqsd", "grad-norm", "self-inf-n", "loss", "random", "length"]  # every method, sharded
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    results = {}
    for name, launcher in (("ddp", torchrun), ("single", [sys.executable])):
        cmd = [*launcher, *args, "--output-dir", str(tmp_path / name)]
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        results[name] = result.stdout
    assert "5 chunk(s) of 2: 0 done, 5 to score over 2 processes" in results["ddp"]
    assert results["ddp"].count("riskiest") == 1  # rank 0 alone merged and summarised
    ddp, single = (pq.read_table(tmp_path / n / "scores.parquet").to_pylist() for n in ("ddp", "single"))
    assert ddp == single and all(r["status"] == "ok" for r in ddp)  # float32, identical to the last bit
    assert all(r["score"] == r["sqsd"] == r["risk"] and r["grad-norm"] > 0 for r in ddp)
    for chunk in range(5):
        name = f"chunks/{chunk:05d}.jsonl"
        assert (tmp_path / "ddp" / name).read_text() == (tmp_path / "single" / name).read_text()


def test_a_second_command_scoring_the_same_folder_refuses(files, tmp_path, monkeypatch):
    from sqsd.runs import open_run

    def no_model(*args, **kw):
        raise AssertionError("the refused command must not load the model")

    monkeypatch.setattr("sqsd.model.load_model", no_model)
    cfg = config(files, tmp_path / "run")
    with open_run(tmp_path / "run", cfg, score._inputs(cfg)), \
            pytest.raises(SqsdError, match="--output-dir .*run: another sqsd command is writing it right now"):
        score.score(cfg)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".sqsd.lock", "run.json"]
    (tmp_path / "file").write_text("")
    with pytest.raises(SqsdError, match="--output-dir .*file: is a file, not a folder"):
        score.score(config(files, tmp_path / "file"))


def test_each_input_file_is_hashed_once_per_command(files, tmp_path, monkeypatch):
    import sqsd.fingerprints as F

    monkeypatch.setattr(F, "_CACHE", {})
    hashed = []
    real = F._file_sha256
    monkeypatch.setattr(F, "_file_sha256", lambda path: hashed.append(path) or real(path))
    score.score(config(files, tmp_path / "run"))
    model_files = sorted(p for p in files.model.iterdir() if p.is_file())
    assert sorted(p for p in hashed if p.parent == files.model) == model_files  # once each, not twice
    assert len(hashed) == len(set(hashed))


def test_a_cut_scores_file_names_itself_and_a_rerun_merges_it_again(files, tmp_path):
    out = score.score(config(files, tmp_path / "run"))
    whole = out.read_bytes()
    out.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(SqsdError, match=r"scores.parquet: not a readable Parquet file.*delete it and rerun"):
        score.read_scores(out)
    out.unlink()
    assert score.score(config(files, tmp_path / "run")) == out and out.read_bytes() == whole
