"""Frozen configuration dataclasses, one per command, composed of the argument groups of `options.py`.

These classes and the groups they are made of are the only place a flag or a default is defined: the CLI builds
its options from them (`cli.py`), library functions take them, and every output folder stores the resolved one.
Construction validates every group (`options.Config`), so a bad value fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqsd.options import (
    EVAL_HARMFUL,
    METHODS,
    AdapterArgs,
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
    ModelArgs,
    NewTokensArgs,
    OptimArgs,
    OutputDirArgs,
    OverwriteArgs,
    PoolSampleArgs,
    RenderArgs,
    ReportArgs,
    ScoringArgs,
    SeedArgs,
    TrackArgs,
    WindowsArgs,
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
class DemoConfig(OutputDirArgs, MaxLengthArgs, BatchArgs, PoolSampleArgs, WindowsArgs):
    """`sqsd demo`: the whole offline pipeline — align SmolLM2, build the danger and safety directions and the
    benign anchor, score a sample of dolly-sqsd (SQSD and baselines), write the riskiest/safest samples and S1..Sk
    windows, then a small `ends` experiment (fine-tune on each method's riskiest, safest and a random n: ASR).

    Each stage keeps its own folder under OUTPUT_DIR and is reused on a rerun; the stages' own settings are
    the defaults of their commands (`sqsd align`, `sqsd directions data|build`, `sqsd train`, `sqsd score`,
    `sqsd experiment`); --max-length applies to directions, anchor, scoring and the experiment, --batch-size to
    scoring and the experiment, --seed to the pool sample and the experiment (its one fine-tuning seed).
    """

    n_pool: int | None = 600  # of the 3,000 dolly-sqsd samples, ~1 sample/s on 2 CPU cores
    anchor_epochs: float = arg(1.0, help="epochs of the benign anchor adapter")
    experiment_methods: tuple[str, ...] = arg(("sqsd", "random", "length", "gradsim"), help="the methods the "
                                              "pool is scored with and the last stage's experiment compares "
                                              "(SQSD first: the reference)")
    ends_fraction: float = arg(0.1, help="the experiment fine-tunes on each method's riskiest and safest (and a "
                                         "random) this fraction of the scored pool")
    output_dir: str = "runs/demo"
    max_length: int = 256
    window_size: int | None = 100

    def _validate(self) -> None:
        check(self.n_pool is None or 0 < self.n_pool <= 3000, "--n-pool must be in 1..3000")
        check(self.n_windows >= 2 and self.window_size is not None, "--n-windows must be >= 2, with a --window-size")
        check(self.n_windows * self.window_size <= (self.n_pool or 3000),
              "--n-windows x --window-size must not exceed --n-pool")
        check(self.experiment_methods[:1] == ("sqsd",), "--experiment-methods must start with sqsd (the reference)")
        check(0 < self.ends_fraction <= 0.5 and round(self.ends_fraction * (self.n_pool or 3000)) > 0,
              "--ends-fraction must be in (0, 0.5] and give at least one sample")


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
class ReportConfig(ReportArgs):
    """`sqsd report RUN_DIR`: one self-contained HTML page (RUN_DIR/report/index.html) of what the folder holds —
    scores, an experiment, drift, steering, evaluations, or the demo's runs — with figures, tables and a line on
    how to read each; `--format md` writes the tables as Markdown."""


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(DataArgs, ModelArgs, RenderArgs, ScoringArgs, BatchArgs, SeedArgs, OutputDirArgs, OverwriteArgs):
    """`sqsd score`: per-sample SQSD risk = projection of the update a sample induces on the danger direction
    minus that on the safety direction. Writes scores.parquet (or .jsonl) with index, id, danger, safety, risk,
    risk_z, n_response_tokens, loss, status into OUTPUT_DIR (with chunks/ and run.json); resumable (chunk by
    chunk) and shardable with torchrun. Batches are length-bucketed within a chunk."""

    method: tuple[str, ...] = arg(("sqsd",), help=f"scoring method(s), higher = riskier: {', '.join(METHODS)} "
                                                  "(README, Scoring); `score` holds the first, and with several "
                                                  "each also gets a column named after it")
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


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig(ModelArgs, RenderArgs, ScoringArgs, MethodArgs, LoraArgs, OptimArgs, EvalArgs,
                       PoolSampleArgs, WindowsArgs, OutputDirArgs, OverwriteArgs):
    """`sqsd experiment`: does a ranking predict safety loss? Rank the pool with each method, fine-tune the model
    on subsets cut from each ranking (a cell per method x subset x seed), evaluate every fine-tune and the base
    model, and write results.json (ASR with 95% CIs, gaps, paired comparisons, detection metrics).

    The flags are those of the stages it runs, each meaning what it means there: scoring (`sqsd score`, every
    method in one pass), the fine-tuning recipe (`sqsd train`), the evaluation (`sqsd evaluate`). Where the
    stages' flags would collide: `pool` is the dataset ranked (the stages' data are files the experiment
    writes); the ranking methods are `methods`, while `method` stays the fine-tune's lora/full; `harmful` takes
    several sets (each evaluated on its own, pooled in the statistics); `seeds` are the fine-tuning seeds, one
    cell each, and `seed` seeds the rest (pool sample, random control, contamination mix, the `random` method,
    sampling, bootstrap); `batch_size` and `max_length` serve scoring, training and generation alike; `limit`
    caps the prompts of each evaluation set; `output_dir` and `overwrite` are the experiment's, and each stage
    gets its own run folder inside it.
    """

    config: str | None = arg(None, positional=True, help="YAML file whose keys set any option below (an option "
                                                         "given on the command line wins)")
    pool: str = arg(help="the dataset ranked and cut into subsets: a file or named dataset (e.g. dolly-sqsd)")
    methods: tuple[str, ...] = arg(("sqsd", "random"), help="ranking methods (`sqsd score --method`); the first "
                                                            "is the one every other is compared with")
    protocols: tuple[Literal["windows", "ends", "contamination"], ...] = arg(
        ("ends",), help="windows: --n-windows windows of --window-size at evenly spaced ranks; ends: the top and "
                        "bottom --window-size, and one random control shared by all methods; contamination: "
                        "how well each method finds injected harmful samples")
    seeds: tuple[int, ...] = arg((0,), help="fine-tuning seeds: one cell per method x subset x seed")
    contamination_source: str | None = arg(None, help="harmful prompts with compliant responses to inject; keep it "
                                                      "disjoint from anchors, directions and evaluation prompts")
    contamination_ratios: tuple[float, ...] = arg((0.01, 0.05, 0.1), help="injected fraction of each mixed pool")
    contamination_finetune: bool = arg(False, help="also fine-tune on each mixed pool, unfiltered and without "
                                                   "each method's top (as many as were injected), and report ASR")
    harmful: tuple[str, ...] = arg((EVAL_HARMFUL,), help="harmful prompt sets (`@eval` keeps the held-out split)")
    scores: str | None = arg(None, help="a `sqsd score` file of the whole pool with a column for every method "
                                        "(e.g. a distributed run): ranked instead of scoring the pool here")
    window_size: int | None = 100
    max_length: int = 512

    def _validate(self) -> None:
        check(len(set(self.protocols)) == len(self.protocols) >= 1, "--protocols needs one or more, each once")
        check(len(set(self.seeds)) == len(self.seeds) >= 1, "--seeds needs one or more distinct seeds")
        check(self.window_size is not None, "--window-size is needed (samples per subset)")
        check(len({Path(h).name for h in self.harmful}) == len(self.harmful) >= 1,
              "--harmful needs one or more sets with distinct names (each is evaluated into a folder so named)")
        check("contamination" not in self.protocols or self.contamination_source is not None,
              "protocol contamination needs --contamination-source (harmful prompts with compliant responses)")
        check(bool(self.contamination_ratios) and all(0 < r < 1 for r in self.contamination_ratios),
              "--contamination-ratios must be one or more fractions in (0, 1)")
        check(self.scores is None or self.n_pool is None, "--scores ranks the whole pool: leave --n-pool unset")
        self.score_config("pool", "scores")  # the scoring options are checked as `sqsd score` checks them

    def _fields(self, *groups: type) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for group in groups for f in dataclasses.fields(group)}

    def score_config(self, data: str, output_dir: str) -> ScoreConfig:
        """The `sqsd score` run that scores `data` with every method."""
        return ScoreConfig(**self._fields(ModelArgs, RenderArgs, ScoringArgs, BatchArgs, SeedArgs), data=data,
                           method=self.methods, output_dir=output_dir, overwrite=self.overwrite)

    def train_config(self, data: str, output_dir: str, seed: int) -> TrainConfig:
        """The `sqsd train` run of one cell."""
        return TrainConfig(**{**self._fields(ModelArgs, RenderArgs, MethodArgs, LoraArgs, OptimArgs), "seed": seed},
                           data=data, output_dir=output_dir, overwrite=self.overwrite)

    def evaluate_config(self, harmful: str, benign: str | None, output_dir: str,
                        adapter: str | None) -> EvaluateConfig:
        """The `sqsd evaluate` run of one harmful set (with the benign set, or '' for none) on a model."""
        return EvaluateConfig(**{**self._fields(ModelArgs, EvalArgs), "harmful": harmful, "benign": benign},
                              adapter=adapter, output_dir=output_dir, overwrite=self.overwrite)
