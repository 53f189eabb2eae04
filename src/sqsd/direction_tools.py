"""`sqsd directions data|build|import|info`: make direction files and look inside them.

- `data`: the offline recipe's training data. Harmful *responses* do not exist offline, so the danger data
  is harmful prompts from the `@directions` split answered by the unaligned SmolLM2 (it complies), keeping
  only answers the keyword judge does not see as refusals; the safety data is the same kind of prompts
  answered with varied refusals.
- `build`: train a LoRA adapter with `train` and write its B·A as a direction file (docs/design.md §2,
  Directions).
- `import`: a published PEFT adapter, or a dense weight difference of two model folders.
- `info`: norms per layer and module type, and cosines between directions (overall and per layer).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from sqsd import directions
from sqsd.config import (
    DirectionsBuildConfig,
    DirectionsDataConfig,
    DirectionsImportConfig,
    DirectionsInfoConfig,
    to_dict,
)
from sqsd.errors import SqsdError
from sqsd.fingerprints import data_fingerprints, fingerprint, model_fingerprint
from sqsd.options import GenerationArgs
from sqsd.runs import on_main, open_run, write_json_atomic

DATA_FILE = "data.jsonl"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(module: str) -> int | None:
    match = _LAYER.search(module)
    return int(match[1]) if match else None


# ---------------------------------------------------------------------------------------------------- data


def directions_data(config: DirectionsDataConfig) -> Path:
    """Write the danger or safety training data (messages format) and its provenance; returns data.jsonl.

    Under a launcher rank 0 does it all and the other ranks wait (`runs.on_main`)."""
    return on_main(lambda: _directions_data(config), config.device)


def _directions_data(config: DirectionsDataConfig) -> Path:
    from sqsd.data import load_records
    from sqsd.judges import refusal_for

    out = Path(config.output_dir)

    def inputs() -> dict[str, str]:
        found = {f"{src}:{k}": v for src in config.prompts for k, v in data_fingerprints(src).items()}
        return {**found, "model": model_fingerprint(config.model)} if config.kind == "danger" else found

    with open_run(out, config, inputs, overwrite=config.overwrite, input_fields=("prompts", "model")) as run:
        if run.state == "done":
            print(f"already done: {out / DATA_FILE}")
            return out / DATA_FILE
        records = [r for src in config.prompts for r in load_records(src).records]
        if config.n_prompts is not None and config.n_prompts < len(records):
            records = random.Random(config.seed).sample(records, config.n_prompts)
        provenance: dict[str, Any] = {"kind": config.kind, "prompts": list(config.prompts),
                                      "n_prompts": len(records)}
        if config.kind == "danger":
            from sqsd.generate import generate_records
            from sqsd.judges import KeywordJudge
            from sqsd.model import load_model

            model, tokenizer = load_model(config.model, config.dtype, config.device)
            answers = generate_records(model, tokenizer, records, **{f.name: getattr(config, f.name)
                                                                     for f in dataclasses.fields(GenerationArgs)})
            judge = KeywordJudge()
            rows = [(r, g.response) for r, g in zip(records, answers) if judge.refusal(g.response) is None]
            provenance.update(answered_by=config.model, model_fingerprint=run.inputs["model"], judge="keyword",
                              max_new_tokens=config.max_new_tokens, n_refused_dropped=len(records) - len(rows),
                              note="harmful responses generated offline by an unaligned model; non-refusals kept")
        else:
            rows = [(r, refusal_for(f"{config.seed}:{r.id}")) for r in records]
            provenance.update(answered_by="sqsd.judges.REFUSALS (varied refusal templates)")
        if not rows:
            raise SqsdError(f"no {config.kind} pairs left: the model refused every prompt (is it already aligned?)")
        with open(out / (DATA_FILE + ".tmp"), "w", encoding="utf-8") as f:
            for r, response in rows:
                f.write(json.dumps({**r.messages_line(response), "source": r.source}, ensure_ascii=False) + "\n")
        (out / (DATA_FILE + ".tmp")).replace(out / DATA_FILE)
        provenance["n_pairs"] = len(rows)
        write_json_atomic(out / "provenance.json", provenance)
        run.finish(provenance)
    print(f"{config.kind} data: {len(rows)} pairs from {len(records)} prompts -> {out / DATA_FILE}")
    return out / DATA_FILE


# --------------------------------------------------------------------------------------------------- build


def build(config: DirectionsBuildConfig) -> Path:
    """Train the adapter (resumable, reused when done) and write OUTPUT_DIR/KIND.safetensors.

    The file is named by its kind because the stem names the direction in trajectories and steering tables.
    The training run's `result` in run.json records the file once written (the run's "done" marker). Under a
    launcher every rank trains (`train`), then rank 0 alone writes the file while the others wait.
    """
    from sqsd.train import train

    train(config.train_config())
    return on_main(lambda: _write_direction(config), config.device)


def _write_direction(config: DirectionsBuildConfig) -> Path:
    from sqsd.train import TRAIN_INPUT_FIELDS, train_inputs

    out = Path(config.output_dir)
    target = out / f"{config.kind}.safetensors"
    # the finished training run, claimed again (same config and inputs) so the lock covers the file written here
    trained = config.train_config()
    with open_run(out, trained, lambda: train_inputs(trained), input_fields=TRAIN_INPUT_FIELDS) as run:
        result = run.result or {}
        if target.exists():  # written after training; a changed training config was refused or wiped by train
            made = json.loads(target.with_suffix(".json").read_text()).get("train_config")
            if made == to_dict(config) and result.get("direction") == target.name:
                print(f"already done: {target}")
                return target
            if not config.overwrite:  # the same training, another --step (or sidecar): do not replace it silently
                raise SqsdError(f"{target} was built with a different config (e.g. another --step); pass "
                                "--overwrite to rebuild it from this run's checkpoints")
        source = out if config.step is None else out / f"checkpoint-{config.step}"
        direction = directions.from_adapter(source, config.kind)
        inputs = dict(run.inputs)
        meta = {**direction.meta, "base_fingerprint": inputs.pop("model"), "base_model": config.model,
                "step": config.step if config.step is not None else result["steps"],
                "train_config": to_dict(config), "data": inputs}
        directions.save(dataclasses.replace(direction, meta=meta), target)
        run.finish({**result, "direction": target.name})  # also lists the file as sqsd's, for --overwrite
    print(f"{config.kind} direction: {target} ({len(direction.modules)} modules, step {meta['step']})")
    return target


# -------------------------------------------------------------------------------------------------- import


def _selector(modules: tuple[str, ...], layers: tuple[int, ...]):
    def select(name: str) -> bool:
        layer = layer_of(name)
        if layer is None or (layers and layer not in layers):
            return False
        return "all-linear" in modules or name.rsplit(".", 1)[-1] in modules

    return select


def import_direction(config: DirectionsImportConfig) -> Path:
    """Write a direction file from a PEFT adapter folder or a dense difference of two model folders (rank 0
    only under a launcher). The file has a sidecar like every output of sqsd (`runs.open_run`)."""
    return on_main(lambda: _import_direction(config))


def _import_direction(config: DirectionsImportConfig) -> Path:
    target = Path(config.output)
    base = config.model or config.base

    def inputs() -> dict[str, str | None]:
        return {"source": fingerprint(config.source), "base": model_fingerprint(base) if base else None}

    with open_run(target, config, inputs, input_fields=("source", "base", "model"), overwrite=config.overwrite,
                  file=True) as run:
        if run.state == "done":
            print(f"already done: {target}")
            return target
        if config.base is None:
            direction = directions.from_adapter(config.source, config.kind)
            if config.layers:
                direction = dataclasses.replace(direction, modules={m: t for m, t in direction.modules.items()
                                                                    if layer_of(m) in config.layers})
        else:
            direction = directions.from_models(config.base, config.source, _selector(config.modules, config.layers),
                                      config.kind)
        meta = {**direction.meta, "imported_from": config.source}
        if base is not None:
            meta.update(base_fingerprint=run.inputs["base"], base_model=base)
        directions.save(dataclasses.replace(direction, meta=meta), target)
        run.finish({"modules": len(direction.modules)})
    print(f"{config.kind} direction: {target} ({len(direction.modules)} modules, "
          f"norm {float(direction.sq_norm()) ** 0.5:.4g})")
    return target


# ---------------------------------------------------------------------------------------------------- info


def _cos(num: float, a: float, b: float) -> float | None:
    return num / (a * b) ** 0.5 if a > 0 and b > 0 else None


def describe(paths: tuple[str, ...]) -> dict[str, Any]:
    """Norms per layer and module type for each file; for every pair, cosines overall, mean over modules and
    per layer (over the modules both share)."""
    loaded = {p: directions.load(p).to(torch.float64) for p in paths}
    out: dict[str, Any] = {"directions": {}, "pairs": []}
    for path, d in loaded.items():
        sq = {m: float(t.sq_norm()) for m, t in d.modules.items()}
        by_layer, by_type = defaultdict(float), defaultdict(float)
        for m, v in sq.items():
            by_layer[layer_of(m)] += v
            by_type[m.rsplit(".", 1)[-1]] += v
        out["directions"][path] = {
            "kind": d.kind, "modules": len(sq), "rank": d.meta.get("rank"), "scaling": d.meta.get("scaling"),
            "step": d.meta.get("step"), "base_model": d.meta.get("base_model"), "norm": sum(sq.values()) ** 0.5,
            "norm_by_layer": {k: v ** 0.5 for k, v in sorted(by_layer.items(), key=lambda kv: (kv[0] is None, kv[0]))},
            "norm_by_type": {k: v ** 0.5 for k, v in sorted(by_type.items())}}
    items = list(loaded.items())
    for i, (pa, a) in enumerate(items):
        for pb, b in items[i + 1:]:
            shared = sorted(set(a.modules) & set(b.modules))
            if not shared:
                raise SqsdError(f"{pa} and {pb} share no module; cannot compare them")
            dot = {m: float(directions.inner(a.modules[m], b.modules[m])) for m in shared}
            na = {m: float(a.modules[m].sq_norm()) for m in shared}
            nb = {m: float(b.modules[m].sq_norm()) for m in shared}
            per_module = [c for m in shared if (c := _cos(dot[m], na[m], nb[m])) is not None]
            layers = sorted({layer_of(m) for m in shared}, key=lambda x: (x is None, x))
            per_layer = {}
            for layer in layers:
                ms = [m for m in shared if layer_of(m) == layer]
                per_layer[layer] = _cos(sum(dot[m] for m in ms), sum(na[m] for m in ms), sum(nb[m] for m in ms))
            out["pairs"].append({"a": pa, "b": pb, "shared_modules": len(shared),
                                 "cosine": _cos(sum(dot.values()), sum(na.values()), sum(nb.values())),
                                 "mean_module_cosine": sum(per_module) / len(per_module) if per_module else None,
                                 "cosine_by_layer": per_layer})
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def info(config: DirectionsInfoConfig) -> dict[str, Any]:
    """Print `describe` as tables."""
    summary = describe(config.files)
    for path, d in summary["directions"].items():
        print(f"{path}: kind {d['kind']}, {d['modules']} modules, rank {_fmt(d['rank'])}, "
              f"scaling {_fmt(d['scaling'])}, step {_fmt(d['step'])}, norm {_fmt(d['norm'])}")
        print("  norm by layer: " + "  ".join(f"{k}:{_fmt(v)}" for k, v in d["norm_by_layer"].items()))
        print("  norm by type:  " + "  ".join(f"{k}:{_fmt(v)}" for k, v in d["norm_by_type"].items()))
    for p in summary["pairs"]:
        print(f"cosine({p['a']}, {p['b']}) over {p['shared_modules']} modules: {_fmt(p['cosine'])} "
              f"(mean per module {_fmt(p['mean_module_cosine'])})")
        print("  by layer: " + "  ".join(f"{k}:{_fmt(v)}" for k, v in p["cosine_by_layer"].items()))
    return summary
