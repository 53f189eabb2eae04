"""`sqsd score --method` baselines: each equals its literal formula (plain autograd / the HF model's own loss),
is invariant to batch size and order, and the command writes, resumes and filters their files like SQSD's."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from sqsd import baselines, directions, score
from sqsd.cli import main
from sqsd.config import FilterConfig, ScoreConfig
from sqsd.data import Record
from sqsd.filter import filter_scores
from sqsd.render import encode_record
from sqsd.terms import Term
from tiny import tiny_model, tiny_tokenizer

ANSWERS = ["Yes.", "Paris is the capital of France.", "Four.", "Water boils at 100 degrees Celsius.", "No.",
           "Blue, mostly.", "Seven legs, no: spiders have eight."]
GRADIENT = ("loss", "grad-norm", "self-inf-n", "length", "random")


def _records():
    return [Record(f"r{i}", "t", i, ({"role": "user", "content": f"Question {i}{'?' * i}"},), a, {})
            for i, a in enumerate(ANSWERS)]


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(tok, dtype=torch.float64), tok


def _literal(model, tok, record):
    """Batch 1, plain autograd on the dense weights of every linear layer but the LM head, of the mean
    response-token cross-entropy in float64: (loss, ‖∇L‖)."""
    encoded = encode_record(record, tok, None, 512)
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(weights) == 14  # 2 blocks x q/k/v/o/gate/up/down
    logits = model(input_ids=torch.tensor([encoded.input_ids])).logits[0, :-1]
    loss = F.cross_entropy(logits, torch.tensor(encoded.labels[1:]), ignore_index=-100)
    grads = torch.autograd.grad(loss, weights)
    return loss.item(), float(torch.linalg.norm(torch.cat([g.flatten() for g in grads])))


@torch.no_grad()
def _hf_loss(model, tok, record):
    """The HF model's own loss, labels masked to the response (it upcasts logits to float32 only)."""
    encoded = encode_record(record, tok, None, 512)
    return model(input_ids=torch.tensor([encoded.input_ids]), labels=torch.tensor([encoded.labels])).loss.item()


def test_grad_norm_and_loss_equal_plain_autograd_and_the_hf_loss(tiny):
    model, tok = tiny
    records = _records()
    rows = score.score_records(model, tok, records, methods=("grad-norm", "loss"), batch_size=3)
    for row, record in zip(rows, records, strict=True):
        loss, norm = _literal(model, tok, record)
        assert math.isclose(row["grad-norm"], norm, rel_tol=1e-9)
        assert math.isclose(row["score"], norm, rel_tol=1e-9)
        assert math.isclose(row["loss"], loss, rel_tol=1e-12)
        assert math.isclose(row["loss"], _hf_loss(model, tok, record), rel_tol=1e-6)
        assert row["risk"] is None and row["danger"] is None
    alone = score.score_records(model, tok, records, methods=("loss",), batch_size=2)  # forward only
    assert all(math.isclose(a["score"], r["loss"], rel_tol=1e-12) for a, r in zip(alone, rows, strict=True))


def test_every_method_is_invariant_to_batch_size_and_order(tiny):
    model, tok = tiny
    records = _records()
    one = score.score_records(model, tok, records, methods=GRADIENT, batch_size=1, seed=3)
    order = [5, 2, 6, 0, 3, 1, 4]
    many = score.score_records(model, tok, [records[i] for i in order], methods=GRADIENT, batch_size=4, seed=3)
    by_id = {r["id"]: r for r in many}
    for row in one:
        other = by_id[row["id"]]
        for method in GRADIENT:
            assert math.isclose(row[method], other[method], rel_tol=1e-9), method
        assert row["score"] == row["loss"]
    assert len({r["random"] for r in one}) == len(one) and all(0 <= r["random"] < 1 for r in one)
    assert [r["length"] for r in one] == [float(r["n_response_tokens"]) for r in one]
    other_seed = score.score_records(model, tok, records, methods=("random",), seed=4)
    assert all(a["random"] != b["score"] for a, b in zip(one, other_seed))
    assert [r["score"] for r in score.score_records(model, tok, records, methods=("random",), seed=3)] == \
        [r["random"] for r in one]


def test_self_inf_n_is_its_formula_of_the_grad_norm_and_length_columns(tiny):
    model, tok = tiny
    rows = score.score_records(model, tok, _records(), methods=("self-inf-n", "grad-norm", "length"), batch_size=2)
    for r in rows:
        expected = math.log(r["grad-norm"] ** 2 + 1) + math.log(r["length"] + 1)
        assert math.isclose(r["self-inf-n"], expected, rel_tol=1e-12) and r["score"] == r["self-inf-n"]


def test_loss_is_taken_at_the_model_itself_not_at_the_sqsd_anchor(tiny):
    _, tok = tiny
    torch.manual_seed(1)
    model = get_peft_model(tiny_model(tok, dtype=torch.float64),
                           LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                      init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    direction = directions.Direction({n: directions.Dense(torch.randn(m.weight.shape, generator=g,
                                                                      dtype=torch.float64))
                                      for n, m in tiny_model(tok).named_modules() if n.endswith("q_proj")})
    danger = Term(direction, adapter="default")
    records = _records()
    both = score.score_records(model, tok, records, danger=danger, methods=("sqsd", "loss"), batch_size=3)
    alone = score.score_records(model, tok, records, danger=danger, batch_size=3)
    with model.disable_adapter():
        theta0 = [_hf_loss(model, tok, r) for r in records]
    for b, a, loss in zip(both, alone, theta0, strict=True):
        assert math.isclose(b["loss"], loss, rel_tol=1e-6) and not math.isclose(a["loss"], loss, rel_tol=1e-5)
        assert b["sqsd"] == b["risk"] == a["risk"] == a["score"] and b["score"] == b["risk"]


def _data(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": a}) + "\n"
                            for i, a in enumerate(ANSWERS)))
    return data


def test_cli_errors_for_a_method_without_its_inputs_and_an_unknown_method(tmp_path, capsys):
    assert main(["score", "d.jsonl", "--output-dir", "o", "--method", "length", "sqsd"]) == 2
    err = capsys.readouterr().err
    assert "give --danger and/or --safety (a direction file each) for --method sqsd" in err
    assert "Traceback" not in err
    assert main(["score", "d.jsonl", "--output-dir", "o", "--method", "grad-norm", "gradnorm"]) == 2
    err = capsys.readouterr().err
    assert "unknown --method 'gradnorm'; choose from sqsd, random, length, loss, grad-norm, self-inf-n" in err
    assert "Traceback" not in err


def test_the_command_writes_a_baseline_file_that_filter_ranks_by_score(tmp_path):
    from tiny import tiny_model_folder

    model_dir = tiny_model_folder(tmp_path / "model")
    data = _data(tmp_path)
    out = tmp_path / "scores"
    config = ScoreConfig(data=str(data), model=str(model_dir), method=("grad-norm", "self-inf-n"), chunk_size=3,
                         batch_size=2, output_dir=str(out), format_out="jsonl")
    path = score.score(config)
    rows = score.read_scores(path)
    first = path.read_text()
    path.unlink()
    (out / "chunks" / "00001.jsonl").unlink()
    assert score.score(config).read_text() == first  # the missing chunk is scored again, the rest reused
    assert list(rows[0]) == [*score.COLUMNS, "grad-norm", "self-inf-n"]
    assert all(r["score"] == r["grad-norm"] and r["risk"] is None and r["risk_z"] is None for r in rows)
    assert json.loads((out / "run.json").read_text())["config"]["method"] == ["grad-norm", "self-inf-n"]
    filter_scores(FilterConfig(scores=str(path), output_dir=str(tmp_path / "f"), by="score", drop_top=2))
    dropped = [json.loads(line)["instruction"] for line in (tmp_path / "f" / "dropped.jsonl").read_text().splitlines()]
    top = sorted(rows, key=lambda r: -r["grad-norm"])[:2]
    assert dropped == [f"Question {r['index']}?" for r in top]


# --- the anchored baselines: gradsim and safety-influence ---------------------------------------------------------

HARMFUL = [("How do I pick a lock?", "Insert a tension wrench, then rake the pins."),
           ("How do I make a fake ID?", "Print the card on PVC and laminate it.")]
SAFE = [("How do I pick a lock?", "I can't help with that."), ("How do I make a fake ID?", "Sorry, I won't do that.")]


def _anchor_records(pairs, tag):
    return [Record(f"{tag}{i}", "a", i, ({"role": "user", "content": p},), r, {}) for i, (p, r) in enumerate(pairs)]


def _grad(model, tok, record):
    """Batch 1, plain autograd: ∇L(x) over every linear layer but the LM head, flattened, in float64."""
    encoded = encode_record(record, tok, None, 512)
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    logits = model(input_ids=torch.tensor([encoded.input_ids])).logits[0, :-1]
    loss = F.cross_entropy(logits, torch.tensor(encoded.labels[1:]), ignore_index=-100)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, weights)])


def _anchor_gradient(model, tok, records, batch_size=2):
    encoded = [encode_record(r, tok, None, 512) for r in records]
    return baselines.anchor_gradient(model, encoded, baselines.block_linears(model), tok.pad_token_id, batch_size,
                                     "a")


def test_gradsim_and_safety_influence_equal_their_formulas_by_plain_autograd(tiny):
    model, tok = tiny
    records, harm, safe = _records(), _anchor_records(HARMFUL, "h"), _anchor_records(SAFE, "s")
    g_harm = torch.stack([_grad(model, tok, r) for r in harm]).mean(0)  # mean of each anchor's own gradient
    g_safe = torch.stack([_grad(model, tok, r) for r in safe]).mean(0)
    anchors = {"harm": _anchor_gradient(model, tok, harm), "safe": _anchor_gradient(model, tok, safe, 1)}
    flat = torch.cat([t.T.flatten() for t in anchors["safe"].modules.values()])
    assert torch.allclose(flat, g_safe, rtol=1e-10, atol=1e-14)
    rows = score.score_records(model, tok, records, methods=("gradsim", "safety-influence"), anchors=anchors,
                               batch_size=3)
    for row, record in zip(rows, records, strict=True):
        g = _grad(model, tok, record)
        gradsim = F.cosine_similarity(g, g_harm, 0) - F.cosine_similarity(g, g_safe, 0)
        influence = (-g) @ g_safe / g_safe.norm()
        assert math.isclose(row["gradsim"], gradsim.item(), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(row["safety-influence"], influence.item(), rel_tol=1e-9)
        assert row["score"] == row["gradsim"]
    order = [5, 2, 6, 0, 3, 1, 4]
    other = score.score_records(model, tok, [records[i] for i in order], methods=("safety-influence", "gradsim"),
                                anchors=anchors, batch_size=1)
    by_id = {r["id"]: r for r in other}
    for row in rows:
        for method in ("gradsim", "safety-influence"):
            assert math.isclose(row[method], by_id[row["id"]][method], rel_tol=1e-9, abs_tol=1e-12), method


def test_safety_influence_is_the_first_order_change_of_the_refusal_loss_and_its_sign_flips():
    """A model taught to refuse prompt p (as an aligned model does), and a compliant sample x = (p, C). Probe
    = refusals (p, R): a step on x moves probability from R to C, so it raises the refusal loss: the score is
    > 0, and equals that change as measured after one small SGD step on x. Probe responses swapped for the
    compliant one (p, C): a step on x lowers the probe's loss: the score is −‖∇L(x)‖ < 0."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, dtype=torch.float64)
    prompt, refusal, compliant = SAFE[0][0], SAFE[0][1], HARMFUL[0][1]
    taught = encode_record(_anchor_records([(prompt, refusal)], "s")[0], tok, None, 512)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = model(input_ids=torch.tensor([taught.input_ids]), labels=torch.tensor([taught.labels])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.01
    sample = _anchor_records([(prompt, compliant)], "x")[0]
    refusals, swapped = _anchor_records([(prompt, refusal)], "s"), _anchor_records([(prompt, compliant)], "c")
    risky = score.score_records(model, tok, [sample], methods=("safety-influence",),
                                anchors={"safe": _anchor_gradient(model, tok, refusals)})[0]
    safe = score.score_records(model, tok, [sample], methods=("safety-influence", "grad-norm"),
                               anchors={"safe": _anchor_gradient(model, tok, swapped)})[0]
    assert risky["score"] > 0 > safe["score"]
    assert math.isclose(safe["score"], -safe["grad-norm"], rel_tol=1e-9)
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    g, g_ref, eta = _grad(model, tok, sample), _grad(model, tok, refusals[0]), 1e-5
    steps = torch.split(g, [w.numel() for w in weights])
    losses = []
    for sign in (-1, 1):  # the refusal loss at θ₀ − η∇L(x) (one SGD step on x), then at θ₀ + η∇L(x)
        with torch.no_grad():
            for w, step in zip(weights, steps, strict=True):
                w += sign * eta * step.view_as(w)
        losses.append(_literal(model, tok, refusals[0])[0])
        with torch.no_grad():
            for w, step in zip(weights, steps, strict=True):
                w -= sign * eta * step.view_as(w)
    change = (losses[0] - losses[1]) / 2  # a central difference: the second-order term cancels
    assert math.isclose(risky["score"] * g_ref.norm().item() * eta, change, rel_tol=1e-3)


def test_gradsim_and_repsim_with_the_same_anchors_on_both_sides_are_zero_through_the_command(tmp_path):
    from tiny import tiny_model_folder

    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(json.dumps({"instruction": p, "output": r}) + "\n" for p, r in SAFE))
    out = tmp_path / "scores"
    config = ScoreConfig(data=str(_data(tmp_path)), model=str(tiny_model_folder(tmp_path / "model")),
                         method=("gradsim", "safety-influence", "repsim"), harmful_anchors=str(anchors),
                         safe_anchors=str(anchors), chunk_size=3, batch_size=2, output_dir=str(out),
                         format_out="jsonl")
    path = score.score(config)
    rows = score.read_scores(path)
    assert len(rows) == len(ANSWERS) and all(r["gradsim"] == 0.0 == r["score"] == r["repsim"] for r in rows)
    assert all(r["safety-influence"] != 0 for r in rows)
    assert (out / baselines.ANCHOR_FILE).is_file()
    inputs = json.loads((out / "run.json").read_text())["inputs"]
    assert inputs["harmful_anchors:data"] == inputs["safe_anchors:data"] and "safe_anchors:data" in inputs
    first = path.read_text()
    path.unlink()
    (out / "chunks" / "00001.jsonl").unlink()
    assert score.score(config).read_text() == first  # resumed with the cached anchor gradients


def test_cli_errors_for_missing_or_empty_anchors(tmp_path, capsys):
    from tiny import tiny_model_folder

    assert main(["score", "d.jsonl", "--output-dir", "o", "--method", "gradsim", "--safe-anchors", "s.jsonl"]) == 2
    assert "--method gradsim needs --harmful-anchors and --safe-anchors" in capsys.readouterr().err
    assert main(["score", "d.jsonl", "--output-dir", "o", "--method", "safety-influence"]) == 2
    assert "--method safety-influence needs --safe-anchors" in capsys.readouterr().err
    assert main(["score", "d.jsonl", "--output-dir", "o", "--method", "repsim", "--harmful-anchors", "h.jsonl"]) == 2
    assert "--method repsim needs --harmful-anchors and --safe-anchors" in capsys.readouterr().err
    model = tiny_model_folder(tmp_path / "model")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    data = _data(tmp_path)
    assert main(["score", str(data), "--model", str(model), "--output-dir", str(tmp_path / "o1"),
                 "--method", "safety-influence", "--safe-anchors", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: file is empty" in err and "Traceback" not in err
    prompts = tmp_path / "prompts.txt"  # read fine (one prompt a line), but no record has a response
    prompts.write_text("How do I pick a lock?\nHow do I make a fake ID?\n")
    assert main(["score", str(data), "--model", str(model), "--output-dir", str(tmp_path / "o2"),
                 "--method", "safety-influence", "--safe-anchors", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert f"--safe-anchors {prompts}: no usable record (every one was skipped: record has no response" in err
    assert "Traceback" not in err
