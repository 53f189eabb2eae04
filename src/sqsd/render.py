"""Records -> token ids with response-only labels, rendered with the model's own chat template.

The loss of docs/design.md §2 is the mean cross-entropy over the response tokens plus the template's end-of-turn
token. Which tokens those are is read off the rendered conversation itself, never hard-coded per model family:

1. `prompt_text` = the template applied to the prompt messages with the generation prompt appended;
   `full_text` = the template applied to prompt + the assistant response. The first must be a prefix of the
   second, otherwise the template is not usable for supervised training and we say so.
2. The response's characters are found in `full_text` after `prompt_text` (templates may trim it).
3. With the tokenizer's character offsets, a token is supervised when it holds any character between the end
   of `prompt_text` and the end of the response, and so is the first token after the response: the
   template's end-of-turn token (`<|im_end|>` in ChatML, `<|eot_id|>` in Llama 3). Tokens after that are
   dropped, they carry no loss.

Truncation to `max_length` drops prompt tokens from the left first, then response tokens from the right. A
record left with no supervised token is returned as a skip with its reason, never scored as NaN.

Text is data, never markup: a special token's string inside a message or response (a user writing
`<|im_end|>`, a fake `<|im_start|>assistant` turn) is tokenised as the plain text it is, not as the control
token, in training, scoring and generation alike (`_tokenize`). We escape rather than warn because a warning
would still leave such a record scored as a different conversation than its text says (a response with an
early end of turn, a second assistant turn in the prompt), and escaping needs no choice from the user; it is also
what the model meets when the same text comes out of a tokenizer that does not parse special tokens. Records
without such strings (nearly all) are tokenised exactly as before, in one call over the rendered text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from sqsd.data import Record
from sqsd.errors import SqsdError

IGNORE = -100  # label value the loss ignores (PyTorch / HF convention)


@dataclass(frozen=True)
class Encoded:
    """One tokenized sample. `labels[t]` is the token the model must predict at t (HF shifts internally)."""

    input_ids: list[int]
    labels: list[int]
    n_prompt_tokens: int  # tokens before the first supervised one, after truncation
    n_response_tokens: int  # supervised tokens that the loss actually sees (labels[1:] != IGNORE)
    truncated: bool


@dataclass(frozen=True)
class Skip:
    """A record that cannot be used, and why."""

    reason: str


def with_system(messages: Sequence[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend `system_prompt` unless it is None or the conversation already starts with a system turn."""
    messages = [dict(m) for m in messages]
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_text(messages: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase,
                system_prompt: str | None = None) -> str:
    """The chat-template rendering of a prompt, ending where the assistant starts to speak."""
    if not tokenizer.chat_template:
        raise SqsdError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; sqsd renders every sample "
                        "with the model's own template (use a chat/instruct model)")
    return tokenizer.apply_chat_template(with_system(messages, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def encode_prompt(messages: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase,
                  system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt ready for generation (the template supplies BOS where the model wants it)."""
    messages = with_system(messages, system_prompt)
    return _tokenize(prompt_text(messages, tokenizer), messages, tokenizer, add_generation_prompt=True)[0]


def _content_spans(text: str, messages: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase,
                   add_generation_prompt: bool) -> list[tuple[int, int]]:
    """Where each message's content sits in `text`, their rendering; an error if the template rewrites one.

    Searching `text` for a content could land in the template's own markup (a content "<|im_end|>" matches
    every turn's end), so the template is rendered once more with a marker for each content: the markup is the
    same, and the markers say where the contents go. Templates may trim a content (Llama 3 does).
    """
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters, untouched by templates
    masked = tokenizer.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks)],
                                           tokenize=False, add_generation_prompt=add_generation_prompt)
    spans, shift, pos = [], 0, 0
    for m, mark in zip(messages, marks):
        at = masked.find(mark, pos)
        content = next((c for c in (m["content"], m["content"].strip()) if text.startswith(c, at + shift)), None)
        if at < 0 or content is None:  # the template dropped or rewrote this content
            raise SqsdError(f"the chat template of {tokenizer.name_or_path!r} rewrites the message "
                            f"{m['content'][:80]!r}, so special-token text in the conversation cannot be told "
                            "apart from the template's control tokens")
        spans.append((at + shift, at + shift + len(content)))
        shift += len(content) - len(mark)
        pos = at + len(mark)
    return spans


def _tokenize(text: str, messages: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase,
              add_generation_prompt: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`, the chat template's rendering of `messages`, with each special
    token that comes from a message's content replaced by the plain-text tokens of its string (module
    docstring). The template's own special tokens, outside the contents, stay control tokens."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    specials = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not any(special in m["content"] for m in messages for special in specials.values()):
        return ids, offsets
    spans = _content_spans(text, messages, tokenizer, add_generation_prompt)
    out_ids, out_offsets = [], []
    for token, (start, end) in zip(ids, offsets):
        if token in specials and any(a <= start and end <= b for a, b in spans):
            plain = tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True,
                              return_offsets_mapping=True)
            out_ids += plain["input_ids"]
            out_offsets += [(start + s, start + e) for s, e in plain["offset_mapping"]]
        else:
            out_ids.append(token)
            out_offsets.append((start, end))
    return out_ids, out_offsets


def _response_span(full: str, start: int, response: str) -> tuple[int, int] | None:
    """Character span of `response` in `full`, searched from `start`; tolerant of templates that trim it."""
    core = response.strip()
    pos = full.find(core, start)
    if pos < 0:
        return None
    end = pos + len(core)
    tail = response[len(response.rstrip()):]
    if tail and full.startswith(tail, end):
        end += len(tail)
    return pos, end


def encode_record(record: Record, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None,
                  max_length: int = 1024) -> Encoded | Skip:
    """Tokenize prompt + response with the chat template and build response-only labels (module docstring)."""
    if record.response is None:
        return Skip("record has no response (a prompt-only record cannot be trained on or scored)")
    if not record.response.strip():
        return Skip("empty response")
    messages = with_system(record.prompt, system_prompt)
    prefix = prompt_text(messages, tokenizer)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": record.response}],
                                         tokenize=False)
    if not full.startswith(prefix):
        raise SqsdError(f"the chat template of {tokenizer.name_or_path!r} renders the prompt differently with "
                        "and without the response, so response tokens cannot be located")
    span = _response_span(full, len(prefix), record.response)
    if span is None:
        raise SqsdError(f"record {record.id}: the chat template of {tokenizer.name_or_path!r} rewrites the "
                        "response text, so its tokens cannot be located")
    ids, offsets = _tokenize(full, messages + [{"role": "assistant", "content": record.response}], tokenizer)
    # Supervised: tokens with any character in [len(prefix), response end), then the end-of-turn token.
    first = next(i for i, (_, e) in enumerate(offsets) if e > len(prefix))
    after = next((i for i, (s, _) in enumerate(offsets) if s >= span[1]), None)
    if after is None:
        raise SqsdError(f"the chat template of {tokenizer.name_or_path!r} puts no end-of-turn token after the "
                        "response")
    ids = ids[:after + 1]
    labels = [IGNORE] * first + ids[first:]
    truncated = len(ids) > max_length
    if truncated:
        drop_left = min(len(ids) - max_length, first)
        ids, labels = ids[drop_left:][:max_length], labels[drop_left:][:max_length]
        first -= drop_left
    labels[0] = IGNORE  # nothing predicts the first token; keeps n_response_tokens honest
    n_response = sum(label != IGNORE for label in labels)
    if n_response == 0:
        return Skip(f"no response token left after truncation to max_length={max_length}")
    return Encoded(ids, labels, first, n_response, truncated)


def encode_records(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase,
                   system_prompt: str | None = None, max_length: int = 1024,
                   ) -> tuple[list[tuple[int, Encoded]], list[tuple[int, str]]]:
    """Encode many records: ([(index, Encoded)], [(index, skip reason)]), indices into `records`."""
    kept, skipped = [], []
    for i, record in enumerate(records):
        out = encode_record(record, tokenizer, system_prompt, max_length)
        if isinstance(out, Skip):
            skipped.append((i, out.reason))
        else:
            kept.append((i, out))
    return kept, skipped


@dataclass(frozen=True)
class Collator:
    """Pads a list of {"input_ids", "labels"?} dicts into tensors with an attention mask.

    Right padding for training and scoring (positions of real tokens stay 0..n-1), left padding for batched
    generation (every prompt ends at the last column, where generation continues).
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
        if "labels" in features[0]:
            batch["labels"] = []
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            rows = {"input_ids": (list(f["input_ids"]), self.pad_token_id), "attention_mask": ([1] * n, 0)}
            if "labels" in batch:
                rows["labels"] = (list(f["labels"]), IGNORE)
            for key, (values, fill) in rows.items():
                batch[key].append(values + [fill] * pad if self.padding_side == "right" else [fill] * pad + values)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
