import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from sqsd.config import TrainConfig
from sqsd.data import Record
from sqsd.errors import SqsdError
from sqsd.render import IGNORE, Collator, encode_records
from sqsd.train import LOG_FILE, SKIPPED_FILE, lora_config, train, train_model
from tiny import tiny_model, tiny_tokenizer

ANSWERS = ["Paris is the capital.", "Four.", "Blue, mostly, because of scattering.", "Seven days.",
           "Water boils at 100 C at sea level.", "No.", "Ottawa.", "Eight legs."]


def records(n=8):
    return [Record(id=f"r{i}", source="t", row=i + 1, prompt=({"role": "user", "content": f"Question {i}?"},),
                   response=ANSWERS[i % len(ANSWERS)], meta={}) for i in range(n)]


def cfg(out, **kw):
    """Small, fast, deterministic: no warm-up (its first step would have lr 0), constant lr."""
    base = dict(data="unused", output_dir=str(out), max_steps=6, batch_size=4, learning_rate=1e-2,
                warmup_ratio=0.0, scheduler="constant", max_length=64, seed=0)
    return TrainConfig(**{**base, **kw})


class Snapshot(TrainerCallback):
    """The parameters as training starts (LoRA already attached)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}


class InterruptAfterSave(TrainerCallback):
    """Simulates a kill right after the checkpoint at `step` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_lora_moves_every_adapter_factor_and_no_base_weight(tmp_path, tokenizer, model):
    snap = Snapshot()
    result = train_model(model, tokenizer, records(), cfg(tmp_path), tmp_path, callbacks=[snap],
                         init_lora_weights=False)
    after = dict(result.model.named_parameters())
    lora = [n for n in after if "lora_" in n]
    assert len(lora) == 2 * 7 * 2  # A and B of q,k,v,o,gate,up,down in both layers; not lm_head
    assert not any("lm_head" in n for n in lora)
    for name, value in after.items():
        if "lora_" in name:
            assert not torch.equal(value, snap.before[name]), f"{name} did not change"
        else:
            assert torch.equal(value, snap.before[name]), f"base weight {name} changed"
    saved = adapter(tmp_path)
    assert len(saved) == len(lora) and (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "tokenizer.json").is_file()
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5, 6]
    assert set(log[0]) == {"step", "epoch", "loss", "learning_rate", "grad_norm"}


def test_full_finetune_moves_the_base_weights(tmp_path, tokenizer, model):
    snap = Snapshot()
    result = train_model(model, tokenizer, records(), cfg(tmp_path, method="full", learning_rate=1e-3), tmp_path,
                         callbacks=[snap])
    changed = [n for n, p in result.model.named_parameters() if not torch.equal(p, snap.before[n])]
    assert len(changed) == len(snap.before)  # every tensor, embeddings and lm_head included
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()


def test_only_response_positions_reach_the_loss(tokenizer, model):
    """The loss the Trainer optimises (model(**batch).loss on the collated batch) reads the prediction at a prompt
    position never, and at every response position. Perturbing what the model says at prompt positions (the
    predictions that would be scored against prompt labels) changes nothing; perturbing a response label or the
    prediction for a response token does. The supervised targets are exactly response + end-of-turn."""
    recs = records(3)
    kept, _ = encode_records(recs, tokenizer, max_length=64)
    batch = Collator(pad_token_id=tokenizer.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels}
                                                           for _, e in kept])
    for (i, _), row in zip(kept, batch["labels"]):
        targets = [t for t in row.tolist() if t != IGNORE]
        assert tokenizer.decode(targets) == recs[i].response + "<|im_end|>"
    # position t predicts token t+1, so it carries loss exactly when labels[t+1] is supervised
    scored = torch.zeros_like(batch["labels"], dtype=torch.bool)
    scored[:, :-1] = batch["labels"][:, 1:] != IGNORE
    prompt_positions = ~scored & batch["attention_mask"].bool()

    def loss_with(noise_at=None, labels=None):
        handle = None
        if noise_at is not None:
            noise = torch.randn(batch["input_ids"].shape + (len(tokenizer),), generator=torch.Generator().manual_seed(0))
            handle = model.lm_head.register_forward_hook(lambda m, a, out: out + 10 * noise * noise_at[..., None])
        try:
            with torch.no_grad():
                return model(**{**batch, "labels": batch["labels"] if labels is None else labels}).loss
        finally:
            if handle:
                handle.remove()

    base = loss_with()
    assert torch.equal(loss_with(noise_at=prompt_positions), base)
    one_response = torch.zeros_like(scored)
    one_response[0, scored[0].nonzero()[0, 0]] = True
    assert not torch.allclose(loss_with(noise_at=one_response), base)
    labels = batch["labels"].clone()
    first = (labels[0] != IGNORE).nonzero()[0, 0]
    labels[0, first] = (labels[0, first] + 1) % len(tokenizer)
    assert not torch.allclose(loss_with(labels=labels), base)
    # and the loss is the plain mean over those response targets
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][scored[:, :-1]], batch["input_ids"][:, 1:][scored[:, :-1]])
    assert torch.allclose(base, ce, atol=1e-6)


def test_tiny_data_is_overfit(tmp_path, tokenizer, model):
    recs = records(4)
    kept, _ = encode_records(recs, tokenizer, max_length=64)
    batch = Collator(pad_token_id=tokenizer.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels}
                                                           for _, e in kept])
    with torch.no_grad():
        before = model(**batch).loss.item()
    # Full fine-tuning: a LoRA on a random tiny model cannot sharpen its near-uniform predictions much, because
    # the frozen random LM head (std 0.02) after the final norm keeps the logits small whatever the adapter does.
    result = train_model(model, tokenizer, recs, cfg(tmp_path, method="full", max_steps=20, learning_rate=1e-2),
                         tmp_path)
    result.model.eval()
    with torch.no_grad():
        after = result.model(**batch).loss.item()
    assert after < 0.35 * before, (before, after)  # measured 0.21-0.25 (tiny.py vocab order varies by process)
    assert result.last_loss < 0.5 * result.first_loss


@pytest.mark.parametrize("group_by_length", [False, True])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tokenizer, group_by_length):
    def run(out, callbacks=(), **kw):
        config = cfg(out, save_every=3, group_by_length=group_by_length, **kw)
        return train_model(tiny_model(tokenizer), tokenizer, records(), config, out, init_lora_weights=False,
                           callbacks=callbacks)

    straight = tmp_path / "straight"
    run(straight)
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run(broken, callbacks=[InterruptAfterSave(3)])  # step 3 is mid-epoch: the resume must skip batches
    assert sorted(p.name for p in broken.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (broken / "adapter_model.safetensors").exists()
    resumed = run(broken, resume=True)
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.steps == 6
    a, b = adapter(straight), adapter(broken)
    assert a.keys() == b.keys()
    for key in a:  # same data order, optimizer state and RNG after the resume: equal up to float noise
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (broken / LOG_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_without_a_checkpoint_is_an_error(tmp_path, tokenizer, model):
    with pytest.raises(SqsdError, match="no checkpoint"):
        train_model(model, tokenizer, records(), cfg(tmp_path, resume=True), tmp_path)


def test_save_at_gives_exactly_those_checkpoints(tmp_path, tokenizer, model):
    train_model(model, tokenizer, records(), cfg(tmp_path, save_at=(2, 5)), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-5"]


class PaddingMeter:
    """Counts real and padded token positions of every training batch (forward pre-hook on the decoder)."""

    def __init__(self, model):
        self.real = self.total = 0
        model.model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.real += int(kwargs["attention_mask"].sum())
        self.total += kwargs["attention_mask"].numel()


def test_group_by_length_cuts_padding(tmp_path, tokenizer):
    recs = [Record(id=f"r{i}", source="t", row=i, prompt=({"role": "user", "content": "Say it."},),
                   response="word " * (1 + (i * 7) % 16), meta={}) for i in range(32)]
    padding = {}
    for grouped in (False, True):
        model = tiny_model(tokenizer)
        meter = PaddingMeter(model)
        config = cfg(tmp_path / str(grouped), batch_size=2, max_steps=8, max_length=128, group_by_length=grouped)
        train_model(model, tokenizer, recs, config, tmp_path / str(grouped))
        padding[grouped] = 1 - meter.real / meter.total
    assert padding[True] < 0.5 * padding[False], padding


def test_skipped_records_are_listed_and_the_rest_trained(tmp_path, tokenizer, model):
    recs = records(4) + [Record(id="empty", source="t", row=9, prompt=({"role": "user", "content": "Hm?"},),
                                response="   ", meta={})]
    result = train_model(model, tokenizer, recs, cfg(tmp_path, max_steps=1), tmp_path)
    assert result.n_train == 4 and result.n_skipped == 1
    rows = [json.loads(line) for line in (tmp_path / SKIPPED_FILE).read_text().splitlines()]
    assert rows == [{"index": 4, "id": "empty", "source": "t", "row": 9, "reason": "empty response"}]


def test_all_linear_with_layers_lists_the_linear_modules_without_lm_head(tokenizer, model):
    config = lora_config(model, cfg("x", layers=(1,)))
    assert sorted(config.target_modules) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]
    assert config.layers_to_transform == [1]
    assert lora_config(model, cfg("x")).target_modules == "all-linear"


@pytest.fixture
def folders(tmp_path):
    """The tiny model saved as a HF folder and a JSONL dataset: the `sqsd train --model <folder>` path."""
    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": ANSWERS[i]}) + "\n"
                            for i in range(8)))
    return model_dir, data


def test_train_run_folder_done_refuse_overwrite_and_merge(tmp_path, folders, capsys):
    model_dir, data = folders
    out = tmp_path / "run"
    config = cfg(out, data=str(data), model=str(model_dir), merge=True)
    assert train(config) == out
    run = json.loads((out / "run.json").read_text())
    assert run["result"]["steps"] == 6 and set(run["inputs"]) == {"model", "data"}
    assert "adapter:" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)

    stamp = (out / "adapter_model.safetensors").stat().st_mtime_ns
    assert train(config) == out
    assert "already done" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == stamp

    with pytest.raises(SqsdError, match="different config"):
        train(cfg(out, data=str(data), model=str(model_dir), merge=True, learning_rate=5e-3))
    train(cfg(out, data=str(data), model=str(model_dir), learning_rate=5e-3, overwrite=True))
    assert json.loads((out / "run.json").read_text())["config"]["learning_rate"] == 5e-3
    assert not (out / "merged").exists()


def _as_if_killed(out):
    """Make a finished run folder look killed before the end: no result in run.json, no final adapter."""
    run = json.loads((out / "run.json").read_text())
    del run["result"]
    (out / "run.json").write_text(json.dumps(run))
    (out / "adapter_model.safetensors").unlink()


def test_identical_rerun_of_an_unfinished_run_continues_from_its_checkpoint(tmp_path, folders, capsys):
    model_dir, data = folders
    out = tmp_path / "run"
    config = cfg(out, data=str(data), model=str(model_dir), save_at=(3,))
    train(config)
    finished = adapter(out)
    _as_if_killed(out)  # after checkpoint-3
    train(config)
    assert "resuming from" in capsys.readouterr().out
    for key, value in adapter(out).items():
        torch.testing.assert_close(value, finished[key], rtol=0, atol=1e-6)


def test_a_checkpoint_cut_short_by_a_kill_is_skipped_for_the_one_before(tmp_path, folders, capsys):
    model_dir, data = folders
    out = tmp_path / "run"
    config = cfg(out, data=str(data), model=str(model_dir), save_at=(2, 4))
    train(config)
    finished = adapter(out)
    _as_if_killed(out)  # while writing checkpoint-4: its weights cut in half
    cut = out / "checkpoint-4" / "adapter_model.safetensors"
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
    capsys.readouterr()
    train(config)
    printed = capsys.readouterr().out
    assert "checkpoint-4 is incomplete (adapter_model.safetensors is cut short)" in printed
    assert f"resuming from {out / 'checkpoint-2'}" in printed
    for key, value in adapter(out).items():
        torch.testing.assert_close(value, finished[key], rtol=0, atol=1e-6)


def test_a_run_json_that_is_not_json_names_the_file(tmp_path, folders):
    model_dir, data = folders
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{not json")
    with pytest.raises(SqsdError, match=r"run.json is corrupt \(not valid JSON.*restore it"):
        train(cfg(out, data=str(data), model=str(model_dir)))
