"""Model loading on tiny models saved in code; the real SmolLM2 tests are marked slow."""

import json
from pathlib import Path

import pytest
import torch

from conftest import USER_CACHE
from sqsd import assets
from sqsd import model as sqsd_model
from sqsd.config import ModelInfoConfig
from sqsd.errors import SqsdError
from sqsd.model import describe_model, greedy_reply, load_model, load_tokenizer


@pytest.fixture
def saved(tmp_path, model, tokenizer) -> Path:
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_load_model_from_a_local_folder(saved, model):
    loaded, tokenizer = load_model(str(saved))
    assert not loaded.training and loaded.dtype == torch.float32
    original = model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.state_dict().items())
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_dtype_is_honoured(saved):
    loaded, _ = load_model(str(saved), dtype="float64")
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    with pytest.raises(SqsdError, match="unknown dtype 'float8'"):
        load_model(str(saved), dtype="float8")


def test_pad_token_falls_back_to_eos(tmp_path, tokenizer):
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_an_existing_pad_token_is_kept(saved):
    assert load_tokenizer(str(saved)).pad_token == "<|endoftext|>"


def test_describe_model(model, tokenizer):
    info = describe_model(model, tokenizer)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert (info["layers"], info["hidden_size"], info["vocab_size"]) == (2, 32, len(tokenizer))
    assert info["dtype"] == "float32" and info["chat_template"] is True
    assert (info["eos_token"], info["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    assert info["linear_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "lm_head",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


def test_greedy_reply_is_deterministic(model, tokenizer):
    first = greedy_reply(model, tokenizer, "Hello", max_new_tokens=8)
    assert isinstance(first, str) and first == greedy_reply(model, tokenizer, "Hello", max_new_tokens=8)
    assert isinstance(
        greedy_reply(model, tokenizer, "Hello", max_new_tokens=4, system_prompt="Be brief."), str
    )


def test_info_cli_prints_facts_and_a_reply(saved, capsys):
    assert sqsd_model.info_cli(ModelInfoConfig(model=str(saved), prompt="Hi", max_new_tokens=4)) == 0
    out = capsys.readouterr().out
    assert (
        "parameters" in out and "layers          2" in out and "prompt          Hi" in out and "reply" in out
    )


def test_a_gguf_path_is_loaded_from_its_folder_with_dense_weights(tmp_path, monkeypatch):
    calls = []

    class Recorder:
        @classmethod
        def from_pretrained(cls, source, **kwargs):
            calls.append((source, kwargs))
            raise OSError("stop here")

    monkeypatch.setattr(sqsd_model, "AutoModelForCausalLM", Recorder)
    gguf = tmp_path / "m.Q4_0.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(SqsdError, match=f"as a GGUF file {gguf}: stop here"):
        load_model(str(gguf))
    source, kwargs = calls[0]
    assert source == str(tmp_path) and kwargs["gguf_file"] == "m.Q4_0.gguf"
    assert kwargs["quantization_config"].dequantize is True
    with pytest.raises(SqsdError, match="GGUF file .*missing.gguf does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_a_missing_local_folder_is_a_clean_error(tmp_path):
    with pytest.raises(SqsdError, match="model folder .*nope does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(SqsdError, match="model folder .*does not exist"):
        load_tokenizer("./runs/nope")


def test_a_folder_without_a_model_is_a_clean_error(tmp_path):
    with pytest.raises(SqsdError, match=f"could not load model '{tmp_path}' as a local folder"):
        load_model(str(tmp_path))


def test_an_unloadable_hub_id_is_a_clean_error():
    # An invalid repo id is rejected before any network access, so this stays offline and instant.
    with pytest.raises(SqsdError, match="could not load tokenizer 'not a hub id!' as a Hugging Face hub id"):
        load_tokenizer("not a hub id!")


def test_smollm2_needs_the_asset():
    for load in (load_model, load_tokenizer):
        with pytest.raises(SqsdError, match=r"asset 'smollm2' is not in the cache .*run `sqsd assets fetch`"):
            load("smollm2")


def test_smollm2_reads_its_float32_copy_when_present(model, tokenizer):
    # Only the converted copy exists (no GGUF, no manifest): it is used as is, nothing is rebuilt.
    hf = assets.asset_dir("smollm2") / sqsd_model.SMOLLM2_HF
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    loaded, loaded_tokenizer = load_model("smollm2")
    assert describe_model(loaded, loaded_tokenizer)["parameters"] == sum(
        p.numel() for p in model.parameters()
    )
    assert json.loads((hf / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.slow
def test_smollm2_loads_with_the_expected_size(smollm2):
    loaded, tokenizer = smollm2
    info = describe_model(loaded, tokenizer)
    assert info["parameters"] == 134_515_008
    assert (info["layers"], info["hidden_size"], info["chat_template"]) == (30, 576, True)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    loaded, tokenizer = smollm2
    assert "Paris" in greedy_reply(loaded, tokenizer, "What is the capital of France?", max_new_tokens=48)


@pytest.mark.slow
def test_the_gguf_file_and_the_float32_copy_are_the_same_model(smollm2):
    cached, tokenizer = smollm2
    direct, direct_tokenizer = load_model(str(USER_CACHE / "smollm2" / sqsd_model.SMOLLM2_GGUF))
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert direct_tokenizer("The capital of France is")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, direct(ids).logits)


def test_skeleton_has_the_models_modules_and_no_weights(saved, model):
    skeleton = sqsd_model.model_skeleton(str(saved))
    assert [n for n, _ in skeleton.named_modules()] == [n for n, _ in model.named_modules()]
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
