"""`sqsd experiment`: does a ranking of the pool predict how much safety a fine-tune on it loses?

For each method (`sqsd score --method`) the pool is ranked and subsets are cut from the ranking (protocol
`windows`: the paper's S1 (riskiest) .. Sk; `ends`: the top and the bottom n, plus one random n shared by all
methods); the model is fine-tuned on each subset with each seed (a cell) and evaluated. Protocol
`contamination` injects harmful samples into the pool and asks how well each method finds them, and
optionally fine-tunes on the mixed pool, unfiltered and without each method's top. The model itself is
evaluated once, as the reference line. The statistics are `sqsd.results`.

Every stage is the library call of its command with its own run folder inside RUN (--output-dir), so a killed
experiment resumes at the stage it was in (a cell's fine-tune restarts, its finished neighbours are reused), and
RUN's own run.json refuses a changed config unless --overwrite (which is passed on to every stage):
    pool.jsonl                  the pool (a seeded sample of --n-pool) as chat messages, with each record's id
    base/<set>/                 `sqsd evaluate` of the model itself, one folder per harmful set (its name)
    scores/                     `sqsd score` of the pool with every method (unless --scores gives that file)
    subsets/<protocol>-<method>/   `sqsd filter` of the method's ranking (windows S1..Sk; ends: S1, S2)
    finetunes/<key>/            one fine-tune per distinct (record ids, seed), shared by every cell that has
                                them: data.jsonl (records by id), adapter/ (`sqsd train`), eval/<set>/
                                (`sqsd evaluate`); key = sha256 of the sorted ids and the seed
    cells/<protocol>/<method>/<subset>/seed<s>/   subset.jsonl (in rank order), finetune (a link to its
                                finetunes/<key>) and summary.json (ASR and over-refusal of that fine-tune)
    contamination/<ratio>/      mixed.jsonl (pool + injected, shuffled), injected.json (their ids), scores/,
                                subsets/<method>/ (`sqsd filter --drop-top` as many as were injected)
    results.json                the statistics, also printed as a table
It runs as one process (not under a launcher); each stage uses the device of --device.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqsd.config import ExperimentConfig, FilterConfig
from sqsd.data import load_records
from sqsd.errors import SqsdError
from sqsd.evaluate import SUMMARY_FILE, evaluate
from sqsd.filter import filter_scores
from sqsd.fingerprints import data_fingerprints, fingerprint, model_fingerprint
from sqsd.runs import open_run, write_json_atomic
from sqsd.score import method_column, score
from sqsd.train import train

RESULTS_FILE = "results.json"


@dataclass
class Cell:
    """One method x subset x seed: where its fine-tune and evaluations are (relative to RUN)."""

    protocol: str
    method: str
    subset: str
    seed: int
    finetune: str
    evals: list[str] = field(default_factory=list)


def slug(data: str) -> str:
    """The folder name of a harmful set: `harmbench@eval` stays, `prompts/bad.txt` -> `bad.txt`."""
    return re.sub(r"[^\w@:.+-]", "_", Path(data).name)


def _write_jsonl(path: Path, lines: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _sample(records: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    """A seeded sample of `n` records in their order (all when n is None or too large)."""
    if n is None or n >= len(records):
        return list(records)
    return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), n))]


class Experiment:
    """The stages of one experiment run folder; `fine_tunes` remembers what this process has trained."""

    def __init__(self, config: ExperimentConfig, out: Path) -> None:
        self.config, self.out = config, out
        self.fine_tunes: dict[str, list[str]] = {}  # key -> its evaluation folders

    def evaluate(self, folder: Path, adapter: str | None) -> list[str]:
        """Evaluate the model (+ adapter) on every harmful set, the benign set with the first; folders relative
        to RUN."""
        c, evals = self.config, []
        for i, harmful in enumerate(c.harmful):
            target = folder / slug(harmful)
            evaluate(c.evaluate_config(harmful, c.benign if i == 0 else "", str(target), adapter))
            evals.append(os.path.relpath(target, self.out))
        return evals

    def cell(self, protocol: str, method: str, subset: str, lines: Sequence[dict[str, Any]], seed: int) -> Cell:
        """Fine-tune on `lines` with `seed` (once per distinct ids and seed) and evaluate; link it into the
        cell's folder."""
        ids = sorted(line["id"] for line in lines)
        key = hashlib.sha256(json.dumps([ids, seed]).encode()).hexdigest()[:16]
        tune = self.out / "finetunes" / key
        if key not in self.fine_tunes:
            by_id = {line["id"]: line for line in lines}
            data = tune / "data.jsonl"
            if not data.exists():
                _write_jsonl(data, [by_id[i] for i in ids])
            adapter = train(self.config.train_config(str(data), str(tune / "adapter"), seed))
            self.fine_tunes[key] = self.evaluate(tune / "eval", str(adapter))
        cell = Cell(protocol, method, subset, seed, os.path.relpath(tune, self.out), self.fine_tunes[key])
        folder = self.out / "cells" / protocol / method / subset / f"seed{seed}"
        _write_jsonl(folder / "subset.jsonl", lines)
        if not (folder / "finetune").is_symlink():
            (folder / "finetune").symlink_to(os.path.relpath(tune, folder))
        evals = {e: json.loads((self.out / e / SUMMARY_FILE).read_text()) for e in cell.evals}
        write_json_atomic(folder / "summary.json", {
            "protocol": protocol, "method": method, "subset": subset, "seed": seed, "n_records": len(ids),
            "finetune": cell.finetune, "asr": {e: s["judges"][self.config.judge] for e, s in evals.items()},
            "over_refusal": evals[cell.evals[0]].get("over_refusal")})
        return cell

    def score(self, pool: Path, folder: Path) -> Path:
        return score(self.config.score_config(str(pool), str(folder / "scores")))

    def cut(self, scores: Path, pool: Path, folder: Path, method: str, **mode: Any) -> dict[str, list[dict]]:
        """`sqsd filter` of `method`'s ranking into `folder`: {subset name: lines}."""
        out = filter_scores(FilterConfig(scores=str(scores), data=str(pool), output_dir=str(folder),
                                         by=method_column(self.config.methods, method),
                                         overwrite=self.config.overwrite, **mode))
        return {p.stem: _read_jsonl(p) for p in sorted(out.glob("*.jsonl"))}

    def ranked(self, pool: Path, lines: Sequence[dict[str, Any]]) -> list[Cell]:
        """Protocols windows and ends: a cell per method x subset x seed (ends: and the random control)."""
        c, cells = self.config, []
        scores = Path(c.scores) if c.scores else self.score(pool, self.out)
        for protocol in [p for p in c.protocols if p != "contamination"]:
            k = c.n_windows if protocol == "windows" else 2
            names = {"S1": "top", "S2": "bottom"} if protocol == "ends" else {}
            subsets = {(m, names.get(s, s)): chosen for m in c.methods for s, chosen in self.cut(
                scores, pool, self.out / "subsets" / f"{protocol}-{m}", m, windows=k,
                window_size=c.window_size).items()}
            if protocol == "ends":
                subsets["control", "random"] = _sample(lines, c.window_size, c.seed)
            cells += [self.cell(protocol, m, s, chosen, seed) for seed in c.seeds
                      for (m, s), chosen in subsets.items()]
        return cells

    def contamination(self, lines: Sequence[dict[str, Any]]) -> tuple[list[Cell], dict[str, Any]]:
        """Protocol contamination: per ratio, the mixed pool, its scores and (`contamination_finetune`) cells."""
        c, cells, detection = self.config, [], {}
        harmful = load_records(c.contamination_source).records
        for ratio in c.contamination_ratios:
            folder = self.out / "contamination" / f"{ratio:g}"
            k = max(1, round(ratio * len(lines) / (1 - ratio)))  # k / (pool + k) = ratio
            if k > len(harmful):
                raise SqsdError(f"--contamination-ratios {ratio:g} needs {k} harmful samples, but "
                                f"{c.contamination_source} has {len(harmful)}")
            injected = [{**r.messages_line(), "id": f"injected:{r.id}"} for r in _sample(harmful, k, c.seed)]
            mixed = [*lines, *injected]
            random.Random(c.seed).shuffle(mixed)  # no method may find them by their place in the file
            pool = _write_jsonl(folder / "mixed.jsonl", mixed)
            write_json_atomic(folder / "injected.json", sorted(line["id"] for line in injected))
            scores = self.score(pool, folder)
            detection[f"{ratio:g}"] = {"scores": os.path.relpath(scores, self.out), "n_pool": len(mixed),
                                       "injected": sorted(line["id"] for line in injected)}
            if c.contamination_finetune:
                protocol = f"contamination-{ratio:g}"
                cells += [self.cell(protocol, "unfiltered", "all", mixed, seed) for seed in c.seeds]
                for m in c.methods:
                    kept = self.cut(scores, pool, folder / "subsets" / m, m, drop_top=k)["kept"]
                    cells += [self.cell(protocol, m, "kept", kept, seed) for seed in c.seeds]
        return cells, detection


def experiment(config: ExperimentConfig) -> dict[str, Any]:
    """Run (or resume) the experiment of `config`; returns the results (also RUN/results.json)."""
    from sqsd.results import assemble, print_table

    out = Path(config.output_dir)

    def inputs() -> dict[str, Any]:
        found = {"model": model_fingerprint(config.model),
                 **{f"pool:{k}": v for k, v in data_fingerprints(config.pool).items()}}
        if config.scores:
            found["scores"] = fingerprint(config.scores)
        if "contamination" in config.protocols:
            found |= {f"contamination:{k}": v for k, v in data_fingerprints(config.contamination_source).items()}
        return found

    with open_run(out, config, inputs, overwrite=config.overwrite,
                  input_fields=("model", "pool", "scores", "contamination_source")) as run:
        lines = [r.messages_line() for r in _sample(load_records(config.pool).records, config.n_pool, config.seed)]
        pool = _write_jsonl(out / "pool.jsonl", lines)
        stages = Experiment(config, out)
        base = stages.evaluate(out / "base", None)
        cells = stages.ranked(pool, lines) if set(config.protocols) - {"contamination"} else []
        detection: dict[str, Any] = {}
        if "contamination" in config.protocols:
            more, detection = stages.contamination(lines)
            cells += more
        results = assemble(config, out, base, cells, detection)
        write_json_atomic(out / RESULTS_FILE, results)
        run.finish({"results": RESULTS_FILE, "cells": len(cells), "fine_tunes": len(stages.fine_tunes)})
    print_table(results)
    return results


def experiment_cli(config: ExperimentConfig) -> int:
    experiment(config)
    return 0
