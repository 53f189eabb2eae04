"""Frozen configuration dataclasses, one per command.

The fields below are the only place a flag or a default is defined: the CLI builds its options from them
(`cli.py`), library functions take them, and every output folder stores the resolved one as `config.json`.
Validation lives in `__post_init__` so a bad value fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from sqsd.errors import SqsdError

DATA_FORMATS = ("auto", "alpaca", "dolly", "messages", "prompt-completion", "beavertails", "pku-saferlhf",
                "prompts")
Format = Literal["auto", "alpaca", "dolly", "messages", "prompt-completion", "beavertails", "pku-saferlhf",
                 "prompts"]


def arg(default: Any = dataclasses.MISSING, help: str = "", positional: bool = False, **kw: Any) -> Any:
    """A dataclass field with the CLI help text (and positional-ness) stored in its metadata."""
    meta = {"help": help, "positional": positional}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SqsdError(message)


@dataclass(frozen=True, kw_only=True)
class DataArgs:
    """Where the records come from and how they are read."""

    data: str = arg(help="a file (JSONL, JSON, CSV, Parquet, TXT), a named dataset (`sqsd assets list`; "
                         "`dolly-sqsd:S1` picks a window) or a Hugging Face dataset id", positional=True)
    format: Format = arg("auto", help="record format; `auto` detects it from the fields")
    split: str = arg("train", help="split of a Hugging Face dataset id")
    on_bad_record: Literal["error", "skip"] = arg("error", help="stop at the first bad record, or skip and "
                                                               "list the bad ones")
    limit: int | None = arg(None, help="read only the first N records")

    def __post_init__(self) -> None:
        _check(self.limit is None or self.limit > 0, "--limit must be positive")


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """Which model and how to place it."""

    model: str = arg("smollm2", help="a local HF folder, a hub id, a .gguf file, or `smollm2` (packaged default)")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = arg("float32", help="weights dtype")
    device: str = arg("cpu", help="torch device, e.g. cpu, cuda, cuda:1")


@dataclass(frozen=True, kw_only=True)
class RenderArgs:
    """How a record becomes tokens."""

    system_prompt: str | None = arg(None, help="system message; unset = none given (the chat template's own "
                                               "default applies if it has one); '' = an empty system turn")
    max_length: int = arg(1024, help="maximum tokens per sample; prompt tokens are dropped from the left first")

    def __post_init__(self) -> None:
        _check(self.max_length >= 2, "--max-length must be at least 2")


@dataclass(frozen=True, kw_only=True)
class DataInspectConfig(DataArgs, RenderArgs):
    """`sqsd data inspect`: detected format, counts, skipped records, token lengths."""

    model: str | None = arg(None, help="tokenizer/chat template for token-length statistics (e.g. smollm2)")
    show: int = arg(2, help="print this many example records")

    def __post_init__(self) -> None:
        DataArgs.__post_init__(self)
        RenderArgs.__post_init__(self)


@dataclass(frozen=True, kw_only=True)
class ModelInfoConfig(ModelArgs):
    """`sqsd model info`: size, layers, chat template, and a greedy reply."""

    model: str = arg(help="a local HF folder, a hub id, a .gguf file, or `smollm2`", positional=True)
    prompt: str = arg("What is the capital of France?", help="prompt for a greedy reply")
    max_new_tokens: int = arg(48, help="length of the greedy reply")


@dataclass(frozen=True, kw_only=True)
class AssetsFetchConfig:
    """`sqsd assets fetch`: download the pinned offline assets into the cache."""

    only: tuple[str, ...] = arg((), help="fetch only these assets (default: all)")


@dataclass(frozen=True, kw_only=True)
class AssetsListConfig:
    """`sqsd assets list`: what is in the cache and the named datasets."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig(DataArgs, ModelArgs, RenderArgs):
    """`sqsd train`: supervised fine-tuning (LoRA or full) with the response-only loss, on the HF Trainer."""

    output_dir: str = arg(help="folder for the adapter (or model), config, training log and checkpoints")
    method: Literal["lora", "full"] = arg("lora", help="train a LoRA adapter or all weights")
    lora_r: int = arg(8, help="LoRA rank")
    lora_alpha: float = arg(16.0, help="LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = arg(0.0, help="LoRA dropout")
    target_modules: tuple[str, ...] = arg(("all-linear",), help="module names to adapt; `all-linear` = every "
                                                               "linear layer except the LM head")
    layers: tuple[int, ...] = arg((), help="adapt only these layer indices (default: all)")
    learning_rate: float = arg(2e-4, help="peak learning rate")
    epochs: float = arg(3.0, help="training epochs (ignored when --max-steps is set)")
    max_steps: int | None = arg(None, help="stop after this many optimizer steps")
    batch_size: int = arg(8, help="per-device batch size")
    grad_accum: int = arg(1, help="gradient accumulation steps")
    group_by_length: bool = arg(False, help="batch samples of similar length together: less padding, faster, "
                                            "but batches are less random")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = arg("cosine",
                                                                                   help="learning-rate schedule")
    warmup_ratio: float = arg(0.1, help="fraction of steps for linear warm-up")
    weight_decay: float = arg(0.0, help="AdamW weight decay")
    seed: int = arg(0, help="seed for initialisation, shuffling and dropout")
    logging_steps: int = arg(1, help="log the loss every N steps")
    save_every: int | None = arg(None, help="save a checkpoint every N steps")
    save_at: tuple[int, ...] = arg((), help="save checkpoints at exactly these steps (e.g. 50 100 400)")
    merge: bool = arg(False, help="also write base+adapter merged into a plain model folder (merged/)")
    resume: bool = arg(False, help="continue from the last checkpoint in output_dir (an identical rerun of an "
                                   "unfinished run does so by itself; with this flag, no checkpoint is an error)")
    overwrite: bool = arg(False, help="replace an output_dir made with a different config")

    def __post_init__(self) -> None:
        DataArgs.__post_init__(self)
        RenderArgs.__post_init__(self)
        _check(self.lora_r > 0, "--lora-r must be positive")
        _check(self.learning_rate > 0, "--learning-rate must be positive")
        _check(self.epochs > 0, "--epochs must be positive")
        _check(self.max_steps is None or self.max_steps > 0, "--max-steps must be positive")
        _check(self.batch_size > 0 and self.grad_accum > 0, "--batch-size and --grad-accum must be positive")
        _check(0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)")
        _check(0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)")
        _check(self.save_every is None or self.save_every > 0, "--save-every must be positive")
        _check(all(s > 0 for s in self.save_at), "--save-at steps must be positive")
        _check(not (self.merge and self.method == "full"), "--merge applies to --method lora (a full fine-tune "
                                                            "already writes a plain model folder)")


@dataclass(frozen=True, kw_only=True)
class DirectionsDataConfig(ModelArgs):
    """`sqsd directions data`: the offline recipe's training data for a danger or safety direction.

    danger: harmful prompts answered by the (unaligned) `--model`; only answers the keyword judge does not see
    as refusals are kept. safety: the same kind of prompts answered with varied refusals (no model needed).
    """

    kind: Literal["danger", "safety"] = arg(help="which direction the data is for")
    output_dir: str = arg(help="folder for data.jsonl (messages format) and provenance.json")
    prompts: tuple[str, ...] = arg(("harmbench@directions", "donotanswer@directions"),
                                   help="harmful prompt sources (the @directions split is disjoint from "
                                        "@align and @eval)")
    n_prompts: int | None = arg(160, help="use at most this many prompts (a seeded sample); unset = all")
    max_new_tokens: int = arg(128, help="new tokens per answer (danger)")
    batch_size: int = arg(16, help="generation batch size (danger)")
    seed: int = arg(0, help="seed for the prompt sample and the refusal choice")
    overwrite: bool = arg(False, help="replace an output_dir made with a different config")

    def __post_init__(self) -> None:
        _check(self.n_prompts is None or self.n_prompts > 0, "--n-prompts must be positive")
        _check(self.max_new_tokens > 0 and self.batch_size > 0, "--max-new-tokens and --batch-size must be > 0")


@dataclass(frozen=True, kw_only=True)
class DirectionsBuildConfig(TrainConfig):
    """`sqsd directions build`: train a LoRA adapter (as `sqsd train` does) and write it as a direction file.

    The direction is the adapter's B·A per module, written to OUTPUT_DIR/direction.safetensors (+ .json) with
    its kind, base-model fingerprint, rank, alpha, scaling, training config, data fingerprint and step.
    """

    kind: Literal["danger", "safety"] = arg(help="what the direction stands for")
    step: int | None = arg(None, help="build from checkpoint-STEP instead of the final adapter (the paper's "
                                      "safety direction is an intermediate checkpoint); add STEP to --save-at")

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        _check(self.method == "lora", "a direction is built from a LoRA adapter: use --method lora (a full "
                                      "fine-tune can be imported as a dense direction with `directions import`)")
        _check(self.step is None or self.step in self.save_at
               or (self.save_every is not None and self.step % self.save_every == 0),
               f"--step {self.step} is never saved: add it to --save-at")


@dataclass(frozen=True, kw_only=True)
class DirectionsImportConfig:
    """`sqsd directions import`: a direction file from a PEFT LoRA adapter folder, or from the dense weight
    difference of two model folders (SOURCE − --base) restricted to chosen modules."""

    source: str = arg(help="a PEFT adapter folder, or (with --base) a fine-tuned model folder", positional=True)
    output: str = arg(help="direction file to write (.safetensors; a .json with the metadata goes beside it)")
    kind: Literal["danger", "safety", "direction"] = arg("direction", help="what the direction stands for")
    base: str | None = arg(None, help="base model folder: import SOURCE − BASE as a dense direction")
    modules: tuple[str, ...] = arg(("all-linear",), help="dense import: module names to keep (e.g. q_proj "
                                                         "v_proj); `all-linear` = every 2-D weight in the "
                                                         "transformer layers")
    layers: tuple[int, ...] = arg((), help="dense import: keep only these layer indices (default: all)")
    model: str | None = arg(None, help="the base model the direction belongs to, recorded as its fingerprint "
                                       "(default: --base for a dense import)")
    overwrite: bool = arg(False, help="replace an existing output file")


@dataclass(frozen=True, kw_only=True)
class DirectionsInfoConfig:
    """`sqsd directions info`: per-layer and per-module norms of direction files, and their cosines."""

    files: tuple[str, ...] = arg(help="one or more direction files", positional=True)

    def __post_init__(self) -> None:
        _check(len(self.files) >= 1, "give at least one direction file")


@dataclass(frozen=True, kw_only=True)
class GenerationArgs:
    """How responses are generated (shared by `generate` and `evaluate`)."""

    adapter: str | None = arg(None, help="a PEFT adapter folder applied on top of the model")
    system_prompt: str | None = arg(None, help="system message; unset = none given (the chat template's own "
                                               "default applies if it has one); '' = an empty system turn")
    max_new_tokens: int = arg(256, help="new tokens per response (the paper uses 512)")
    batch_size: int = arg(8, help="prompts per batch (left padded)")
    do_sample: bool = arg(False, help="sample instead of greedy decoding")
    temperature: float = arg(1.0, help="sampling temperature")
    top_p: float = arg(1.0, help="nucleus sampling threshold")
    n: int = arg(1, help="samples per prompt (requires --do-sample when > 1)")
    seed: int = arg(0, help="sampling seed")
    max_prompt_length: int = arg(1024, help="prompt tokens kept (dropped from the left)")

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0 and self.batch_size > 0, "--max-new-tokens, --batch-size must be > 0")
        _check(self.n >= 1, "--n must be at least 1")
        _check(self.n == 1 or self.do_sample, "--n > 1 needs --do-sample (greedy gives n identical answers)")
        _check(self.temperature > 0 and 0 < self.top_p <= 1, "--temperature > 0 and 0 < --top-p <= 1")


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(DataArgs, ModelArgs, GenerationArgs):
    """`sqsd generate`: batched generation over a prompt file or named benchmark, resumable."""

    output: str = arg(help="JSONL file of generations; rerunning skips records already in it")
    overwrite: bool = arg(False, help="replace an output file made with a different config")

    def __post_init__(self) -> None:
        DataArgs.__post_init__(self)
        GenerationArgs.__post_init__(self)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(ModelArgs, GenerationArgs):
    """`sqsd evaluate`: generate on harmful (and benign) prompts, judge, and report ASR with confidence intervals.

    With `n` > 1 samples per prompt, ASR is reported averaged over samples and as "any sample unsafe"; `seed`
    also seeds the bootstrap.
    """

    output_dir: str = arg(help="folder for generations, judgments and summary.json; reruns reuse what is there")
    harmful: str = arg("harmbench@eval", help="harmful prompts: a file, named benchmark or hub id (`@eval` keeps "
                                              "the held-out split)")
    benign: str | None = arg("alpaca-eval@eval", help="benign prompts for the over-refusal rate; '' to skip")
    limit: int | None = arg(None, help="use only the first N prompts of each set")
    judge: Literal["keyword", "llama-guard", "harmbench"] = arg("keyword", help="who decides unsafe")
    judge_model: str | None = arg(None, help="checkpoint of the llama-guard / harmbench judge (path or hub id)")
    judge_batch_size: int = arg(8, help="judge batch size")
    n_bootstrap: int = arg(1000, help="bootstrap resamples for the 95% confidence intervals")
    overwrite: bool = arg(False, help="replace generations or judgments made with a different config")

    def __post_init__(self) -> None:
        GenerationArgs.__post_init__(self)
        _check(self.judge == "keyword" or self.judge_model is not None,
               f"--judge {self.judge} needs --judge-model (a checkpoint folder or hub id)")
        _check(self.limit is None or self.limit > 0, "--limit must be positive")
        _check(self.n_bootstrap >= 100, "--n-bootstrap must be at least 100")


@dataclass(frozen=True, kw_only=True)
class AlignConfig(ModelArgs, RenderArgs):
    """`sqsd align`: make an unaligned chat model refuse harmful requests with a short supervised recipe."""

    output_dir: str = arg(help="folder for the aligned model (a plain HF model folder), its recipe and data")
    harmful: tuple[str, ...] = arg(("harmbench@align", "donotanswer@align"),
                                   help="harmful prompts, answered with varied refusals")
    benign: str = arg("alpaca-eval@align", help="benign instruction/answer pairs, kept helpful")
    n_harmful: int | None = arg(None, help="use at most this many harmful prompts (a seeded sample)")
    n_benign: int | None = arg(None, help="use at most this many benign pairs (a seeded sample)")
    benign_answers: Literal["reference", "self"] = arg("reference", help="train benign prompts on the dataset's "
                                                                         "answers, or on the model's own greedy ones")
    self_answer_tokens: int = arg(160, help="new tokens for --benign-answers self")
    max_length: int = arg(256, help="maximum tokens per training sample")
    method: Literal["full", "lora"] = arg("full", help="full fine-tune, or LoRA merged into the weights")
    lora_r: int = arg(16, help="LoRA rank (with --method lora)")
    lora_alpha: float = arg(32.0, help="LoRA alpha (with --method lora)")
    learning_rate: float = arg(3e-5, help="peak learning rate")
    epochs: float = arg(2.0, help="training epochs")
    batch_size: int = arg(8, help="batch size")
    seed: int = arg(0, help="seed for sampling the data, refusal choice and training")
    overwrite: bool = arg(False, help="replace an output_dir made with a different config")

    def __post_init__(self) -> None:
        RenderArgs.__post_init__(self)
        _check(bool(self.harmful), "--harmful needs at least one source")
        _check(self.n_harmful is None or self.n_harmful > 0, "--n-harmful must be positive")
        _check(self.n_benign is None or self.n_benign > 0, "--n-benign must be positive")
        _check(self.learning_rate > 0 and self.epochs > 0, "--learning-rate and --epochs must be positive")
