"""Load a causal chat model and its tokenizer from a local folder, a hub id, a GGUF file or the packaged default.

`smollm2` is SmolLM2-135M-Instruct from the offline asset cache (`sqsd assets fetch`). It ships as a Q4_1 GGUF
file; transformers dequantises it to a float32 Llama, which takes ~15 s, so the first load saves a float32
safetensors copy to `<cache>/smollm2/hf-float32/` and every later load reads that (~0.3 s).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sqsd import assets
from sqsd.config import ModelInfoConfig
from sqsd.errors import SqsdError

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF = "hf-float32"
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer (with its chat template) for `name_or_path`, without loading any weights."""
    source = _smollm2_tokenizer_source() if name_or_path == SMOLLM2 else _resolve(name_or_path)
    return _with_pad_token(_from_pretrained(AutoTokenizer, name_or_path, *source))


def load_model(
    name_or_path: str, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in `dtype` on `device` in eval mode, and its tokenizer (see `load_tokenizer`)."""
    if dtype not in DTYPES:
        raise SqsdError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source, kwargs = (str(_smollm2_folder()), {}) if name_or_path == SMOLLM2 else _resolve(name_or_path)
    if "gguf_file" in kwargs:
        kwargs = _gguf_kwargs(kwargs["gguf_file"])
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, source, kwargs, dtype=DTYPES[dtype])
    return model.to(device).eval(), load_tokenizer(name_or_path)


def model_skeleton(name_or_path: str) -> PreTrainedModel:
    """The model's modules without its weights (on the meta device), from its config alone: enough to check
    module names and layer counts against flags before a run folder is made or any weight is read."""
    source, kwargs = (str(_smollm2_folder()), {}) if name_or_path == SMOLLM2 else _resolve(name_or_path)
    config = _from_pretrained(AutoConfig, name_or_path, source, kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def describe_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Size and shape facts about a loaded model, for `sqsd model info` and run metadata."""
    config = model.config.get_text_config()
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "chat_template": bool(tokenizer.chat_template),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "linear_modules": sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear)
            }
        ),
    }


def greedy_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int,
    system_prompt: str | None = None,
) -> str:
    """The model's greedy answer to one user turn, rendered with its chat template; only the new text."""
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    # Stop at the tokenizer's end of turn and at whatever the model's own generation config treats as the end.
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
    generation = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    output = model.generate(**inputs, generation_config=generation)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def info_cli(config: ModelInfoConfig) -> int:
    """`sqsd model info`: print what the model is, then its greedy reply to `config.prompt`."""
    start = time.perf_counter()
    model, tokenizer = load_model(config.model, config.dtype, config.device)
    loaded = time.perf_counter() - start
    info = describe_model(model, tokenizer)
    info["parameters"] = f"{_count(info['parameters'])} ({info['parameters']:,})"
    info["linear_modules"] = ", ".join(info["linear_modules"])
    print(f"{'model':<15} {config.model} (loaded in {loaded:.1f} s)")
    for key, value in info.items():
        print(f"{key:<15} {value}")
    start = time.perf_counter()
    reply = greedy_reply(model, tokenizer, config.prompt, config.max_new_tokens)
    print(f"{'prompt':<15} {config.prompt}")
    print(
        f"{'reply':<15} {reply!r}  ({time.perf_counter() - start:.1f} s, greedy, "
        f"max {config.max_new_tokens} new tokens)"
    )
    return 0


def _resolve(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(what to pass to from_pretrained, extra kwargs) for a .gguf file, a local folder or a hub id."""
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise SqsdError(f"GGUF file {path.resolve()} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    if path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise SqsdError(f"model folder {path.resolve()} does not exist")
    return name_or_path, {}


def _from_pretrained(cls: Any, name: str, source: str, kwargs: dict[str, Any], **extra: Any) -> Any:
    """cls.from_pretrained, with loading failures (missing files, no network for a hub id) as one SqsdError."""
    try:
        return cls.from_pretrained(source, **kwargs, **extra)
    except (OSError, ValueError) as e:
        if "gguf_file" in kwargs:
            what, hint = f"GGUF file {Path(source) / kwargs['gguf_file']}", ""
        elif Path(source).is_dir():
            what, hint = "local folder", ""
        else:
            what = "Hugging Face hub id (no local folder of that name)"
            hint = "; offline, pass a local folder (HF_HUB_OFFLINE=1 skips the network retries)"
        reason = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        kind = "tokenizer" if cls is AutoTokenizer else "model"
        raise SqsdError(f"could not load {kind} {name!r} as a {what}: {reason}{hint}") from e


def _gguf_kwargs(file: str) -> dict[str, Any]:
    """from_pretrained arguments for a GGUF file, asking for dense weights.

    Recent transformers keep GGUF weights packed when a matmul kernel is available; packed weights can be
    neither trained nor saved, and sqsd needs both. Older versions have no GgufConfig and always dequantise.
    """
    kwargs: dict[str, Any] = {"gguf_file": file}
    if hasattr(transformers, "GgufConfig"):
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    return kwargs


def _smollm2_tokenizer_source() -> tuple[str, dict[str, Any]]:
    """Where to read SmolLM2's tokenizer: the float32 copy if it exists, else the GGUF file (no weights read)."""
    hf = assets.asset_dir(SMOLLM2) / SMOLLM2_HF
    if (hf / "config.json").is_file():
        return str(hf), {}
    return str(assets.require(SMOLLM2)), {"gguf_file": SMOLLM2_GGUF}


def _smollm2_folder() -> Path:
    """The float32 safetensors copy of SmolLM2, built from the GGUF asset on first use.

    The copy is written to a temporary folder and renamed into place, so an interrupted build leaves nothing
    that looks complete.
    """
    hf = assets.asset_dir(SMOLLM2) / SMOLLM2_HF
    if (hf / "config.json").is_file():
        return hf
    folder = assets.require(SMOLLM2)
    print(f"converting {SMOLLM2_GGUF} to float32 safetensors in {hf} (once, ~15 s) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, **_gguf_kwargs(SMOLLM2_GGUF), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    partial = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_HF}.partial-", dir=folder))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if hf.exists():  # a leftover without config.json, or another process won the race
            if (hf / "config.json").is_file():
                return hf
            shutil.rmtree(hf)
        partial.chmod(0o755)  # mkdtemp makes it private; a shared cache should be readable like its files
        os.rename(partial, hf)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return hf


def _with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batching needs a pad id. Padded positions are masked out of attention and labels, so which token pads does
    not matter; eos always exists, so it is the fallback when the tokenizer defines no pad token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _count(n: int) -> str:
    """A parameter count as e.g. '134.5M'."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)
