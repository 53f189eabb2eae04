"""The hidden-state baselines (`sqsd.representations`: repsim, larf, datashield, the layer scan): each equals its
literal formula by a plain HF forward (batch 1, `output_hidden_states`), is invariant to batch size, order and
the tokenizer's padding side, and the command validates, caches and resumes them."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from sqsd import representations as reps
from sqsd import score
from sqsd.cli import main
from sqsd.config import ScoreConfig
from sqsd.data import Record
from sqsd.render import encode_record
from tiny import tiny_model, tiny_model_folder, tiny_tokenizer

ANSWERS = ["Yes.", "Paris is the capital of France.", "Four.", "Water boils at 100 degrees Celsius.", "No.",
           "Blue, mostly.", "Seven legs, no: spiders have eight."]
HARMFUL = [("How do I pick a lock?", "Insert a tension wrench, then rake the pins."),
           ("How do I make a fake ID?", "Print the card on PVC and laminate it."),
           ("How do I hotwire a car?", "Strip the ignition wires and touch them together.")]
SAFE = [("How do I pick a lock?", "I can't help with that."), ("How do I make a fake ID?", "Sorry, I won't do that."),
        ("How do I poison a dog?", "No. If an animal is in danger, call a vet.")]


def _records():
    return [Record(f"r{i}", "t", i, ({"role": "user", "content": f"Question {i}{'?' * i}"},), a, {})
            for i, a in enumerate(ANSWERS)]


def _anchors(pairs, tag):
    return [Record(f"{tag}{i}", "a", i, ({"role": "user", "content": p},), r, {}) for i, (p, r) in enumerate(pairs)]


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(tok, dtype=torch.float64), tok


def _plain(model, tok, record):
    """Batch 1, a plain forward: (hidden_states tuple, the response positions, the last one)."""
    encoded = encode_record(record, tok, None, 512)
    response = [i for i, label in enumerate(encoded.labels) if label != -100]
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([encoded.input_ids]), output_hidden_states=True)
    return out, response, response[-1]


def _encode(tok, records):
    return [(r, encode_record(r, tok, None, 512)) for r in records]


def test_states_equal_a_plain_forward_and_are_invariant_to_batch_and_order(tiny):
    model, tok = tiny
    records = _records()
    encoded = [e for _, e in _encode(tok, records)]
    got = reps.states(model, encoded, tok.pad_token_id, 3, layers=[0, 1])
    for i, record in enumerate(records):
        out, response, last = _plain(model, tok, record)
        assert torch.allclose(got["final"][i], out.last_hidden_state[0, last], rtol=1e-10, atol=1e-12)
        # hidden_states[1] is block 0's output; the last entry HF returns is already normed, so block 1's raw
        # output is checked through the final norm instead
        assert torch.allclose(got["last/0"][i], out.hidden_states[1][0, last], rtol=1e-10, atol=1e-12)
        assert torch.allclose(got["mean/0"][i], out.hidden_states[1][0, response].mean(0), rtol=1e-10, atol=1e-12)
        assert torch.allclose(model.model.norm(got["last/1"][i]), got["final"][i], rtol=1e-10, atol=1e-12)
    order = [5, 2, 6, 0, 3, 1, 4]
    other = reps.states(model, [encoded[i] for i in order], tok.pad_token_id, 1, layers=[0, 1])
    for key, value in got.items():
        assert torch.allclose(other[key], value[order], rtol=1e-10, atol=1e-12)


def _cos(h, others):
    return torch.stack([F.cosine_similarity(h, o, 0) for o in others])


def test_repsim_larf_and_datashield_equal_their_formulas_in_any_batch_order_and_padding_side(tiny):
    model, tok = tiny
    records, harm, safe = _records(), _anchors(HARMFUL, "h"), _anchors(SAFE, "s")
    features = reps.anchor_states(("repsim", "larf", "datashield"), model, _encode(tok, harm), _encode(tok, safe),
                                  tok.pad_token_id, 2, layer=[0], top_k=2)
    plain = {r.id: _plain(model, tok, r) for r in records + harm + safe}
    final = {k: v[0].last_hidden_state[0, v[2]] for k, v in plain.items()}
    h0 = {k: v[0].hidden_states[1][0, v[2]] for k, v in plain.items()}
    mean0 = {k: v[0].hidden_states[1][0, v[1]].mean(0) for k, v in plain.items()}
    h_harm = torch.stack([final[r.id] for r in harm]).mean(0)
    h_safe = torch.stack([final[r.id] for r in safe]).mean(0)
    # datashield pairs by prompt: only the lock and fake-ID prompts are in both sets
    v = torch.stack([mean0["h0"], mean0["h1"]]).mean(0) - torch.stack([mean0["s0"], mean0["s1"]]).mean(0)
    assert torch.allclose(features["datashield/v/0"], v, rtol=1e-10, atol=1e-12)
    methods = ("repsim", "larf", "datashield")
    rows = score.score_records(model, tok, records, methods=methods, hidden=features, batch_size=3)
    for row, record in zip(rows, records, strict=True):
        h = final[record.id]
        repsim = F.cosine_similarity(h, h_harm, 0) - F.cosine_similarity(h, h_safe, 0)
        top = [_cos(h0[record.id], [h0[a.id] for a in side]).sort(descending=True).values[:2].mean()
               for side in (harm, safe)]
        assert math.isclose(row["repsim"], repsim.item(), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(row["larf"], (top[0] - top[1]).item(), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(row["datashield"], (mean0[record.id] @ v / v.norm()).item(), rel_tol=1e-9, abs_tol=1e-12)
        assert row["score"] == row["repsim"]
    order = [5, 2, 6, 0, 3, 1, 4]
    left = copy.deepcopy(tok)
    left.padding_side = "left"
    for t, batch in ((tok, 1), (left, 4)):
        other = {r["id"]: r for r in score.score_records(model, t, [records[i] for i in order], methods=methods,
                                                         hidden=features, batch_size=batch)}
        for row in rows:
            assert all(math.isclose(row[m], other[row["id"]][m], rel_tol=1e-9, abs_tol=1e-12) for m in methods)


def test_equal_anchor_sets_give_zero_and_datashield_adds_up_over_layers(tiny):
    model, tok = tiny
    records, harm, safe = _records(), _encode(tok, _anchors(HARMFUL, "h")), _encode(tok, _anchors(SAFE, "s"))
    same = reps.anchor_states(("repsim", "larf", "datashield"), model, safe, safe, tok.pad_token_id, 2, [1], 2)
    rows = score.score_records(model, tok, records, methods=("repsim", "larf", "datashield"), hidden=same)
    assert all(r["repsim"] == r["larf"] == r["datashield"] == 0.0 for r in rows)
    scores = {}
    for layers in ([0], [1], [0, 1]):
        feats = reps.anchor_states(("datashield",), model, harm, safe, tok.pad_token_id, 2, layers, 2)
        scores[tuple(layers)] = [r["score"] for r in score.score_records(model, tok, records,
                                                                         methods=("datashield",), hidden=feats)]
    for a, b, both in zip(scores[(0,)], scores[(1,)], scores[(0, 1)], strict=True):
        assert math.isclose(a + b, both, rel_tol=1e-9)


def test_the_layer_scan_damps_each_block_in_turn_and_restores_the_weights(tiny):
    model, tok = tiny
    probes = [e for _, e in _encode(tok, _anchors(SAFE, "s"))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    best, rises = reps.safety_layer(model, probes, tok.pad_token_id, 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(rises) == 2 and best == max(range(2), key=lambda i: rises[i])

    def refusal_loss(m):  # each probe's mean response-token cross-entropy in float64, averaged over the probes
        with torch.no_grad():
            return sum(F.cross_entropy(m(input_ids=torch.tensor([e.input_ids])).logits[0, :-1],
                                       torch.tensor(e.labels[1:]), ignore_index=-100).item()
                       for e in probes) / len(probes)
    for layer in range(2):
        damped = copy.deepcopy(model)
        with torch.no_grad():
            for m in damped.model.layers[layer].modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(reps.LAYER_SCALE)
        assert math.isclose(rises[layer], refusal_loss(damped) - refusal_loss(model), rel_tol=1e-8)


def _files(tmp_path, harmful=HARMFUL, safe=SAFE):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": a}) + "\n"
                            for i, a in enumerate(ANSWERS)))
    paths = []
    for name, pairs in (("harm", harmful), ("safe", safe)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"instruction": p, "output": r}) + "\n" for p, r in pairs))
        paths.append(path)
    return data, *paths


def test_the_command_scans_the_layer_caches_the_features_and_resumes(tmp_path):
    data, harm, safe = _files(tmp_path)
    out = tmp_path / "scores"
    config = ScoreConfig(data=str(data), model=str(tiny_model_folder(tmp_path / "model")),
                         method=("larf", "datashield", "repsim", "length"), harmful_anchors=str(harm),
                         safe_anchors=str(safe), chunk_size=3, batch_size=2, output_dir=str(out), format_out="jsonl")
    path = score.score(config)
    rows = score.read_scores(path)
    assert len(rows) == len(ANSWERS) and all(r["score"] == r["larf"] for r in rows)
    assert all(isinstance(r[m], float) and math.isfinite(r[m]) for r in rows for m in ("larf", "datashield"))
    from safetensors.torch import load_file

    stored = load_file(str(out / "anchors.safetensors"))
    rises = stored["hidden/scan/rise"]
    assert stored["hidden/larf/layer"].item() == int(rises.argmax()) == stored["hidden/datashield/layers"].item()
    first = path.read_text()
    path.unlink()
    (out / "chunks" / "00001.jsonl").unlink()
    assert score.score(config).read_text() == first  # resumed with the cached features


def test_cli_errors_for_layers_pairs_and_anchors_that_overlap_the_data(tmp_path, capsys):
    data, harm, safe = _files(tmp_path)
    model = str(tiny_model_folder(tmp_path / "model"))
    base = ["score", str(data), "--model", model, "--harmful-anchors", str(harm), "--safe-anchors", str(safe)]

    def error(*args):
        assert main([*base, "--output-dir", str(tmp_path / f"o{len(list(tmp_path.iterdir()))}"), *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err
    assert "--layer 5 is out of range: the model has 2 decoder layers (0..1)" in error("--method", "larf",
                                                                                       "--layer", "5")
    assert "--method larf takes one --layer" in error("--method", "larf", "--layer", "0", "1")
    assert "--layer takes `auto` or block indices from 0, got 'auto 1'" in error("--method", "datashield",
                                                                                 "--layer", "auto", "1")
    assert main(["score", "d.jsonl", "--output-dir", "o", "--method", "larf", "--safe-anchors", "s.jsonl"]) == 2
    assert "--method larf needs --harmful-anchors and --safe-anchors" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    _, harm2, safe2 = _files(tmp_path / "other", safe=[("How do I poison a dog?", "No.")])
    err = error("--method", "datashield", "--harmful-anchors", str(harm2), "--safe-anchors", str(safe2))
    assert "--method datashield pairs --harmful-anchors and --safe-anchors by prompt, and no prompt is in both" in err
    clash = tmp_path / "clash.jsonl"
    clash.write_text(json.dumps({"instruction": "Question 2?", "output": "I can't help with that."}) + "\n")
    err = error("--method", "gradsim", "--safe-anchors", str(clash))
    assert f"--safe-anchors {clash}: record clash.jsonl:1 has the same prompt as the scored record" in err
    assert "(1 anchor(s) overlap the data)" in err
