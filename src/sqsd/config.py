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
    track: tuple[str, ...] = arg((), help="direction files to track: at every logging step, project the cumulative "
                                          "weight change on each into trajectory.jsonl (`sqsd.drift`)")
    track_eval_steps: tuple[int, ...] = arg((), help="with --track, also measure ASR (greedy, keyword judge) at "
                                                     "these steps (0 = before training)")
    track_eval_harmful: str = arg("harmbench@eval", help="harmful prompts for --track-eval-steps")
    track_eval_limit: int = arg(32, help="use the first N prompts of --track-eval-harmful")
    track_eval_max_new_tokens: int = arg(48, help="new tokens per response for --track-eval-steps")
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
        _check(not self.track_eval_steps or bool(self.track), "--track-eval-steps needs --track (direction files)")
        _check(all(s >= 0 for s in self.track_eval_steps), "--track-eval-steps must be >= 0")
        _check(self.max_steps is None or all(s <= self.max_steps for s in self.track_eval_steps),
               "--track-eval-steps beyond --max-steps are never reached")
        _check(self.track_eval_limit > 0 and self.track_eval_max_new_tokens > 0,
               "--track-eval-limit and --track-eval-max-new-tokens must be positive")


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

    The direction is the adapter's B·A per module, written to OUTPUT_DIR/KIND.safetensors (+ .json) with
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
    n_harmful: int | None = arg(300, help="use at most this many harmful prompts (a seeded sample); unset = all")
    n_benign: int | None = arg(None, help="use at most this many benign pairs (a seeded sample)")
    benign_answers: Literal["reference", "self"] = arg("self", help="train benign prompts on the model's own "
                                                                    "greedy answers (keeps its style: less "
                                                                    "over-refusal) or on the dataset's answers")
    self_answer_tokens: int = arg(96, help="new tokens for --benign-answers self")
    benign_repeat: int = arg(2, help="each benign pair appears this many times per epoch (weighs helpfulness "
                                     "against refusals: 2 took SmolLM2 from 0.31 to 0.19 over-refusal)")
    max_length: int = arg(256, help="maximum tokens per training sample")
    method: Literal["full", "lora"] = arg("full", help="full fine-tune, or LoRA merged into the weights")
    lora_r: int = arg(16, help="LoRA rank (with --method lora)")
    lora_alpha: float = arg(32.0, help="LoRA alpha (with --method lora)")
    learning_rate: float = arg(6e-5, help="peak learning rate")
    epochs: float = arg(2.0, help="training epochs")
    batch_size: int = arg(8, help="batch size")
    seed: int = arg(0, help="seed for sampling the data, refusal choice and training")
    overwrite: bool = arg(False, help="replace an output_dir made with a different config")

    def __post_init__(self) -> None:
        RenderArgs.__post_init__(self)
        _check(bool(self.harmful), "--harmful needs at least one source")
        _check(self.n_harmful is None or self.n_harmful > 0, "--n-harmful must be positive")
        _check(self.n_benign is None or self.n_benign > 0, "--n-benign must be positive")
        _check(self.benign_repeat >= 1, "--benign-repeat must be at least 1")
        _check(self.learning_rate > 0 and self.epochs > 0, "--learning-rate and --epochs must be positive")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """`sqsd demo`: the whole offline pipeline — align SmolLM2, build the danger and safety directions and the
    benign anchor, score a sample of dolly-sqsd, write the riskiest/safest samples and S1..Sk windows.

    Each stage keeps its own folder under OUTPUT_DIR and is reused on a rerun; the stages' own settings are
    the defaults of their commands (`sqsd align`, `sqsd directions data|build`, `sqsd train`, `sqsd score`).
    """

    output_dir: str = arg("runs/demo", help="folder for every stage's outputs")
    n_pool: int | None = arg(600, help="score a seeded sample of this many of the 3,000 dolly-sqsd samples "
                                       "(unset = all; ~1 sample/s on 2 CPU cores)")
    n_windows: int = arg(5, help="windows S1..Sk cut from the risk ranking (S1 = riskiest)")
    window_size: int = arg(100, help="samples per window")
    anchor_epochs: float = arg(1.0, help="epochs of the benign anchor adapter")
    max_length: int = arg(256, help="maximum tokens per sample for directions, anchor and scoring")
    batch_size: int = arg(8, help="scoring batch size")
    seed: int = arg(0, help="seed of the pool sample")

    def __post_init__(self) -> None:
        _check(self.n_pool is None or 0 < self.n_pool <= 3000, "--n-pool must be in 1..3000")
        _check(self.n_windows >= 2 and self.window_size > 0, "--n-windows must be >= 2, --window-size > 0")
        _check(self.n_windows * self.window_size <= (self.n_pool or 3000),
               "--n-windows x --window-size must not exceed --n-pool")


@dataclass(frozen=True, kw_only=True)
class SteerConfig(ModelArgs):
    """`sqsd steer`: the safety of θ₀ + α·s·T for a grid of α, per direction (docs/design.md §2 mechanism analysis (b)).

    s is the direction's own scaling (`meta["scaling"]`, the adapter's alpha/r; 1.0 when absent), so α = 1
    reproduces the adapter the direction came from, merged into the weights, and α = 0 is the base model.
    Each (direction, α) is evaluated as `sqsd evaluate` does, into OUTPUT_DIR/<direction stem>/alpha_<α>/, so
    reruns reuse its generations; steering.jsonl/.csv/.png in OUTPUT_DIR hold the table and the plot.
    """

    directions: tuple[str, ...] = arg(help="direction files (`sqsd directions build/import`)", positional=True)
    output_dir: str = arg(help="folder for the per-(direction, alpha) evaluations and steering.jsonl/.csv/.png")
    alphas: tuple[float, ...] = arg((-1.0, -0.5, 0.0, 0.5, 1.0, 2.0), help="steering coefficients α")
    harmful: str = arg("harmbench@eval", help="harmful prompts: a file, named benchmark or hub id")
    benign: str | None = arg("alpaca-eval@eval", help="benign prompts for the over-refusal rate; '' to skip")
    limit: int | None = arg(None, help="use only the first N prompts of each set")
    max_new_tokens: int = arg(48, help="new tokens per response")
    batch_size: int = arg(8, help="prompts per batch (left padded)")
    system_prompt: str | None = arg(None, help="system message; unset = none given; '' = an empty system turn")
    max_prompt_length: int = arg(1024, help="prompt tokens kept (dropped from the left)")
    judge: Literal["keyword", "llama-guard", "harmbench"] = arg("keyword", help="who decides unsafe")
    judge_model: str | None = arg(None, help="checkpoint of the llama-guard / harmbench judge (path or hub id)")
    judge_batch_size: int = arg(8, help="judge batch size")
    n_bootstrap: int = arg(1000, help="bootstrap resamples for the 95% confidence intervals")
    seed: int = arg(0, help="bootstrap seed")
    overwrite: bool = arg(False, help="replace evaluations made with a different config, direction or model")

    def __post_init__(self) -> None:
        _check(len(self.directions) >= 1, "give at least one direction file")
        _check(len(self.alphas) >= 1 and len(set(self.alphas)) == len(self.alphas),
               "--alphas must be given, each once")
        _check(self.limit is None or self.limit > 0, "--limit must be positive")
        _check(self.max_new_tokens > 0 and self.batch_size > 0, "--max-new-tokens, --batch-size must be > 0")
        _check(self.judge == "keyword" or self.judge_model is not None,
               f"--judge {self.judge} needs --judge-model (a checkpoint folder or hub id)")
        _check(self.n_bootstrap >= 100, "--n-bootstrap must be at least 100")


@dataclass(frozen=True, kw_only=True)
class ReportTrajectoryConfig:
    """`sqsd report trajectory`: plot a trajectory.jsonl (`sqsd train --track`): the projection of the weight
    change on each tracked direction against the step, with the ASR where it was measured."""

    file: str = arg(help="a trajectory.jsonl", positional=True)
    output: str | None = arg(None, help="PNG to write (default: FILE with .png)")
    metric: Literal["cosine-sum", "projection", "cosine"] = arg("cosine-sum", help="which projection to plot")


@dataclass(frozen=True, kw_only=True)
class ReportSteeringConfig:
    """`sqsd report steering`: plot a steering.jsonl (`sqsd steer`): ASR against α per direction, with 95% CIs
    and the over-refusal rate dashed."""

    file: str = arg(help="a steering.jsonl", positional=True)
    output: str | None = arg(None, help="PNG to write (default: FILE with .png)")


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(DataArgs, ModelArgs, RenderArgs):
    """`sqsd score`: per-sample SQSD risk = projection of the update a sample induces on the danger direction
    minus that on the safety direction. Writes scores.parquet (or .jsonl) with index, id, danger, safety, risk,
    risk_z, n_response_tokens, loss, status; resumable (chunk by chunk) and shardable with torchrun."""

    danger: str | None = arg(None, help="danger direction file (`sqsd directions build/import`); unset = no danger term")
    safety: str | None = arg(None, help="safety direction file; unset = no safety term")
    danger_anchor: str | None = arg(None, help="PEFT adapter folder at which the danger term is taken (the paper: "
                                               "a warm-up adapter trained on benign data); unset = dense mode, at "
                                               "the model itself")
    safety_anchor: str | None = arg(None, help="PEFT adapter folder at which the safety term is taken (the paper: "
                                               "the safety adapter itself); unset = dense mode")
    danger_scaling: float | None = arg(None, help="override the danger anchor's LoRA scaling while scoring; unset "
                                                  "= its own alpha/r")
    safety_scaling: float | None = arg(1.0, help="override the safety anchor's LoRA scaling while scoring (the "
                                                 "paper: 1.0 or 0.8); pass its alpha/r to keep the adapter's own; "
                                                 "ignored without --safety-anchor")
    allow_zero_anchor: bool = arg(False, help="score at an anchor whose lora_B is zero everywhere (a fresh "
                                              "adapter: its updates carry no signal, so this is refused unless "
                                              "given)")
    metric: Literal["cosine-sum", "projection", "cosine"] = arg("cosine-sum", help="cosine-sum (the paper's: "
                                                                "one cosine per module, summed), projection "
                                                                "(<update, d>/|d|) or cosine (of the whole "
                                                                "vectors)")
    max_length: int = arg(512, help="maximum tokens per sample; prompt tokens are dropped from the left first")
    batch_size: int = arg(8, help="samples per forward/backward (length-bucketed within a chunk)")
    chunk_size: int = arg(256, help="samples per resumable chunk (and per unit of work across processes)")
    output_dir: str = arg(help="folder for scores.parquet/.jsonl, chunks/ and run.json")
    format_out: Literal["parquet", "jsonl"] = arg("parquet", help="format of the scores file")
    overwrite: bool = arg(False, help="replace an output_dir made with a different config or inputs")

    def __post_init__(self) -> None:
        DataArgs.__post_init__(self)
        RenderArgs.__post_init__(self)
        _check(bool(self.danger or self.safety), "give --danger and/or --safety (a direction file each)")
        for term in ("danger", "safety"):
            _check(getattr(self, term) or not getattr(self, f"{term}_anchor"),
                   f"--{term}-anchor is given but --{term} is not: which direction should be scored there?")
            scaling = getattr(self, f"{term}_scaling")
            _check(scaling is None or 0 < scaling < float("inf"),
                   f"--{term}-scaling must be a positive number")
        _check(self.batch_size > 0, "--batch-size must be positive")
        _check(self.chunk_size > 0, "--chunk-size must be positive")


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    """`sqsd filter`: write subsets of a scored dataset in the dataset's own format (JSONL), by one of: dropping
    the riskiest samples, keeping the safest, or the paper's K evenly spaced windows S1 (riskiest) ... SK."""

    scores: str = arg(help="a scores.parquet / scores.jsonl written by `sqsd score`", positional=True)
    data: str | None = arg(None, help="the dataset that was scored (default: the `data` in the scores' run.json, "
                                      "read with the same format, split and limit)")
    output_dir: str = arg(help="folder for kept.jsonl / dropped.jsonl or S1.jsonl ... SK.jsonl, and filter.json")
    by: str = arg("risk", help="column to rank by, higher = riskier: risk, risk_z, danger, safety, or any numeric "
                               "column (e.g. n_response_tokens for a length baseline)")
    drop_top_percent: float | None = arg(None, help="drop the riskiest P percent, keep the rest")
    drop_top: int | None = arg(None, help="drop the K riskiest, keep the rest")
    keep_bottom: int | None = arg(None, help="keep only the K least risky")
    windows: int | None = arg(None, help="write K windows S1..SK at evenly spaced ranks (needs --window-size)")
    window_size: int | None = arg(None, help="samples per window (with --windows)")
    overwrite: bool = arg(False, help="replace an output_dir made with a different config or inputs")

    def __post_init__(self) -> None:
        _check(self.window_size is None or self.windows is not None, "--window-size needs --windows")
        modes = [name for name in ("drop_top_percent", "drop_top", "keep_bottom", "windows")
                 if getattr(self, name) is not None]
        _check(len(modes) == 1, "choose exactly one of --drop-top-percent, --drop-top, --keep-bottom, --windows"
               + (f" (got {', '.join('--' + m.replace('_', '-') for m in modes)})" if modes else ""))
        _check(self.drop_top_percent is None or 0 < self.drop_top_percent < 100,
               "--drop-top-percent must be between 0 and 100 (exclusive)")
        _check(self.drop_top is None or self.drop_top > 0, "--drop-top must be positive")
        _check(self.keep_bottom is None or self.keep_bottom > 0, "--keep-bottom must be positive")
        _check(self.windows is None or self.windows > 0, "--windows must be positive")
        _check(self.windows is None or self.window_size is not None,
               "--windows needs --window-size (samples per window)")
        _check(self.window_size is None or self.window_size > 0, "--window-size must be positive")
        _check(bool(self.by.strip()), "--by must name a column")
