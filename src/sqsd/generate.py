"""`sqsd generate`: batched, resumable generation with the model's own chat template.

`generate_records` is the core that later stages (evaluation, alignment checks, steering) call with a model
they already hold; `generate` adds what the command needs around it: loading data, model and adapter, the
output JSONL file and resuming into it.

Reproducibility is a requirement, not a nicety: a response must not depend on which other prompts share its
batch. Greedy decoding gets that from left padding with an attention mask (HF derives position ids from the
mask), so every row computes what it would compute alone. Sampling gets it from `_SeededSampler`: each
(record id, sample index) draws from its own torch.Generator, so a sample depends on its seed, not on batch
composition or order.

The output file is one JSON line per (record, sample), appended and flushed after every batch, so a kill loses
at most one batch. Its sidecar `<output>.run.json` (`runs.open_run` on a file) holds the config and the
model/adapter fingerprints; a rerun with the same ones skips the (id, sample) pairs already written, a different
one refuses unless `overwrite` is set (then the file starts afresh), and a second command writing the same file
at the same time refuses (a lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from sqsd.config import GenerateConfig
from sqsd.data import Record, load_from_config
from sqsd.errors import SqsdError
from sqsd.fingerprints import fingerprint
from sqsd.model import load_model
from sqsd.render import Collator, encode_prompt
from sqsd.runs import on_main, open_run

# Config fields that change how much is done or how fast, not what any line contains: a resume may change them.
RESUMABLE_FIELDS = ("batch_size", "limit", "on_bad_record")
# Fields that only matter when sampling; greedy runs do not record or compare them.
SAMPLING_FIELDS = ("temperature", "top_p", "seed")
# HF fills every generation option left unset from the model's generation_config.json (Llama-3 ships
# temperature 0.6, some models a repetition penalty). Pinning them to HF's global defaults makes the decoding
# exactly what our config says, and avoids "flag is not valid for greedy" warnings. Sampling never uses HF's
# sampler (see _SeededSampler), so HF always decodes greedily.
_NEUTRAL = {"num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0}


@dataclass(frozen=True)
class Generation:
    """One response to one record. `index` is the record's position in the list given to `generate_records`.

    `token_ids` are the new tokens up to and including the end-of-turn token when `finish_reason` is "eos"
    (so `n_new_tokens` counts it); `response` is their decoded text without special tokens, stripped.
    """

    id: str
    sample: int
    index: int
    prompt: str
    messages: tuple[dict[str, str], ...]
    response: str
    token_ids: tuple[int, ...]
    finish_reason: Literal["eos", "length"]
    n_prompt_tokens: int
    prompt_truncated: bool
    meta: dict[str, Any]

    @property
    def n_new_tokens(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> dict[str, Any]:
        """The fields of an output line (token ids are left out: the text and the count are what readers use)."""
        return {"id": self.id, "sample": self.sample, "prompt": self.prompt, "messages": list(self.messages),
                "response": self.response, "n_new_tokens": self.n_new_tokens, "finish_reason": self.finish_reason,
                "n_prompt_tokens": self.n_prompt_tokens, "prompt_truncated": self.prompt_truncated,
                "meta": self.meta}


def sample_seed(seed: int, record_id: str, sample: int) -> int:
    """A stable 63-bit seed for one (record, sample): the same in every process, unlike Python's hash()."""
    digest = hashlib.sha256(f"{seed}\0{record_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class _SeededSampler(LogitsProcessor):
    """Samples every row from its own generator, then leaves only the drawn token for HF's greedy argmax.

    HF's own sampler draws for the whole batch from the global RNG, so a sample would change with the batch it
    lands in. Drawing per row costs a Python loop over the batch per step, small next to a forward pass.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] | None = None
        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        picks = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators, strict=True)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks[:, None], 0.0)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end a response: the tokenizer's eos and whatever the model's generation config lists
    (chat models often end a turn with a token other than the tokenizer's eos, e.g. Llama-3's <|eot_id|>)."""
    eos = model.generation_config.eos_token_id
    return sorted({tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})


def _user_text(messages: Sequence[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def generate_records(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], *,
                     system_prompt: str | None = None, max_new_tokens: int = 256, batch_size: int = 8,
                     do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, n: int = 1,
                     seed: int = 0, max_prompt_length: int = 1024, done: Collection[tuple[str, int]] = (),
                     on_batch: Callable[[list[Generation]], None] | None = None,
                     progress: bool = True) -> list[Generation]:
    """Generate `n` responses per record (greedy by default), batched; returns them in record, sample order.

    Prompts are rendered with the chat template (`system_prompt` as in `render.encode_prompt`) and cut from the
    left to `max_prompt_length` tokens. Rows are sorted by prompt length (longest first, so an out-of-memory
    shows in the first batch) to limit padding; results do not depend on `batch_size` or order. Pairs in
    `done` (record id, sample index) are skipped. `on_batch` sees each batch's results as soon as they exist,
    which is how `generate` writes and flushes them.
    """
    if n > 1 and not do_sample:
        raise SqsdError("n > 1 needs do_sample (greedy decoding gives n identical answers)")
    if max_prompt_length < 1:
        raise SqsdError("max_prompt_length must be at least 1")
    if tokenizer.pad_token_id is None:
        raise SqsdError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; batched generation needs one")
    if len({r.id for r in records}) < len(records):
        raise SqsdError("record ids must be unique: results and sampling seeds are keyed by (id, sample)")
    encoded = [encode_prompt(r.prompt, tokenizer, system_prompt) for r in records]
    rows = [(i, s) for i, r in enumerate(records) for s in range(n) if (r.id, s) not in done]
    rows.sort(key=lambda row: (-min(len(encoded[row[0]]), max_prompt_length), row))
    eos = eos_token_ids(model, tokenizer)
    collate = Collator(tokenizer.pad_token_id, padding_side="left")
    config = GenerationConfig(**_NEUTRAL, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True)
    device = next(model.parameters()).device
    results: list[Generation] = []
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(rows), unit="prompt", desc="generate", disable=not progress or not rows)
    start, new_tokens = time.perf_counter(), 0
    try:
        for first in range(0, len(rows), batch_size):
            batch = rows[first:first + batch_size]
            inputs = collate([{"input_ids": encoded[i][-max_prompt_length:]} for i, _ in batch])
            processors = LogitsProcessorList()
            if do_sample:
                seeds = [sample_seed(seed, records[i].id, s) for i, s in batch]
                processors.append(_SeededSampler(seeds, temperature, top_p))
            with torch.inference_mode():
                out = model.generate(input_ids=inputs["input_ids"].to(device),
                                     attention_mask=inputs["attention_mask"].to(device),
                                     generation_config=config, logits_processor=processors)
            width = inputs["input_ids"].shape[1]
            finished = []
            for (i, s), ids in zip(batch, out.sequences[:, width:].tolist(), strict=True):
                # After a row ends HF fills it with pad tokens; the response is everything up to its first eos.
                end = next((k + 1 for k, t in enumerate(ids) if t in eos), None)
                ids = ids[:end] if end else ids
                record = records[i]
                finished.append(Generation(
                    id=record.id, sample=s, index=i, prompt=_user_text(record.prompt), messages=record.prompt,
                    response=tokenizer.decode(ids, skip_special_tokens=True).strip(), token_ids=tuple(ids),
                    finish_reason="eos" if end else "length", n_prompt_tokens=min(len(encoded[i]), max_prompt_length),
                    prompt_truncated=len(encoded[i]) > max_prompt_length, meta=dict(record.meta)))
            if on_batch is not None:
                on_batch(finished)
            results += finished
            new_tokens += sum(g.n_new_tokens for g in finished)
            bar.update(len(batch))
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.1f} new tok/s")
    finally:
        bar.close()
        model.train(was_training)
    return sorted(results, key=lambda g: (g.index, g.sample))


def generation_settings(config: GenerateConfig) -> dict[str, Any]:
    """What decides a response besides model and prompt, as stored on every output line."""
    keys = ("system_prompt", "max_new_tokens", "do_sample", "temperature", "top_p", "n", "seed",
            "max_prompt_length", "dtype")
    return {k: getattr(config, k) for k in keys if config.do_sample or k not in SAMPLING_FIELDS}


def read_done(output: Path) -> dict[tuple[str, int], tuple[dict[str, str], ...]]:
    """(id, sample) -> prompt messages of every complete line in `output`.

    Lines are written whole, newline last, so a kill mid-write leaves at most a tail without a newline: it is
    cut off the file and its record generated again. A bad complete line is an error naming the line.
    """
    data = output.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with open(output, "r+b") as f:
            f.truncate(len(complete))
    done: dict[tuple[str, int], tuple[dict[str, str], ...]] = {}
    for number, raw in enumerate(complete.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            done[(line["id"], int(line["sample"]))] = tuple(line["messages"])
        except (ValueError, KeyError, TypeError) as e:
            raise SqsdError(f"{output}:{number}: not a generation line ({e}); fix or remove the line, or pass "
                            "--overwrite to start the file afresh") from e
    return done


def generate(config: GenerateConfig) -> Path:
    """`sqsd generate`: generate into `config.output`, resuming what an earlier identical run wrote (rank 0
    only under a launcher)."""
    return on_main(lambda: _generate(config), config.device)


def _generate(config: GenerateConfig) -> Path:
    if config.adapter and not Path(config.adapter).is_dir():
        raise SqsdError(f"adapter folder {config.adapter} does not exist")
    from sqsd.fingerprints import model_fingerprint

    loaded = load_from_config(config)
    if loaded.bad:
        print(f"{len(loaded.bad)} bad record(s) left out (--on-bad-record skip)")
    inputs = {"model": model_fingerprint(config.model),
              "adapter": fingerprint(config.adapter) if config.adapter else None}
    return generate_file(config, loaded.records, inputs)


def load_for_generation(config: GenerateConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model of `config`, with its adapter applied if one is given."""
    model, tokenizer = load_model(config.model, config.dtype, config.device)
    if config.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, config.adapter).eval()
    return model, tokenizer


def generate_file(config: GenerateConfig, records: Sequence[Record], inputs: dict[str, str | None],
                  get_model: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]] | None = None) -> Path:
    """Generate `records` into `config.output`, resuming it; the model is obtained only if work remains.

    `inputs` are the fingerprints stored in the sidecar (model, adapter); `get_model` lets a caller that holds
    a model already (evaluation, steering) hand it over instead of loading `config.model` again.
    """
    output = Path(config.output)
    ignore = RESUMABLE_FIELDS + (() if config.do_sample else SAMPLING_FIELDS)
    with open_run(output, config, inputs, input_fields=("model", "adapter"), ignore=ignore,
                  overwrite=config.overwrite, file=True) as run:
        if run.state == "fresh":
            output.touch()
        done = read_done(output)
        for record in records:
            for s in range(config.n):
                if (record.id, s) in done and done[(record.id, s)] != record.prompt:
                    raise SqsdError(f"{output} holds a different prompt for record {record.id!r} than {config.data} "
                                    "now gives; the data changed: pass --overwrite or choose another --output")
        todo = len(records) * config.n - sum((r.id, s) in done for r in records for s in range(config.n))
        print(f"{len(records)} prompts x {config.n} sample(s); {todo} to generate, "
              f"{len(records) * config.n - todo} already in {output}", flush=True)
        if todo:
            _generate_into(output, config, records, done, get_model)
        run.finish({"lines": len(done) + todo})
    return output


def _generate_into(output: Path, config: GenerateConfig, records: Sequence[Record], done: Collection[tuple[str, int]],
                   get_model: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]] | None) -> None:
    model, tokenizer = (get_model or (lambda: load_for_generation(config)))()
    common = {"model": config.model, "adapter": config.adapter, "generation": generation_settings(config)}
    counts = {"eos": 0, "length": 0}
    with open(output, "a", encoding="utf-8") as f:
        def write(batch: list[Generation]) -> None:
            # ASCII-only JSON: a raw U+2028 or U+0085 in a response would split the line for readers that use
            # str.splitlines().
            f.writelines(json.dumps({**g.to_json(), **common}) + "\n" for g in batch)
            f.flush()
            os.fsync(f.fileno())
            for g in batch:
                counts[g.finish_reason] += 1

        generate_records(model, tokenizer, records, system_prompt=config.system_prompt,
                         max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                         do_sample=config.do_sample, temperature=config.temperature, top_p=config.top_p,
                         n=config.n, seed=config.seed, max_prompt_length=config.max_prompt_length,
                         done=done, on_batch=write)
    print(f"wrote {sum(counts.values())} responses to {output} (ended at eos: {counts['eos']}, hit "
          f"--max-new-tokens: {counts['length']})")
