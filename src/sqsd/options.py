"""Argument groups: the flags shared by several commands, each declared once, and the base `Config`.

`config.py` composes one config per command from these groups. A flag is declared (type and help, with `arg`)
in exactly one class; a command that needs another default re-sets only the default (a plain
`name: type = value`) and keeps the group's type and help (the CLI looks them up through the class hierarchy).
Validation lives in each class's `_validate`, which `Config.__post_init__` runs for every class of a config,
base groups first, so a command can neither skip nor forget the checks of the groups it is made of.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from sqsd.errors import SqsdError

Format = Literal["auto", "alpaca", "dolly", "messages", "prompt-completion", "beavertails", "pku-saferlhf",
                 "prompts"]
DATA_FORMATS: tuple[str, ...] = typing.get_args(Format)
Metric = Literal["cosine-sum", "projection", "cosine"]
METRICS: tuple[str, ...] = typing.get_args(Metric)
# `sqsd score --method`: SQSD and the baselines of `sqsd.baselines` and `sqsd.representations`.
METHODS: tuple[str, ...] = ("sqsd", "random", "length", "loss", "grad-norm", "self-inf-n", "gradsim",
                            "safety-influence", "repsim", "larf", "datashield")
Kind = Literal["danger", "safety"]

# The evaluation every measured figure of the README uses (keyword judge, greedy): `evaluate`, `steer` and
# `train --track-eval-*` start from these.
EVAL_HARMFUL = "harmbench@eval"
EVAL_MAX_NEW_TOKENS = 48


def arg(default: Any = dataclasses.MISSING, help: str = "", positional: bool = False, **kw: Any) -> Any:
    """A dataclass field with the CLI help text (and positional-ness) stored in its metadata."""
    meta = {"help": help, "positional": positional}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def check(ok: bool, message: str) -> None:
    """Raise the user-facing error `message` unless `ok`."""
    if not ok:
        raise SqsdError(message)


@dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every group and command: construction runs the `_validate` of each class in the config's
    hierarchy (base groups first), so a command composed of groups validates every group."""

    def __post_init__(self) -> None:
        for cls in reversed(type(self).__mro__):
            if "_validate" in vars(cls):
                vars(cls)["_validate"](self)


# ------------------------------------------------------------------------------------------------- groups


@dataclass(frozen=True, kw_only=True)
class LimitArgs(Config):
    """How many records (or prompts) to use."""

    limit: int | None = arg(None, help="use only the first N records (of each prompt set)")

    def _validate(self) -> None:
        check(self.limit is None or self.limit > 0, "--limit must be positive")


@dataclass(frozen=True, kw_only=True)
class DataArgs(LimitArgs):
    """Where the records come from and how they are read."""

    data: str = arg(help="a file (JSONL, JSON, CSV, Parquet, TXT), a named dataset (`sqsd assets list`; "
                         "`dolly-sqsd:S1` picks a window) or a Hugging Face dataset id", positional=True)
    format: Format = arg("auto", help="record format; `auto` detects it from the fields")
    split: str = arg("train", help="split of a Hugging Face dataset id")
    on_bad_record: Literal["error", "skip"] = arg("error", help="stop at the first bad record, or skip and "
                                                               "list the bad ones")


@dataclass(frozen=True, kw_only=True)
class ModelArgs(Config):
    """Which model and how to place it."""

    model: str = arg("smollm2", help="a local HF folder, a hub id, a .gguf file, or `smollm2` (packaged default)")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = arg("float32", help="weights dtype")
    device: str = arg("cpu", help="torch device, e.g. cpu, cuda, cuda:1")

    def _validate(self) -> None:
        import torch  # here, not at the top: `sqsd --help` stays fast

        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise SqsdError(f"--device {self.device!r} is not a device name (e.g. cpu, cuda, cuda:1)") from None
        if device.type == "cpu":
            return
        backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
        count = backend.device_count() if hasattr(backend, "device_count") else 0
        check((device.index or 0) < count, f"--device {self.device}: not available on this machine "
                                            f"({count} {device.type} device(s) visible)")


@dataclass(frozen=True, kw_only=True)
class SystemPromptArgs(Config):
    system_prompt: str | None = arg(None, help="system message; unset = none given (the chat template's own "
                                               "default applies if it has one); '' = an empty system turn")


@dataclass(frozen=True, kw_only=True)
class MaxLengthArgs(Config):
    max_length: int = arg(1024, help="maximum tokens per sample; prompt tokens are dropped from the left first")

    def _validate(self) -> None:
        check(self.max_length >= 2, "--max-length must be at least 2")


@dataclass(frozen=True, kw_only=True)
class RenderArgs(SystemPromptArgs, MaxLengthArgs):
    """How a record becomes tokens."""


@dataclass(frozen=True, kw_only=True)
class SeedArgs(Config):
    seed: int = arg(0, help="random seed (of sampling, shuffling, initialisation and bootstrap, as the command "
                            "uses them)")


@dataclass(frozen=True, kw_only=True)
class BatchArgs(Config):
    batch_size: int = arg(8, help="samples per batch (per process)")

    def _validate(self) -> None:
        check(self.batch_size > 0, "--batch-size must be positive")


@dataclass(frozen=True, kw_only=True)
class AnchorArgs(Config):
    """The anchor sets of the anchored baselines (`sqsd.baselines`, `sqsd.representations`: any data the data
    layer reads) and the layers of the hidden-state ones."""

    harmful_anchors: str | None = arg(None, help="harmful prompts with compliant responses (e.g. `sqsd directions "
                                                 "data --kind danger`); needed by --method gradsim, repsim, larf "
                                                 "and datashield")
    safe_anchors: str | None = arg(None, help="harmful prompts with refusals (e.g. `sqsd directions data --kind "
                                              "safety`); needed by --method gradsim, safety-influence, repsim, "
                                              "larf and datashield")
    layer: tuple[str, ...] = arg(("auto",), help="decoder layer(s) of --method larf (one) and datashield (summed): "
                                                 "`auto` = the layer scan (the block whose damping most raises the "
                                                 "refusal loss on the safe anchors), or block indices from 0")
    top_k: int = arg(10, help="--method larf: average the cosines with this many most similar anchors of each set")

    def _validate(self) -> None:
        check(self.layer == ("auto",) or (bool(self.layer) and all(x.isdigit() for x in self.layer)),
              f"--layer takes `auto` or block indices from 0, got {' '.join(self.layer)!r}")
        check(self.top_k >= 1, "--top-k must be >= 1")


@dataclass(frozen=True, kw_only=True)
class OutputDirArgs(Config):
    output_dir: str = arg(help="folder for the command's outputs (listed above) and its run record; a rerun "
                               "reuses or resumes what is there")


@dataclass(frozen=True, kw_only=True)
class OverwriteArgs(Config):
    overwrite: bool = arg(False, help="replace outputs made with a different config or inputs")


@dataclass(frozen=True, kw_only=True)
class KindArgs(Config):
    kind: Kind = arg(help="which direction: danger or safety")


@dataclass(frozen=True, kw_only=True)
class LayersArgs(Config):
    layers: tuple[int, ...] = arg((), help="only these layer indices (default: all)")

    def _validate(self) -> None:
        check(all(layer >= 0 for layer in self.layers), "--layers indices must be >= 0")


@dataclass(frozen=True, kw_only=True)
class MethodArgs(Config):
    method: Literal["lora", "full"] = arg("lora", help="train a LoRA adapter or all weights")


@dataclass(frozen=True, kw_only=True)
class LoraArgs(LayersArgs):
    """The LoRA adapter (with `--method lora`)."""

    lora_r: int = arg(8, help="LoRA rank")
    lora_alpha: float = arg(16.0, help="LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = arg(0.0, help="LoRA dropout")
    target_modules: tuple[str, ...] = arg(("all-linear",), help="module names to adapt; `all-linear` = every "
                                                               "linear layer except the LM head")

    def _validate(self) -> None:
        check(self.lora_r > 0, "--lora-r must be positive")
        check(0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)")
        check(len(self.target_modules) >= 1, "--target-modules needs at least one module name")
        check("all-linear" not in self.target_modules or len(self.target_modules) == 1,
              "--target-modules all-linear stands alone (it already adapts every linear layer)")


@dataclass(frozen=True, kw_only=True)
class OptimArgs(BatchArgs, SeedArgs):
    """The optimisation (HF Trainer, AdamW)."""

    learning_rate: float = arg(2e-4, help="peak learning rate")
    epochs: float = arg(3.0, help="training epochs (ignored when --max-steps is set)")
    max_steps: int | None = arg(None, help="stop after this many optimizer steps")
    grad_accum: int = arg(1, help="gradient accumulation steps")
    group_by_length: bool = arg(False, help="batch samples of similar length together: less padding, faster, "
                                            "but batches are less random")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = arg("cosine",
                                                                                   help="learning-rate schedule")
    warmup_ratio: float = arg(0.1, help="fraction of steps for linear warm-up")
    weight_decay: float = arg(0.0, help="AdamW weight decay")
    logging_steps: int = arg(1, help="log the loss every N steps")

    def _validate(self) -> None:
        check(self.learning_rate > 0, "--learning-rate must be positive")
        check(self.epochs > 0, "--epochs must be positive")
        check(self.max_steps is None or self.max_steps > 0, "--max-steps must be positive")
        check(self.grad_accum > 0, "--grad-accum must be positive")
        check(0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)")
        check(self.weight_decay >= 0, "--weight-decay must be >= 0")
        check(self.logging_steps > 0, "--logging-steps must be positive")


@dataclass(frozen=True, kw_only=True)
class CheckpointArgs(Config):
    save_every: int | None = arg(None, help="save a checkpoint every N steps")
    save_at: tuple[int, ...] = arg((), help="save checkpoints at exactly these steps (e.g. 50 100 400)")
    resume: bool = arg(False, help="continue from the last checkpoint in output_dir (an identical rerun of an "
                                   "unfinished run does so by itself; with this flag, no checkpoint is an error)")

    def _validate(self) -> None:
        check(self.save_every is None or self.save_every > 0, "--save-every must be positive")
        check(all(s > 0 for s in self.save_at), "--save-at steps must be positive")


@dataclass(frozen=True, kw_only=True)
class FineTuneArgs(DataArgs, ModelArgs, RenderArgs, LoraArgs, OptimArgs, CheckpointArgs, OutputDirArgs,
                   OverwriteArgs):
    """Everything a supervised fine-tune needs (`train` and `directions build`)."""


@dataclass(frozen=True, kw_only=True)
class TrackArgs(Config):
    """Drift tracking during training (`sqsd.drift`)."""

    track: tuple[str, ...] = arg((), help="direction files to track: at every logging step, project the cumulative "
                                          "weight change on each into trajectory.jsonl (`sqsd.drift`)")
    track_eval_steps: tuple[int, ...] = arg((), help="with --track, also measure ASR (greedy, keyword judge) at "
                                                     "these steps (0 = before training)")
    track_eval_harmful: str = arg(EVAL_HARMFUL, help="harmful prompts for --track-eval-steps")
    track_eval_limit: int = arg(32, help="use the first N prompts of --track-eval-harmful")
    track_eval_max_new_tokens: int = arg(EVAL_MAX_NEW_TOKENS, help="new tokens per response for --track-eval-steps")

    def _validate(self) -> None:
        check(not self.track_eval_steps or bool(self.track), "--track-eval-steps needs --track (direction files)")
        check(all(s >= 0 for s in self.track_eval_steps), "--track-eval-steps must be >= 0")
        check(self.track_eval_limit > 0 and self.track_eval_max_new_tokens > 0,
               "--track-eval-limit and --track-eval-max-new-tokens must be positive")


@dataclass(frozen=True, kw_only=True)
class NewTokensArgs(Config):
    max_new_tokens: int = arg(EVAL_MAX_NEW_TOKENS, help="new tokens per response (the paper evaluates with 512; "
                                                        "the README's figures use 48)")

    def _validate(self) -> None:
        check(self.max_new_tokens > 0, "--max-new-tokens must be positive")


@dataclass(frozen=True, kw_only=True)
class GenerationArgs(SystemPromptArgs, NewTokensArgs, BatchArgs, SeedArgs):
    """How responses are generated (`generate`, `evaluate`, `steer`, danger data)."""

    do_sample: bool = arg(False, help="sample instead of greedy decoding")
    temperature: float = arg(1.0, help="sampling temperature")
    top_p: float = arg(1.0, help="nucleus sampling threshold")
    n: int = arg(1, help="samples per prompt (requires --do-sample when > 1)")
    max_prompt_length: int = arg(1024, help="prompt tokens kept (dropped from the left)")

    def _validate(self) -> None:
        check(self.n >= 1, "--n must be at least 1")
        check(self.n == 1 or self.do_sample, "--n > 1 needs --do-sample (greedy gives n identical answers)")
        check(self.temperature > 0 and 0 < self.top_p <= 1, "--temperature > 0 and 0 < --top-p <= 1")
        check(self.max_prompt_length > 0, "--max-prompt-length must be positive")


@dataclass(frozen=True, kw_only=True)
class AdapterArgs(Config):
    adapter: str | None = arg(None, help="a PEFT adapter folder applied on top of the model")


@dataclass(frozen=True, kw_only=True)
class EvalArgs(GenerationArgs, LimitArgs):
    """What is evaluated and judged (`evaluate`, `steer`)."""

    harmful: str = arg(EVAL_HARMFUL, help="harmful prompts: a file, named benchmark or hub id (`@eval` keeps "
                                          "the held-out split)")
    benign: str | None = arg("alpaca-eval@eval", help="benign prompts for the over-refusal rate; '' to skip")
    judge: Literal["keyword", "llama-guard", "harmbench"] = arg("keyword", help="who decides unsafe")
    judge_model: str | None = arg(None, help="checkpoint of the llama-guard / harmbench judge (path or hub id)")
    judge_batch_size: int = arg(8, help="judge batch size")
    n_bootstrap: int = arg(1000, help="bootstrap resamples for the 95% confidence intervals")

    def _validate(self) -> None:
        check(self.judge == "keyword" or self.judge_model is not None,
               f"--judge {self.judge} needs --judge-model (a checkpoint folder or hub id)")
        check(self.judge_batch_size > 0, "--judge-batch-size must be positive")
        check(self.n_bootstrap >= 100, "--n-bootstrap must be at least 100")


@dataclass(frozen=True, kw_only=True)
class WindowSizeArgs(Config):
    """How many samples each window cut from a ranking holds."""

    window_size: int | None = arg(None, help="samples per window")

    def _validate(self) -> None:
        check(self.window_size is None or self.window_size > 0, "--window-size must be positive")


@dataclass(frozen=True, kw_only=True)
class WindowsArgs(WindowSizeArgs):
    """The paper's windows S1 (riskiest) .. Sk at evenly spaced ranks of a ranking (`demo`, `experiment`)."""

    n_windows: int = arg(5, help="windows S1..Sk cut from the ranking (S1 = riskiest)")

    def _validate(self) -> None:
        check(self.n_windows >= 2, "--n-windows must be at least 2")


@dataclass(frozen=True, kw_only=True)
class PoolSampleArgs(SeedArgs):
    """How much of the pool is ranked (`demo`, `experiment`)."""

    n_pool: int | None = arg(None, help="use a seeded sample (--seed) of this many pool samples; unset = all")

    def _validate(self) -> None:
        check(self.n_pool is None or self.n_pool > 0, "--n-pool must be positive")


@dataclass(frozen=True, kw_only=True)
class MetricArgs(Config):
    metric: Metric = arg("cosine-sum", help="cosine-sum (the paper's: one cosine per module, summed), projection "
                                            "(<update, d>/|d|) or cosine (of the whole vectors)")


@dataclass(frozen=True, kw_only=True)
class ReportArgs(Config):
    run_dir: str = arg(help="a run folder of any sqsd command (score, experiment, train --track, steer, evaluate) "
                            "or a folder holding several, like the demo's", positional=True)
    output: str | None = arg(None, help="the page to write (default: RUN_DIR/report/index.html, or index.md)")
    format: Literal["html", "md"] = arg("html", help="html: one self-contained page with figures; md: the same "
                                                     "tables as Markdown")


@dataclass(frozen=True, kw_only=True)
class ScoringArgs(MetricArgs, AnchorArgs):
    """What `sqsd score` scores with, whichever `--method`s: the SQSD terms (direction files, anchors, scalings),
    the anchor sets of the anchored baselines, and the chunking (`score`, `experiment`)."""

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

    def _validate(self) -> None:
        for term in ("danger", "safety"):
            check(getattr(self, term) or not getattr(self, f"{term}_anchor"),
                  f"--{term}-anchor is given but --{term} is not: which direction should be scored there?")
            scaling = getattr(self, f"{term}_scaling")
            check(scaling is None or 0 < scaling < float("inf"), f"--{term}-scaling must be a positive number")
        check(self.chunk_size > 0, "--chunk-size must be positive")
