"""Frozen configuration dataclasses, one per command, composed of the argument groups of `options.py`.

These classes and the groups they are made of are the only place a flag or a default is defined: the CLI builds
its options from them (`cli.py`), library functions take them, and every output folder stores the resolved one.
Construction validates every group (`options.Config`), so a bad value fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from sqsd.options import (
    METHODS,
    AdapterArgs,
    AnchorArgs,
    BatchArgs,
    Config,
    DataArgs,
    EvalArgs,
    FineTuneArgs,
    GenerationArgs,
    KindArgs,
    LayersArgs,
    LoraArgs,
    MaxLengthArgs,
    MethodArgs,
    MetricArgs,
    ModelArgs,
    NewTokensArgs,
    OptimArgs,
    OutputDirArgs,
    OverwriteArgs,
    RenderArgs,
    ReportArgs,
    SeedArgs,
    TrackArgs,
    WindowSizeArgs,
    arg,
    check,
)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


@dataclass(frozen=True, kw_only=True)
class DataInspectConfig(DataArgs, RenderArgs):
    """`sqsd data inspect`: detected format, counts, skipped records, token lengths."""

    model: str | None = arg(None, help="tokenizer/chat template for token-length statistics (e.g. smollm2)")
    show: int = arg(2, help="print this many example records")


@dataclass(frozen=True, kw_only=True)
class ModelInfoConfig(ModelArgs, NewTokensArgs):
    """`sqsd model info`: size, layers, chat template, and a greedy reply (of --max-new-tokens tokens)."""

    model: str = arg(help="a local HF folder, a hub id, a .gguf file, or `smollm2`", positional=True)
    prompt: str = arg("What is the capital of France?", help="prompt for a greedy reply")


@dataclass(frozen=True, kw_only=True)
class AssetsFetchConfig(Config):
    """`sqsd assets fetch`: download the pinned offline assets into the cache."""

    only: tuple[str, ...] = arg((), help="fetch only these assets (default: all)")


@dataclass(frozen=True, kw_only=True)
class AssetsListConfig(Config):
    """`sqsd assets list`: what is in the cache and the named datasets."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig(FineTuneArgs, MethodArgs, TrackArgs):
    """`sqsd train`: supervised fine-tuning (LoRA or full) with the response-only loss, on the HF Trainer.

    OUTPUT_DIR receives the adapter (or model), run.json, train_log.jsonl, skipped.jsonl and checkpoint-N/.
    """

    merge: bool = arg(False, help="also write base+adapter merged into a plain model folder (merged/)")

    def _validate(self) -> None:
        check(not (self.merge and self.method == "full"), "--merge applies to --method lora (a full fine-tune "
                                                           "already writes a plain model folder)")
        check(self.max_steps is None or all(s <= self.max_steps for s in self.track_eval_steps),
              "--track-eval-steps beyond --max-steps are never reached")


@dataclass(frozen=True, kw_only=True)
class DirectionsBuildConfig(FineTuneArgs, KindArgs):
    """`sqsd directions build`: train a LoRA adapter (as `sqsd train --method lora` does) and write it as a
    direction file.

    The direction is the adapter's B·A per module, written to OUTPUT_DIR/KIND.safetensors (+ .json) with
    its kind, base-model fingerprint, rank, alpha, scaling, training config, data fingerprint and step.
    """

    step: int | None = arg(None, help="build from checkpoint-STEP instead of the final adapter (the paper's "
                                      "safety direction is an intermediate checkpoint); add STEP to --save-at")

    def _validate(self) -> None:
        check(self.step is None or self.step in self.save_at
              or (self.save_every is not None and self.step % self.save_every == 0),
              f"--step {self.step} is never saved: add it to --save-at")

    def train_config(self) -> TrainConfig:
        """The `sqsd train` config this build trains with (LoRA, every fine-tuning field as given)."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FineTuneArgs)})


@dataclass(frozen=True, kw_only=True)
class DirectionsDataConfig(ModelArgs, KindArgs, GenerationArgs, OutputDirArgs, OverwriteArgs):
    """`sqsd directions data`: the offline recipe's training data for a danger or safety direction.

    danger: harmful prompts answered by the (unaligned) `--model` (generation flags apply); only answers the
    keyword judge does not see as refusals are kept. safety: the same kind of prompts answered with varied
    refusals (no model needed). OUTPUT_DIR receives data.jsonl (messages format) and provenance.json.
    """

    prompts: tuple[str, ...] = arg(("harmbench@directions", "donotanswer@directions"),
                                   help="harmful prompt sources (the @directions split is disjoint from "
                                        "@align and @eval)")
    n_prompts: int | None = arg(160, help="use at most this many prompts (a seeded sample); unset = all")
    max_new_tokens: int = 128
    batch_size: int = 16

    def _validate(self) -> None:
        check(self.n_prompts is None or self.n_prompts > 0, "--n-prompts must be positive")


@dataclass(frozen=True, kw_only=True)
class DirectionsImportConfig(LayersArgs, OverwriteArgs):
    """`sqsd directions import`: a direction file from a PEFT LoRA adapter folder, or from the dense weight
    difference of two model folders (SOURCE − --base) restricted to chosen modules (--modules, --layers)."""

    source: str = arg(help="a PEFT adapter folder, or (with --base) a fine-tuned model folder", positional=True)
    output: str = arg(help="direction file to write (.safetensors; a .json with the metadata goes beside it)")
    kind: Literal["danger", "safety", "direction"] = arg("direction", help="what the direction stands for")
    base: str | None = arg(None, help="base model folder: import SOURCE − BASE as a dense direction")
    modules: tuple[str, ...] = arg(("all-linear",), help="dense import: module names to keep (e.g. q_proj "
                                                         "v_proj); `all-linear` = every 2-D weight in the "
                                                         "transformer layers")
    model: str | None = arg(None, help="the base model the direction belongs to, recorded as its fingerprint "
                                       "(default: --base for a dense import)")


@dataclass(frozen=True, kw_only=True)
class DirectionsInfoConfig(Config):
    """`sqsd directions info`: per-layer and per-module norms of direction files, and their cosines."""

    files: tuple[str, ...] = arg(help="one or more direction files", positional=True)

    def _validate(self) -> None:
        check(len(self.files) >= 1, "give at least one direction file")


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(DataArgs, ModelArgs, AdapterArgs, GenerationArgs, OverwriteArgs):
    """`sqsd generate`: batched generation over a prompt file or named benchmark, resumable."""

    output: str = arg(help="JSONL file of generations; rerunning skips records already in it")
    max_new_tokens: int = 256


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(ModelArgs, AdapterArgs, EvalArgs, OutputDirArgs, OverwriteArgs):
    """`sqsd evaluate`: generate on harmful (and benign) prompts, judge, and report ASR with confidence intervals.

    OUTPUT_DIR receives the generations, judgments and summary.json; reruns reuse what is there. With `n` > 1
    samples per prompt, ASR is reported averaged over samples and as "any sample unsafe"; `seed` also seeds the
    bootstrap. The defaults (greedy, 48 new tokens, keyword judge) are those of the README's figures.
    """


@dataclass(frozen=True, kw_only=True)
class AlignConfig(ModelArgs, RenderArgs, MethodArgs, LoraArgs, OptimArgs, OutputDirArgs, OverwriteArgs):
    """`sqsd align`: make an unaligned chat model refuse harmful requests with a short supervised recipe.

    OUTPUT_DIR receives the aligned model (a plain HF model folder), its recipe and data. The training flags are
    those of `sqsd train`, with the recipe's defaults.
    """

    harmful: tuple[str, ...] = arg(("harmbench@align", "donotanswer@align"),
                                   help="harmful prompts, answered with varied refusals")
    benign: str = arg("alpaca-eval@align", help="benign instruction/answer pairs, kept helpful")
    rephrased: float = arg(0.5, help="share of the harmful prompts shown rephrased (past/future tense, indirect, "
                                     "hypothetical, fiction, third person; `sqsd.rephrase`'s align templates) "
                                     "instead of directly: same number of records and steps")
    n_harmful: int | None = arg(300, help="use at most this many harmful prompts (a seeded sample); unset = all")
    n_benign: int | None = arg(None, help="use at most this many benign pairs (a seeded sample)")
    benign_answers: Literal["reference", "self"] = arg("self", help="train benign prompts on the model's own "
                                                                    "greedy answers (keeps its style: less "
                                                                    "over-refusal) or on the dataset's answers")
    self_answer_tokens: int = arg(96, help="new tokens for --benign-answers self")
    benign_repeat: int = arg(2, help="each benign pair appears this many times per epoch (weighs helpfulness "
                                     "against refusals: 2 took SmolLM2 from 0.31 to 0.19 over-refusal)")
    max_length: int = 256
    method: Literal["lora", "full"] = "full"
    lora_r: int = 16
    lora_alpha: float = 32.0
    learning_rate: float = 6e-5
    epochs: float = 2.0
    logging_steps: int = 5

    def _validate(self) -> None:
        check(bool(self.harmful), "--harmful needs at least one source")
        check(self.n_harmful is None or self.n_harmful > 0, "--n-harmful must be positive")
        check(0.0 <= self.rephrased <= 1.0, "--rephrased must be in [0, 1]")
        check(self.n_benign is None or self.n_benign > 0, "--n-benign must be positive")
        check(self.self_answer_tokens > 0, "--self-answer-tokens must be positive")
        check(self.benign_repeat >= 1, "--benign-repeat must be at least 1")


@dataclass(frozen=True, kw_only=True)
class DemoConfig(OutputDirArgs, MaxLengthArgs, BatchArgs, SeedArgs, WindowSizeArgs):
    """`sqsd demo`: the whole offline pipeline — align SmolLM2, build the danger and safety directions and the
    benign anchor, score a sample of dolly-sqsd, write the riskiest/safest samples and S1..Sk windows.

    Each stage keeps its own folder under OUTPUT_DIR and is reused on a rerun; the stages' own settings are
    the defaults of their commands (`sqsd align`, `sqsd directions data|build`, `sqsd train`, `sqsd score`);
    --max-length applies to directions, anchor and scoring, --batch-size to scoring, --seed to the pool sample.
    """

    n_pool: int | None = arg(600, help="score a seeded sample of this many of the 3,000 dolly-sqsd samples "
                                       "(unset = all; ~1 sample/s on 2 CPU cores)")
    n_windows: int = arg(5, help="windows S1..Sk cut from the risk ranking (S1 = riskiest)")
    anchor_epochs: float = arg(1.0, help="epochs of the benign anchor adapter")
    output_dir: str = "runs/demo"
    max_length: int = 256
    window_size: int | None = 100

    def _validate(self) -> None:
        check(self.n_pool is None or 0 < self.n_pool <= 3000, "--n-pool must be in 1..3000")
        check(self.n_windows >= 2 and self.window_size is not None, "--n-windows must be >= 2, with a --window-size")
        check(self.n_windows * self.window_size <= (self.n_pool or 3000),
              "--n-windows x --window-size must not exceed --n-pool")


@dataclass(frozen=True, kw_only=True)
class SteerConfig(ModelArgs, EvalArgs, OutputDirArgs, OverwriteArgs):
    """`sqsd steer`: the safety of θ₀ + α·s·T for a grid of α, per direction (docs/design.md §2, mechanism
    analysis (b)).

    s is the direction's own scaling (`meta["scaling"]`, the adapter's alpha/r; 1.0 when absent), so α = 1
    reproduces the adapter the direction came from, merged into the weights, and α = 0 is the base model.
    Each (direction, α) is evaluated as `sqsd evaluate` does (same flags and defaults), into
    OUTPUT_DIR/<direction stem>/alpha_<α>/, so reruns reuse its generations; steering.jsonl/.csv/.png in
    OUTPUT_DIR hold the table and the plot.
    """

    directions: tuple[str, ...] = arg(help="direction files (`sqsd directions build/import`)", positional=True)
    alphas: tuple[float, ...] = arg((-1.0, -0.5, 0.0, 0.5, 1.0, 2.0), help="steering coefficients α")

    def _validate(self) -> None:
        check(len(self.directions) >= 1, "give at least one direction file")
        check(len(self.alphas) >= 1 and len(set(self.alphas)) == len(self.alphas),
              "--alphas must be given, each once")


@dataclass(frozen=True, kw_only=True)
class ReportTrajectoryConfig(ReportArgs, MetricArgs):
    """`sqsd report trajectory`: plot a trajectory.jsonl (`sqsd train --track`): the projection of the weight
    change on each tracked direction (--metric) against the step, with the ASR where it was measured."""


@dataclass(frozen=True, kw_only=True)
class ReportSteeringConfig(ReportArgs):
    """`sqsd report steering`: plot a steering.jsonl (`sqsd steer`): ASR against α per direction, with 95% CIs
    and the over-refusal rate dashed."""


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(DataArgs, ModelArgs, RenderArgs, MetricArgs, BatchArgs, SeedArgs, AnchorArgs, OutputDirArgs,
                  OverwriteArgs):
    """`sqsd score`: per-sample SQSD risk = projection of the update a sample induces on the danger direction
    minus that on the safety direction. Writes scores.parquet (or .jsonl) with index, id, danger, safety, risk,
    risk_z, n_response_tokens, loss, status into OUTPUT_DIR (with chunks/ and run.json); resumable (chunk by
    chunk) and shardable with torchrun. Batches are length-bucketed within a chunk."""

    method: tuple[str, ...] = arg(("sqsd",), help=f"scoring method(s), higher = riskier: {', '.join(METHODS)} "
                                                  "(README, Scoring); `score` holds the first, and with several "
                                                  "each also gets a column named after it")
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
    chunk_size: int = arg(256, help="samples per resumable chunk (and per unit of work across processes)")
    format_out: Literal["parquet", "jsonl"] = arg("parquet", help="format of the scores file")
    max_length: int = 512

    def _validate(self) -> None:
        unknown = [m for m in self.method if m not in METHODS]
        check(not unknown, f"unknown --method {unknown[0] if unknown else ''!r}; choose from {', '.join(METHODS)}")
        check(bool(self.method) and len(set(self.method)) == len(self.method),
              "--method needs one or more distinct methods")
        check(bool(self.danger or self.safety) or "sqsd" not in self.method,
              "give --danger and/or --safety (a direction file each) for --method sqsd")
        for method in ("gradsim", "repsim", "larf", "datashield"):
            check(method not in self.method or bool(self.harmful_anchors and self.safe_anchors),
                  f"--method {method} needs --harmful-anchors and --safe-anchors")
        check("larf" not in self.method or len(self.layer) == 1, "--method larf takes one --layer")
        check("safety-influence" not in self.method or bool(self.safe_anchors),
              "--method safety-influence needs --safe-anchors (the refusal probe set)")
        for term in ("danger", "safety"):
            check(getattr(self, term) or not getattr(self, f"{term}_anchor"),
                  f"--{term}-anchor is given but --{term} is not: which direction should be scored there?")
            scaling = getattr(self, f"{term}_scaling")
            check(scaling is None or 0 < scaling < float("inf"), f"--{term}-scaling must be a positive number")
        check(self.chunk_size > 0, "--chunk-size must be positive")


@dataclass(frozen=True, kw_only=True)
class FilterConfig(OutputDirArgs, OverwriteArgs, WindowSizeArgs):
    """`sqsd filter`: write subsets of a scored dataset in the dataset's own format (JSONL), by one of: dropping
    the riskiest samples, keeping the safest, or the paper's K evenly spaced windows S1 (riskiest) ... SK.
    OUTPUT_DIR receives kept.jsonl / dropped.jsonl or S1.jsonl ... SK.jsonl, and filter.json."""

    scores: str = arg(help="a scores.parquet / scores.jsonl written by `sqsd score`", positional=True)
    data: str | None = arg(None, help="the dataset that was scored (default: the `data` in the scores' run.json, "
                                      "read with the same format, split and limit)")
    by: str = arg("risk", help="column to rank by, higher = riskier: risk, risk_z, danger, safety, or any numeric "
                               "column (e.g. n_response_tokens for a length baseline)")
    drop_top_percent: float | None = arg(None, help="drop the riskiest P percent, keep the rest")
    drop_top: int | None = arg(None, help="drop the K riskiest, keep the rest")
    keep_bottom: int | None = arg(None, help="keep only the K least risky")
    windows: int | None = arg(None, help="write K windows S1..SK at evenly spaced ranks (needs --window-size)")

    def _validate(self) -> None:
        check(self.window_size is None or self.windows is not None, "--window-size needs --windows")
        modes = [name for name in ("drop_top_percent", "drop_top", "keep_bottom", "windows")
                 if getattr(self, name) is not None]
        check(len(modes) == 1, "choose exactly one of --drop-top-percent, --drop-top, --keep-bottom, --windows"
              + (f" (got {', '.join('--' + m.replace('_', '-') for m in modes)})" if modes else ""))
        check(self.drop_top_percent is None or 0 < self.drop_top_percent < 100,
              "--drop-top-percent must be between 0 and 100 (exclusive)")
        check(self.drop_top is None or self.drop_top > 0, "--drop-top must be positive")
        check(self.keep_bottom is None or self.keep_bottom > 0, "--keep-bottom must be positive")
        check(self.windows is None or self.windows > 0, "--windows must be positive")
        check(self.windows is None or self.window_size is not None,
              "--windows needs --window-size (samples per window)")
        check(bool(self.by.strip()), "--by must name a column")
