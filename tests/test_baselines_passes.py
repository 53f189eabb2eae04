"""The anchor passes of `sqsd.baselines` (the mean anchor gradient ḡ and the final hidden states h) equal a literal
batch-1 computation whatever the batch size, the padding side and the order; and the anchored methods shard
under torchrun exactly as one process scores."""

import functools
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from sqsd import baselines, projection, render, representations
from sqsd.data import Record
from sqsd.render import encode_record
from tiny import tiny_model, tiny_model_folder, tiny_tokenizer

# Response lengths vary (1 to 7 words) and prompts too, so every batch of more than one sample is padded.
ANCHORS = [Record(f"a{i}", "t", i, ({"role": "user", "content": f"Request {i}{'!' * i}"},),
                  " ".join(["step"] * (1 + (i * 5) % 7)) + ".", {}) for i in range(7)]
BATCH_SIZES = (1, 2, 3, 7, 64)


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(tok, dtype=torch.float64), tok


def _encode(tok, side):
    tok.padding_side = side  # as `generate` leaves a shared tokenizer: the passes must not depend on it
    try:
        return [encode_record(r, tok, None, 512) for r in ANCHORS]
    finally:
        tok.padding_side = "right"


def _weights(model):
    """Every linear layer but the LM head, by name: the modules the baselines differentiate."""
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def _literal_mean_gradient(model, encoded):
    """Σ_a ∇_W (L(a) / |anchors|), one anchor at a time: an unpadded forward, the mean cross-entropy of its
    response tokens, plain autograd. The 1/|anchors| goes in before the backward, as in the fast path: the
    model's RMSNorm rounds to float32 even in a float64 model, so a backward seeded with 1/7 and one seeded
    with 1 then divided by 7 differ by ~3e-8 (relative), far above this test's tolerance."""
    weights = _weights(model)
    total = {n: torch.zeros_like(w) for n, w in weights.items()}
    for e in encoded:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        loss = F.cross_entropy(logits, torch.tensor(e.labels[1:]), ignore_index=-100) / len(encoded)
        for n, g in zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True):
            total[n] += g
    return total


@torch.no_grad()
def _literal_hidden(model, encoded):
    """(n, d): an unpadded forward per sample, the final hidden state at its last supervised token."""
    rows = []
    for e in encoded:
        last = max(i for i, label in enumerate(e.labels) if label != -100)
        rows.append(model.model(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0, last])
    return torch.stack(rows)


def _gradient(model, tok, encoded, batch_size):
    return baselines.anchor_gradient(model, encoded, baselines.block_linears(model), tok.pad_token_id, batch_size,
                                     "a")


def _assert_gradient(got, expected, batch_size):
    assert set(got.modules) == set(expected)
    for name, g in expected.items():
        assert torch.allclose(got.modules[name].T, g, rtol=1e-10, atol=1e-15), (batch_size, name)


def test_anchor_gradient_equals_plain_autograd_for_any_batch_size_padding_side_and_order(tiny, monkeypatch):
    model, tok = tiny
    right, left = _encode(tok, "right"), _encode(tok, "left")
    assert [e.input_ids for e in left] == [e.input_ids for e in right]
    assert len({len(e.input_ids) for e in right}) == len(ANCHORS)
    expected = _literal_mean_gradient(model, right)
    assert all(bool(g.abs().sum() > 0) for g in expected.values())  # every module gets a gradient
    for encoded in (right, left, right[::-1]):
        for batch_size in BATCH_SIZES:
            _assert_gradient(_gradient(model, tok, encoded, batch_size), expected, batch_size)
    # left-padded batches: the loss takes the positions from the attention mask, so nothing changes
    monkeypatch.setattr(projection, "Collator", functools.partial(render.Collator, padding_side="left"))
    batch = projection.Collator(tok.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in right])
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()  # pads on the left
    _assert_gradient(_gradient(model, tok, right, 3), expected, 3)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # the model is left as it was


def test_final_hidden_states_equal_a_plain_forward_for_any_batch_size_padding_side_and_order(tiny):
    model, tok = tiny
    right, left = _encode(tok, "right"), _encode(tok, "left")
    expected = _literal_hidden(model, right)
    assert expected.dtype == torch.float64 and expected.shape == (len(ANCHORS), model.config.hidden_size)
    assert torch.cdist(expected, expected).add(torch.eye(len(ANCHORS))).min() > 1e-3  # no two rows alike
    for encoded in (right, left):
        for batch_size in BATCH_SIZES:
            got = representations.states(model, encoded, tok.pad_token_id, batch_size)["final"]
            assert torch.allclose(got, expected, rtol=1e-10, atol=1e-13), batch_size
    order = [4, 0, 6, 2, 5, 1, 3]
    got = representations.states(model, [right[i] for i in order], tok.pad_token_id, 3)["final"]
    assert torch.allclose(got, expected[order], rtol=1e-10, atol=1e-13)  # rows come back in input order


# --- torchrun ----------------------------------------------------------------------------------------------------

ANSWERS = ["Yes.", "Paris is the capital of France.", "Four.", "Water boils at 100 degrees Celsius.", "No.",
           "Blue, mostly.", "Seven.", "Spiders have eight legs.", "Because the sky scatters blue light."]
HARMFUL = [("How do I pick a lock?", "Insert a tension wrench, then rake the pins."),
           ("How do I make a fake ID?", "Print the card on PVC and laminate it."),
           ("How do I hotwire a car?", "Strip the ignition wires and touch them together.")]
REFUSALS = ["I can't help with that.", "Sorry, I won't do that.", "No, that could hurt someone."]


def _jsonl(path, pairs):
    path.write_text("".join(json.dumps({"instruction": p, "output": r}) + "\n" for p, r in pairs))
    return path


def test_torchrun_two_processes_write_the_same_anchored_file_as_one(tmp_path):  # every anchored method
    model = tiny_model_folder(tmp_path / "model")
    data = _jsonl(tmp_path / "data.jsonl", [(f"Question {i}?", a) for i, a in enumerate(ANSWERS)])
    harmful = _jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    safe = _jsonl(tmp_path / "safe.jsonl", [(p, r) for (p, _), r in zip(HARMFUL, REFUSALS, strict=True)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    methods = ["gradsim", "safety-influence", "repsim", "larf", "datashield"]
    args = ["-m", "sqsd", "score", str(data), "--model", str(model), "--method", *methods, "--harmful-anchors",
            str(harmful), "--safe-anchors", str(safe), "--batch-size", "2", "--chunk-size", "2"]
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
    assert all(r["score"] == r["gradsim"] for r in ddp)
    for method in methods:  # not vacuous: every method scores each sample differently, none is zero
        assert len({r[method] for r in ddp}) == len(ANSWERS) and all(r[method] != 0 for r in ddp), method
    for chunk in range(5):
        name = f"chunks/{chunk:05d}.jsonl"
        assert (tmp_path / "ddp" / name).read_text() == (tmp_path / "single" / name).read_text()
    anchors = [(tmp_path / n / baselines.ANCHOR_FILE).read_bytes() for n in ("ddp", "single")]
    assert anchors[0] == anchors[1]  # rank 0 wrote the same anchor features as one process
