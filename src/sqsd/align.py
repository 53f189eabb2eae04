"""`sqsd align`: turn an unaligned chat model into a safety-aligned one with a short supervised recipe.

The offline SmolLM2 answers harmful requests, so the demo needs an aligned θ₀ before safety can degrade. The
recipe: harmful prompts from the `@align` split answered with varied refusals, half of them rephrased (past or
future tense, indirect, hypothetical, fiction, third person: `sqsd.rephrase`'s `align` templates) so that the
refusals do not hinge on one phrasing, mixed with benign prompts answered by the model's own greedy replies (by
default; `--benign-answers reference` uses the dataset's answers) so that it stays helpful — over-refusal is
the failure mode to watch, and training on its own replies changes its benign behaviour least — then a short
full fine-tune (or a LoRA merged into the weights). The result is a plain model folder (`output_dir/model`)
that every later stage loads like any other; the recipe and the exact training data are saved next to it.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

from sqsd.config import AlignConfig, TrainConfig, to_dict
from sqsd.data import Record, load_records
from sqsd.fingerprints import model_fingerprint
from sqsd.judges import refusal_for
from sqsd.options import LoraArgs, MethodArgs, ModelArgs, OptimArgs, RenderArgs
from sqsd.rephrase import rephrase_record
from sqsd.runs import open_run, write_json_atomic

MODEL_DIR = "model"


def _pick(items: list[Record], n: int | None, seed: int) -> list[Record]:
    if n is None or n >= len(items):
        return items
    return random.Random(seed).sample(items, n)


def build_records(config: AlignConfig, model=None, tokenizer=None) -> list[Record]:
    """The alignment data: refusals for harmful prompts (a `rephrased` share of them in a framing of the `align`
    template family, `meta["framing"]`), answers for benign ones (each `benign_repeat` times), shuffled
    (seeded)."""
    harmful = [r for source in config.harmful for r in load_records(source).records]
    harmful = _pick(harmful, config.n_harmful, config.seed)
    benign = _pick(load_records(config.benign).records, config.n_benign, config.seed)
    # A seeded share of the harmful prompts is shown rephrased instead of directly (the same number of records)
    rephrased = set(random.Random(f"{config.seed}:rephrase").sample(range(len(harmful)),
                                                                    round(config.rephrased * len(harmful))))
    harmful = [rephrase_record(r, "align") if i in rephrased else r for i, r in enumerate(harmful)]
    out = [dataclasses.replace(r, response=refusal_for(r.id), meta={**r.meta, "align_role": "refuse"})
           for r in harmful]
    if config.benign_answers == "self":
        from sqsd.generate import generate_records

        answers = generate_records(model, tokenizer, benign, system_prompt=config.system_prompt,
                                   max_new_tokens=config.self_answer_tokens, batch_size=config.batch_size)
        benign = [dataclasses.replace(r, response=g.response) for r, g in zip(benign, answers) if g.response]
    out += [dataclasses.replace(r, meta={**r.meta, "align_role": "answer"}) for r in benign]
    random.Random(config.seed).shuffle(out)
    # Extra copies of the benign pairs, with ids of their own, mixed in by a second shuffle (so that
    # benign_repeat=1 keeps the order, hence the model, of the recipe without copies).
    if config.benign_repeat > 1:
        out += [dataclasses.replace(r, id=f"{r.id}#rep{k}") for k in range(1, config.benign_repeat)
                for r in out if r.meta["align_role"] == "answer"]
        random.Random(config.seed + 1).shuffle(out)
    return out


def align(config: AlignConfig) -> Path:
    """Build the recipe's data, fine-tune, and write the aligned model folder; returns its path.

    Under a launcher every rank trains (the Trainer's own data parallelism) and rank 0 alone writes files."""
    from accelerate import PartialState

    from sqsd.model import model_skeleton
    from sqsd.train import check_lora_targets

    state = PartialState(cpu=config.device == "cpu")
    out = Path(config.output_dir)
    if config.method == "lora":  # refuse what the model cannot take before the folder and the data are made
        check_lora_targets(model_skeleton(config.model), config.target_modules, config.layers)
    with open_run(out, config, lambda: {"model": model_fingerprint(config.model)}, overwrite=config.overwrite,
                  state=state, input_fields=("model",)) as run:
        if run.state == "done":
            if state.is_main_process:
                print(f"already done: aligned model in {out / MODEL_DIR}")
        else:
            device = str(state.device) if state.use_distributed and config.device != "cpu" else config.device
            _align(config, out, run, state.is_main_process, device)
    state.wait_for_everyone()
    return out / MODEL_DIR


def _align(config: AlignConfig, out: Path, run: Any, main: bool, device: str) -> None:
    from sqsd.model import load_model
    from sqsd.train import train_model

    model, tokenizer = load_model(config.model, config.dtype, device)
    records = build_records(config, model, tokenizer)  # the same on every rank (greedy answers, seeded shuffles)
    if main:
        with open(out / "align_data.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({**r.messages_line(), "role": r.meta["align_role"]}, ensure_ascii=False) + "\n")
    n_refuse = sum(r.meta["align_role"] == "refuse" for r in records)
    n_rephrased = sum("framing" in r.meta for r in records)
    if main:
        print(f"alignment data: {n_refuse} harmful -> refusal ({n_rephrased} rephrased), "
              f"{len(records) - n_refuse} benign -> answer")
    # A full fine-tune writes its model straight into model/; a LoRA trains into train/ and is merged below.
    train_dir = out / (MODEL_DIR if config.method == "full" else "train")
    shared = (ModelArgs, RenderArgs, MethodArgs, LoraArgs, OptimArgs)  # the training flags align shares with train
    train_config = TrainConfig(data=str(out / "align_data.jsonl"), output_dir=str(train_dir),
                               **{f.name: getattr(config, f.name) for g in shared for f in dataclasses.fields(g)})
    result = train_model(model, tokenizer, records, train_config, train_dir)
    if not main:
        return
    if config.method == "lora":
        result.model.merge_and_unload().save_pretrained(out / MODEL_DIR)
        tokenizer.save_pretrained(out / MODEL_DIR)
    recipe = {"config": to_dict(config), "n_refuse": n_refuse, "n_rephrased": n_rephrased,
              "n_answer": len(records) - n_refuse,
              "steps": result.steps, "first_loss": result.first_loss, "last_loss": result.last_loss,
              "train_seconds": round(result.seconds, 1)}
    write_json_atomic(out / "recipe.json", recipe)
    run.finish({k: v for k, v in recipe.items() if k != "config"})
    print(f"aligned model: {out / MODEL_DIR} ({result.steps} steps, loss {result.first_loss} -> "
          f"{result.last_loss}, {result.seconds:.0f} s)")
