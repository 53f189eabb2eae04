"""Tiny saved run folders of every kind `sqsd report` shows, written with the commands' own writers where they
have one (scores, evaluation summaries, the demo's summary) and by hand in the commands' formats otherwise."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sqsd import __version__
from sqsd.config import DemoConfig, ScoreConfig, to_dict
from sqsd.evaluate import asr_summary, rate_summary
from sqsd.runs import write_json_atomic
from sqsd.score import add_risk_z, columns, write_scores


def run_json(folder: Path, config: dict, result: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"config": config, "inputs": {}, "sqsd_version": __version__, "files": []}
    if result is not None:
        record["result"] = result
    write_json_atomic(folder / "run.json", record)
    return folder


def jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def score_rows(n: int, methods: tuple[str, ...] = ("sqsd",), skipped: tuple[int, ...] = ()) -> list[dict]:
    """Deterministic rows: risk rises with the index (row n-1 is the riskiest); `skipped` rows have no score."""
    rows = []
    for i in range(n):
        if i in skipped:
            rows.append({"index": i, "id": f"r{i}", "danger": None, "safety": None, "risk": None, "score": None,
                         "n_response_tokens": None, "loss": None, "status": "skipped: no response token"})
            continue
        danger, safety = 0.01 * i + 0.1 * math.sin(i), 0.05 * math.cos(3 * i)
        row = {"index": i, "id": f"r{i}", "danger": danger, "safety": safety, "risk": danger - safety,
               "n_response_tokens": 5 + (7 * i) % 40, "loss": 1.0, "status": "ok"}
        row["score"] = row["risk"] if methods[0] == "sqsd" else float(row["n_response_tokens"])
        for m in methods[1:]:
            row[m] = float((i * 37) % 11) if m != "length" else float(row["n_response_tokens"])
        rows.append(row)
    return add_risk_z(rows)


def scores_run(folder: Path, data: str, n: int, methods: tuple[str, ...] = ("sqsd",), fmt: str = "parquet",
               skipped: tuple[int, ...] = ()) -> Path:
    """A finished `sqsd score` folder of `data` (its first n records, with their ids)."""
    from sqsd.data import load_records

    ids = [r.id for r in load_records(data, limit=n).records]
    config = ScoreConfig(data=data, output_dir=str(folder), danger="d.safetensors", safety="s.safetensors",
                         method=methods, format_out=fmt, limit=n)
    run_json(folder, to_dict(config), {"rows": n, "file": f"scores.{fmt}"})
    write_scores([r | {"id": i} for r, i in zip(score_rows(n, methods, skipped), ids)], folder / f"scores.{fmt}", columns(methods))
    return folder


def dataset(path: Path, n: int) -> Path:
    return jsonl(path, [{"instruction": f"question number {i} | about topic {i % 7}", "input": "",
                         "output": f"answer {i}: " + "word " * (i % 30)} for i in range(n)])


def trajectory_rows() -> list[dict]:
    rows = []
    for step in range(0, 11):
        row = {"step": step, "epoch": step / 10}
        if step:
            row["loss"] = 2.0 - step / 10
        row["danger"] = {"cosine-sum": 0.3 * step, "projection": 0.01 * step, "cosine": 0.02 * step,
                         "norm_delta": 0.1 * step}
        row["safety"] = {"cosine-sum": -0.1 * step, "projection": -0.002 * step, "cosine": -0.01 * step,
                         "norm_delta": 0.1 * step}
        if step in (0, 5, 10):
            row.update(asr=0.1 + 0.07 * step, asr_ci=[0.05 + 0.07 * step, 0.2 + 0.07 * step], asr_n=32)
        rows.append(row)
    return rows


def steering_rows() -> list[dict]:
    return [{"direction": d, "kind": d, "alpha": a, "scaling": 2.0, "asr": 0.5 + sign * 0.2 * a,
             "ci_low": 0.4 + sign * 0.2 * a, "ci_high": 0.6 + sign * 0.2 * a,
             "over_refusal": None if d == "danger" else 0.3 - sign * 0.1 * a, "n": 50}
            for d, sign in (("danger", 1), ("safety", -1)) for a in (-1, -0.5, 0, 0.5, 1, 2)]


def evaluation_run(folder: Path) -> Path:
    """An `sqsd evaluate` folder: 6 prompts in two categories (2 of 6 unsafe), 5 benign (1 refused)."""
    judged = [{"id": f"h{i}", "sample": 0, "prompt": f"harmful prompt {i} " + "x" * 150, "response": f"reply {i}",
               "category": "cyber" if i < 3 else "chem", "judge": "keyword",
               "label": "unsafe" if i in (0, 4) else "safe", "unsafe": i in (0, 4), "categories": [], "raw": ""}
              for i in range(6)]
    jsonl(folder / "harmful.keyword.jsonl", judged)
    summary = {"model": "smollm2", "adapter": None, "inputs": {}, "harmful_prompts": {"data": "harmbench@eval", "n": 6},
               "judges": {"keyword": {"judge": "keyword", **asr_summary(judged, 200, 0)}},
               "over_refusal": rate_summary([1.0, 0.0, 0.0, 0.0, 0.0], 200, 0)}
    write_json_atomic(folder / "summary.json", summary)
    run_json(folder, {"model": "smollm2", "harmful": "harmbench@eval", "benign": "alpaca-eval@eval",
                      "judge": "keyword"}, {"summary": "summary.json"})
    return folder


def estimate(value: float, lo: float, hi: float) -> dict:
    """An estimate as `sqsd experiment` writes it (`stats.Estimate.to_dict`)."""
    return {"value": value, "ci95": [lo, hi]}


def experiment_run(folder: Path, finished: bool = True) -> Path:
    """An `sqsd experiment` folder, protocols ends and contamination (ratio 0.1), methods sqsd and length."""
    methods = ("sqsd", "length")
    run_json(folder, {"model": "smollm2", "pool": "dolly-sqsd", "methods": list(methods),
                      "protocols": ["ends", "contamination"], "seeds": [0, 1], "judge": "keyword"},
             {"results": "results.json"} if finished else None)
    cell = {"protocol": "ends", "method": "sqsd", "subset": "top", "seed": 0, "n_records": 10, "finetune": "f/1",
            "asr": {"base/harmbench@eval": {"rate": 0.6, "ci95": [0.4, 0.8], "n": 6}},
            "over_refusal": {"rate": 0.25, "ci95": [0.0, 0.5], "n": 4}}
    write_json_atomic(_mkdir(folder / "cells/ends/sqsd/top/seed0") / "summary.json", cell)
    here = folder / "contamination" / "0.1"
    rows = [r | {"id": f"injected:h{r['index']}" if r["index"] % 10 == 0 else r["id"]}
            for r in score_rows(40, methods)]
    write_scores(rows, _mkdir(here / "scores") / "scores.jsonl", columns(methods))
    write_json_atomic(here / "injected.json", sorted(r["id"] for r in rows if r["id"].startswith("injected:")))
    if not finished:
        return folder
    asr = {"ends": {m: {s: {"asr": estimate(v, v - 0.1, v + 0.1), "asr_per_seed": [v, v], "over_refusal": 0.25,
                            "finetunes": ["f/1", "f/2"]} for s, v in zip(("top", "bottom"), values)}
                    for m, values in (("sqsd", (0.62, 0.21)), ("length", (0.40, 0.35)))}}
    asr["ends"]["control"] = {"random": {"asr": estimate(0.3, 0.2, 0.4), "asr_per_seed": [0.3, 0.3],
                                         "over_refusal": None, "finetunes": ["f/3"]}}
    results = {"judge": "keyword", "harmful": ["harmbench@eval"], "n_prompts": 6, "seeds": [0, 1],
               "reference": "sqsd", "base": {"asr": estimate(0.125, 0.0, 0.25), "over_refusal": 0.3},
               "asr": asr, "ranking": {"ends": {
                   "sqsd": {"gap": estimate(0.41, 0.2, 0.6)},
                   "length": {"gap": estimate(0.05, -0.1, 0.2), "reference_minus_this": estimate(0.36, 0.1, 0.55)}}},
               "contamination": {"0.1": {"n_pool": 40, "n_injected": 4, "methods": {
                   "sqsd": {"auc": 0.917, "ap": 0.5, "recall_at_fraction": 0.25},
                   "length": {"auc": 0.444, "ap": 0.1, "recall_at_fraction": 0.0}}}}}
    write_json_atomic(folder / "results.json", results)
    return folder


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_run(root: Path, n: int = 120, summary: bool = True) -> Path:
    """The layout `sqsd demo` leaves (align/, directions/, anchor/, scores-nN/ with pool, scores, windows and
    summary.json), the pool a seeded sample of the packaged dolly-sqsd, the scores made up."""
    from sqsd.pipeline import _summarise, write_pool

    for stage in ("align", "directions/danger", "directions/safety", "anchor"):
        run_json(root / stage, {"model": "smollm2", "data": stage}, {"steps": 10})
    out = root / f"scores-n{n}"
    pool = write_pool(out, n, 0)
    scores = scores_run(out / "scores", str(pool), n, skipped=(3,))
    if summary:
        config = DemoConfig(output_dir=str(root), n_pool=n, n_windows=3, window_size=20)
        write_json_atomic(out / "summary.json", {**_summarise(config, out, pool, scores / "scores.parquet"),
                                                 "seconds_this_run": {"align": 0.0, "score": 12.5}})
    return root
