"""Supervised fine-tuning (LoRA or full) with the response-only loss of docs/design.md §2, on the Hugging Face
Trainer.

`train(config)` is `sqsd train`: it reads the data and the model named in the config and manages the run folder.
`train_model(model, tokenizer, records, config, output_dir)` is the engine, for stages that already hold a model
(directions, anchors, alignment, validation fine-tunes); it returns the trained model in memory as well.

Output folder:
    adapter_model.safetensors + adapter_config.json   (LoRA) or the full model, plus the tokenizer
    run.json          config + input fingerprints + manifest (`runs.open_run`); its `result` marks a finished run
    train_log.jsonl   one line per logging step: step, epoch, loss, learning_rate, grad_norm
    skipped.jsonl     records that could not be trained on, with the reason
    checkpoint-N/     Trainer checkpoints (`save_every`, `save_at`), each enough to resume from
    merged/           base + adapter merged into a plain model folder (`merge`)

Rerunning an identical command into a finished folder prints "already done"; into an unfinished one it continues
from the last complete checkpoint (the CLI tells an interrupted user to do exactly that; a checkpoint cut short
by a kill is skipped for the one before it). A different config refuses unless `overwrite`.

Distributed training is the Trainer's own (accelerate): launch the same command under a launcher and every rank
trains on its shard of each global batch, which is `batch_size x world size x grad_accum` samples; rank 0 alone
writes files. The loss is the mean over all response tokens of the global batch (the Trainer gathers token
counts across ranks), so N ranks with batch B give the same updates as one process with batch N*B.
    CPU (how it is tested here):  torchrun --nproc_per_node 2 -m sqsd train DATA --output-dir OUT
    GPUs, one node:               torchrun --nproc_per_node 8 -m sqsd train DATA --device cuda --output-dir OUT
                                  accelerate launch --num_processes 8 -m sqsd train DATA --device cuda ...
    Multi-node: torchrun's --nnodes/--node-rank/--rdzv-endpoint (or accelerate's config) with the same command.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from sqsd.config import TrainConfig
from sqsd.data import Record
from sqsd.errors import SqsdError
from sqsd.fingerprints import data_fingerprints, model_fingerprint
from sqsd.options import LoraArgs
from sqsd.render import Collator, encode_records
from sqsd.runs import broadcast, last_good_checkpoint, open_run

LOG_FILE = "train_log.jsonl"
SKIPPED_FILE = "skipped.jsonl"
MERGED_DIR = "merged"
LOGGED = ("loss", "learning_rate", "grad_norm")
TRAIN_INPUT_FIELDS = ("data", "model")  # the config fields `train_inputs` fingerprints


@dataclass
class TrainResult:
    """What a training run produced. `model` is the PeftModel (LoRA), the full model, or, with `merge`, the
    merged plain model; `log` holds the rows of train_log.jsonl, steps before a resume included (main process
    only; empty on the other ranks)."""

    model: PreTrainedModel | PeftModel
    output_dir: Path
    steps: int
    seconds: float
    n_train: int
    n_skipped: int
    log: list[dict[str, float]]
    resumed_from: str | None

    @property
    def first_loss(self) -> float | None:
        return self.log[0]["loss"] if self.log else None

    @property
    def last_loss(self) -> float | None:
        return self.log[-1]["loss"] if self.log else None


class _LengthGrouped(LengthGroupedSampler):
    """The Trainer's length grouping (shuffle, then sort within mega-batches) with the shuffle fixed by seed and
    epoch, as accelerate's SeedableRandomSampler does for plain shuffling. The Trainer's own version draws from the
    global RNG, which a resumed run restores to its mid-epoch state, so the rest of that epoch came out in a
    different order (measured: adapters 4e-2 apart); with this, a resumed run replays the same batches."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class _Trainer(Trainer):
    """The HF Trainer with the reproducible length-grouped sampler above."""

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(dataset)
        return _LengthGrouped(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                              [len(sample["input_ids"]) for sample in dataset], self.args.data_seed)


class SaveAtSteps(TrainerCallback):
    """Checkpoints at exactly the given optimizer steps, on top of (or instead of) the periodic ones."""

    def __init__(self, steps: Sequence[int]):
        self.steps = set(steps)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in self.steps:
            control.should_save = True


class JsonlLog(TrainerCallback):
    """Appends one JSON line per logging step to `path` (main process only), closed after each line so a crash
    or a `tail -f` never sees half a line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return  # the end-of-training summary log has train_loss, not loss
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
               **{k: float(logs[k]) for k in LOGGED if k in logs}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def training_arguments(config: TrainConfig, output_dir: Path) -> TrainingArguments:
    """TrainingArguments from the config. Building them also sets up the distributed state under a launcher."""
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the total steps
        weight_decay=config.weight_decay,
        seed=config.seed,
        data_seed=config.seed,  # the shuffling order, identical on every rank and for every world size
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_every else "no",
        save_steps=config.save_every or 500,
        report_to=[],
        remove_unused_columns=False,  # our dataset has exactly the columns the collator needs
        disable_tqdm=False,
        use_cpu=config.device == "cpu",
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        ddp_find_unused_parameters=False,  # every trainable tensor is used each step; the search costs a pass
    )


def check_lora_targets(model: PreTrainedModel, target_modules: Sequence[str], layers: Sequence[int]) -> None:
    """Refuse `--target-modules` names and `--layers` indices the model does not have, naming the flag (peft's
    own errors name neither the flag nor what would be valid). A name matches a module as peft matches it: the
    full module name or its dotted suffix, on a module with a weight matrix."""
    weighted = [name for name, m in model.named_modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2]
    missing = [t for t in target_modules
               if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in weighted)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise SqsdError(f"--target-modules {' '.join(missing)}: no such module with a weight matrix in "
                        f"{type(model).__name__} (its linear modules: {', '.join(linear)})")
    n_layers = model.config.get_text_config().num_hidden_layers
    beyond = [str(layer) for layer in layers if layer >= n_layers]
    if beyond:
        raise SqsdError(f"--layers {' '.join(beyond)}: {type(model).__name__} has {n_layers} layers "
                        f"(0..{n_layers - 1})")


def lora_config(model: PreTrainedModel, config: LoraArgs, init_lora_weights: bool | str = True) -> LoraConfig:
    """The LoRA setup of the config, checked against the model. peft refuses `layers_to_transform` with the
    string "all-linear", so with `layers` the linear module names are listed here, the LM head left out as peft's
    all-linear does."""
    check_lora_targets(model, config.target_modules, config.layers)
    targets: str | list[str] = list(config.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
        if config.layers:
            head = model.get_output_embeddings()
            targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and m is not head})
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, layers_to_transform=list(config.layers) or None,
                      init_lora_weights=init_lora_weights, task_type="CAUSAL_LM")


def train_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record],
                config: TrainConfig, output_dir: str | Path, *, callbacks: Sequence[TrainerCallback] = (),
                init_lora_weights: bool | str = True) -> TrainResult:
    """Fine-tune `model` on `records` as `config` says and write adapter/model, tokenizer, logs into output_dir.

    Only the training fields of `config` are used (data and model fields are the caller's business). With
    `config.resume`, training continues from the last checkpoint-N in output_dir (error if there is none).
    `callbacks` are extra TrainerCallbacks (e.g. drift tracking). `init_lora_weights` goes to peft: False gives
    a random, non-zero B so that tests see non-trivial gradients for A.
    """
    output_dir = Path(output_dir)
    args = training_arguments(config, output_dir)
    main = args.process_index == 0
    kept, skipped = encode_records(records, tokenizer, config.system_prompt, config.max_length)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_skipped(output_dir / SKIPPED_FILE, records, skipped)
    if skipped:
        _print(main, f"skipped {len(skipped)} of {len(records)} record(s) (reasons in {output_dir / SKIPPED_FILE})")
    if not kept:
        raise SqsdError(f"none of the {len(records)} record(s) can be trained on; see {output_dir / SKIPPED_FILE}")
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for _, e in kept]  # a list is a map-style dataset

    resume_from = None
    if config.resume:
        resume_from, bad = last_good_checkpoint(output_dir)
        for name, problem in bad:
            _print(main, f"{output_dir / name} is incomplete ({problem}): skipped; it is written again when "
                         "training reaches that step")
        if resume_from is None:
            raise SqsdError(f"--resume: no checkpoint to continue from in {output_dir} (no complete checkpoint-N "
                              "folder)")
    if main:
        _trim_log(output_dir / LOG_FILE, _checkpoint_step(resume_from))

    set_seed(config.seed)  # the LoRA initialisation is part of what the seed reproduces
    if config.method == "lora":
        model = get_peft_model(model, lora_config(model, config, init_lora_weights))
    else:
        model.requires_grad_(True)
    log = JsonlLog(output_dir / LOG_FILE)
    trainer = _Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                       data_collator=Collator(pad_token_id=tokenizer.pad_token_id),
                       callbacks=[log, SaveAtSteps(config.save_at), *callbacks])
    if resume_from:
        _print(main, f"resuming from {resume_from}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    trainer.save_model(str(output_dir))  # adapter or full model + tokenizer, written by the main process only

    trained = trainer.model
    if config.merge and isinstance(trained, PeftModel) and main:
        trained = trained.merge_and_unload()
        trained.save_pretrained(output_dir / MERGED_DIR)
        tokenizer.save_pretrained(output_dir / MERGED_DIR)
    log_file = output_dir / LOG_FILE
    rows = [json.loads(line) for line in log_file.read_text().splitlines()] if main and log_file.exists() else []
    return TrainResult(model=trained, output_dir=output_dir, steps=trainer.state.global_step, seconds=seconds,
                       n_train=len(kept), n_skipped=len(skipped), log=rows, resumed_from=resume_from)


def train(config: TrainConfig) -> Path:
    """`sqsd train`: load data and model, train into `config.output_dir`, print a summary; return the folder.

    Under a distributed launcher, rank 0 checks and prepares the folder (`runs.open_run`) and tells the other
    ranks what to do, so that a refusal stops every rank instead of leaving the others waiting.
    """
    from sqsd.data import load_from_config
    from sqsd.model import model_skeleton

    start = time.perf_counter()
    state = PartialState(cpu=config.device == "cpu")
    output_dir = Path(config.output_dir)
    loaded = load_from_config(config)
    if config.method == "lora":  # refuse what the model cannot take before the run folder is made
        check_lora_targets(model_skeleton(config.model), config.target_modules, config.layers)
    with open_run(output_dir, config, lambda: train_inputs(config), overwrite=config.overwrite, state=state,
                  input_fields=TRAIN_INPUT_FIELDS) as run:
        decision: Any = None
        if state.is_main_process:
            try:
                decision = _decide(run.state, output_dir, config)
            except SqsdError as e:
                decision = e
        decision = broadcast(state, decision)
        if isinstance(decision, SqsdError):
            raise decision
        if decision == "done":
            if state.is_main_process:
                done = run.result or {}
                print(f"already done: {output_dir} holds a finished run of this config ({done.get('steps')} "
                      f"steps, loss {done.get('first_loss')} -> {done.get('last_loss')}); pass another "
                      "--output-dir to train again")
            state.wait_for_everyone()
            return output_dir
        _train(config, state, loaded, run, decision == "resume", start)
    state.wait_for_everyone()  # no rank leaves before rank 0 has written the folder
    return output_dir


def train_inputs(config: TrainConfig) -> dict[str, str]:
    """The fingerprints a training run records: the model and the data."""
    return {"model": model_fingerprint(config.model), **data_fingerprints(config.data)}


def _train(config: TrainConfig, state: PartialState, loaded: Any, run: Any, resume: bool, start: float) -> None:
    from sqsd.model import load_model

    output_dir = run.path
    if loaded.bad and state.is_main_process:
        print(f"{len(loaded.bad)} bad record(s) left out (--on-bad-record skip):")
        for bad in loaded.bad[:5]:
            print(f"  {bad.reason}")
        if len(loaded.bad) > 5:
            print(f"  ... and {len(loaded.bad) - 5} more (`sqsd data inspect` lists them all)")

    device = str(state.device) if state.use_distributed and config.device != "cpu" else config.device
    model, tokenizer = load_model(config.model, config.dtype, device)
    callbacks = []
    if config.track:  # drift tracking: trajectory.jsonl (sqsd.drift)
        from sqsd.drift import tracker_from_config

        # every rank checks the directions alike (rank 0's fingerprint), so a refusal stops them all
        callbacks.append(tracker_from_config(config, model, tokenizer, output_dir, main=state.is_main_process,
                                             base_fingerprint=run.inputs["model"]))
    result = train_model(model, tokenizer, loaded.records, dataclasses.replace(config, resume=resume),
                         output_dir, callbacks=callbacks)
    if state.is_main_process:
        if config.track:
            from sqsd.drift import TRAJECTORY_FILE, TRAJECTORY_PLOT
            from sqsd.figures import plot_trajectory

            plot_trajectory(output_dir / TRAJECTORY_FILE, output_dir / TRAJECTORY_PLOT)
            print(f"drift: {output_dir / TRAJECTORY_FILE}   plot: {output_dir / TRAJECTORY_PLOT}")
        summary = {"steps": result.steps, "first_loss": result.first_loss, "last_loss": result.last_loss,
                   "train_seconds": round(result.seconds, 1), "wall_seconds": round(time.perf_counter() - start, 1),
                   "train_records": result.n_train,
                   "skipped_records": result.n_skipped, "world_size": state.num_processes,
                   "global_batch": config.batch_size * config.grad_accum * state.num_processes}
        run.finish(summary)
        _print_summary(config, result, summary)


def _decide(found: str, output_dir: Path, config: TrainConfig) -> str:
    """What to do in the claimed folder: "done" (finished), "resume" (continue from a checkpoint) or "fresh"."""
    if found == "fresh":
        if config.resume:
            raise SqsdError(f"--resume: {output_dir} held no earlier run to continue")
        return "fresh"
    if found == "done":
        return "done"
    if last_good_checkpoint(output_dir)[0]:
        return "resume"
    if config.resume:
        raise SqsdError(f"--resume: the run in {output_dir} saved no complete checkpoint; rerun without --resume "
                        "to start it again")
    return "fresh"


def _write_skipped(path: Path, records: Sequence[Record], skipped: Sequence[tuple[int, str]]) -> None:
    with open(path, "w") as f:
        for i, reason in skipped:
            r = records[i]
            f.write(json.dumps({"index": i, "id": r.id, "source": r.source, "row": r.row, "reason": reason}) + "\n")


def _checkpoint_step(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0


def _trim_log(path: Path, keep_until: int) -> None:
    """Drop log lines after `keep_until` (steps a resumed run repeats), or all of them for a fresh start."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_until]
    path.write_text("".join(line + "\n" for line in kept))


def _print(main: bool, message: str) -> None:
    if main:
        print(message, flush=True)


def _print_summary(config: TrainConfig, result: TrainResult, summary: dict[str, Any]) -> None:
    out = result.output_dir
    first, last = result.first_loss, result.last_loss
    loss = f"loss {first:.4f} -> {last:.4f}" if first is not None and last is not None else "no loss logged"
    print(f"trained {config.method} on {summary['train_records']} record(s) "
          f"({summary['skipped_records']} skipped): {result.steps} step(s), global batch "
          f"{summary['global_batch']} ({summary['world_size']} process(es)), {loss}; training "
          f"{summary['train_seconds']:.1f} s, wall {summary['wall_seconds']:.1f} s")
    what = "adapter" if config.method == "lora" else "model"
    print(f"{what}: {out}   log: {out / LOG_FILE}   run: {out / 'run.json'}")
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: _checkpoint_step(str(p)))
    if checkpoints:
        print(f"checkpoints: {', '.join(p.name for p in checkpoints)}")
    if config.merge and config.method == "lora":
        print(f"merged model: {out / MERGED_DIR}")
    if summary["skipped_records"]:
        print(f"skipped records: {out / SKIPPED_FILE}")
