"""`sqsd demo`: the whole offline pipeline on the built-in default, each stage reused when already done.

fetch assets → align SmolLM2 (`align/model`) → danger and safety data and directions (`directions/`) → a benign
anchor adapter on AlpacaEval's `@directions` split (`anchor/`, disjoint from the scored pool) → score a seeded
sample of the `dolly-sqsd` pool with SQSD and the baselines of --experiment-methods (`scores-nN/`) → the 20
riskiest and 20 safest samples, S1..Sk windows, and how our ranking compares with the paper's own scores
(`scores-nN/summary.json`) → a small `ends` experiment on those scores (`experiment-nN/`, `sqsd experiment`):
the aligned model fine-tuned on each method's riskiest and safest n and on a random n, and the ASR of each
against the model itself → the report page of the whole folder (`report/index.html`, `sqsd report`), whose
path it prints.

Every stage is a library call with its own config and run folder (`runs.open_run`), so a rerun skips what is done
and a changed setting is refused by the stage it concerns (pass `--overwrite` to that stage's own command to redo
it). Under a launcher the training and scoring stages use every rank; the rest runs on rank 0 (`runs.on_main`).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pandas as pd

from sqsd.config import (
    AlignConfig,
    AssetsFetchConfig,
    DemoConfig,
    DirectionsBuildConfig,
    DirectionsDataConfig,
    ExperimentConfig,
    FilterConfig,
    ReportConfig,
    ScoreConfig,
    TrainConfig,
)
from sqsd.runs import on_main, write_json_atomic

POOL = "dolly-sqsd"


def _stage(name: str) -> float:
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def write_pool(out: Path, n: int | None, seed: int) -> Path:
    """A seeded sample of `n` dolly-sqsd rows (all 3,000 when n is None), in dolly format with the paper's
    columns and window kept, as pool.jsonl; written once."""
    from sqsd.data import load_records, raw_rows

    path = out / "pool.jsonl"
    if path.exists():
        return path
    records, fields = load_records(POOL).records, raw_rows(POOL)
    if n is not None and n < len(records):
        records = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), n))]
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({**fields[(r.source, r.row)], "window": r.source.rpartition(":")[2]}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def _ranks(x: pd.Series) -> pd.Series:
    return x.rank(method="average")


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rho: the Pearson correlation of average ranks (ties shared)."""
    return float(_ranks(a).corr(_ranks(b)))


def auc(scores: pd.Series, positive: pd.Series) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie): the Mann–Whitney form of the ROC AUC."""
    ranks = _ranks(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# (summary name, column of the comparison table): what compare_with_paper sets against the paper's ranking.
COMPARED = (("sqsd_risk", "risk"), ("sqsd_risk_z", "risk_z"), ("danger_term", "danger"),
            ("minus_safety_term", "minus_safety"), ("response_length", "ours_length"))


def compare_with_paper(scores: pd.DataFrame, pool: pd.DataFrame) -> dict[str, Any]:
    """Our risk (raw and z-scored), each of its two terms, and plain response length against the paper's
    `Danger-safe` score and its S1/S5 windows: does our ranking carry more than length does?"""
    table = pool.assign(risk=scores["risk"].to_numpy(), risk_z=scores["risk_z"].to_numpy(),
                        danger=scores["danger"].to_numpy(), minus_safety=-scores["safety"].to_numpy(),
                        ours_length=scores["n_response_tokens"].to_numpy(), ok=(scores["status"] == "ok").to_numpy())
    table = table[table["ok"]]
    ends = table[table["window"].isin(["S1", "S5"])]
    s1 = ends["window"] == "S1"
    out: dict[str, Any] = {"n": len(table), "n_S1": int(s1.sum()), "n_S5": int((~s1).sum())}
    for name, column in COMPARED:
        out[name] = {"spearman_vs_paper_danger_safe": spearman(table[column], table["Danger-safe"]),
                     "auc_S1_vs_S5": auc(ends[column], s1) if s1.any() and (~s1).any() else None}
    return out


def demo(config: DemoConfig) -> dict[str, Any]:
    """Run (or resume) every stage; returns the summary that is also written to scores-nN/summary.json."""
    from sqsd.align import align
    from sqsd.assets import fetch_cli
    from sqsd.direction_tools import build, directions_data
    from sqsd.score import score
    from sqsd.train import train

    run = Path(config.output_dir)
    timings: dict[str, float] = {}
    t = _stage("1/7 assets")
    fetch_cli(AssetsFetchConfig())
    timings["assets"] = time.perf_counter() - t

    t = _stage("2/7 align SmolLM2 (harmful -> refusal, benign -> its own answers)")
    aligned = str(align(AlignConfig(output_dir=str(run / "align"))))
    timings["align"] = time.perf_counter() - t

    t = _stage("3/7 danger and safety directions")
    dirs = run / "directions"
    paths = {}
    for kind, build_args in (("danger", {}), ("safety", {})):
        data = directions_data(DirectionsDataConfig(kind=kind, output_dir=str(dirs / f"{kind}-data")))
        paths[kind] = build(DirectionsBuildConfig(kind=kind, data=str(data), model=aligned, max_length=config.max_length,
                                                  output_dir=str(dirs / kind), **build_args))
    timings["directions"] = time.perf_counter() - t

    t = _stage("4/7 benign anchor adapter (alpaca-eval@directions, disjoint from the pool)")
    anchor = train(TrainConfig(data="alpaca-eval@directions", model=aligned, output_dir=str(run / "anchor"),
                               epochs=config.anchor_epochs, max_length=config.max_length))
    timings["anchor"] = time.perf_counter() - t

    t = _stage(f"5/7 score {config.n_pool or 3000} dolly-sqsd samples")
    out = run / f"scores-n{config.n_pool or 3000}"
    pool = on_main(lambda: write_pool(out, config.n_pool, config.seed))
    # SQSD with the directions above; the anchored baselines with the data they were built from (@directions)
    scoring = dict(model=aligned, danger=str(paths["danger"]), safety=str(paths["safety"]),
                   danger_anchor=str(anchor), safety_anchor=str(dirs / "safety"),
                   harmful_anchors=str(dirs / "danger-data" / "data.jsonl"),
                   safe_anchors=str(dirs / "safety-data" / "data.jsonl"), max_length=config.max_length,
                   batch_size=config.batch_size)
    scores_file = score(ScoreConfig(data=str(pool), method=config.experiment_methods, output_dir=str(out / "scores"),
                                    **scoring))
    timings["score"] = time.perf_counter() - t

    t = _stage("6/7 riskiest / safest samples, windows, comparison with the paper's scores")
    summary = on_main(lambda: _summarise(config, out, pool, scores_file))
    summary["seconds_this_run"] = {k: round(v, 1) for k, v in timings.items()}
    on_main(lambda: write_json_atomic(out / "summary.json", summary))
    on_main(lambda: _print_summary(summary))

    n = round(config.ends_fraction * (config.n_pool or 3000))
    t = _stage(f"7/7 fine-tune on each method's riskiest and safest {n}, and a random {n}: ASR (sqsd experiment)")
    from sqsd.experiment import experiment

    on_main(lambda: experiment(ExperimentConfig(
        pool=str(pool), scores=str(scores_file), methods=config.experiment_methods, protocols=("ends",),
        window_size=n, seeds=(config.seed,), seed=config.seed, output_dir=str(run / f"experiment-n{n}"),
        **scoring)))
    summary["seconds_this_run"]["experiment"] = round(time.perf_counter() - t, 1)
    on_main(lambda: write_json_atomic(out / "summary.json", summary))
    from sqsd.report import report  # last: the page of everything the run folder holds

    on_main(lambda: report(ReportConfig(run_dir=str(run))))
    return summary


def _summarise(config: DemoConfig, out: Path, pool: Path, scores_file: Path) -> dict[str, Any]:
    """The windows (`sqsd filter`), the 20 riskiest and safest samples and the comparison with the paper."""
    from sqsd.filter import filter_scores

    scores = pd.read_parquet(scores_file) if str(scores_file).endswith(".parquet") else pd.read_json(scores_file,
                                                                                                    lines=True)
    rows = pd.read_json(pool, lines=True)
    filter_scores(FilterConfig(scores=str(scores_file), data=str(pool), output_dir=str(out / "windows"),
                               windows=config.n_windows, window_size=config.window_size))
    ranked = scores[scores["status"] == "ok"].sort_values("risk", ascending=False)
    show = ["instruction", "response", "category", "window", "Danger-safe"]

    def extreme(frame: pd.DataFrame) -> list[dict[str, Any]]:
        return [{**{k: rows.loc[i, k] for k in show}, **frame.loc[i, ["danger", "safety", "risk"]].to_dict()}
                for i in frame.index]

    return {"pool": str(pool), "scores": str(scores_file), "windows": str(out / "windows"),
            "comparison_with_paper": compare_with_paper(scores, rows),
            "riskiest_20": extreme(ranked.head(20)), "safest_20": extreme(ranked.tail(20).iloc[::-1])}


def _print_summary(summary: dict[str, Any]) -> None:
    cmp = summary["comparison_with_paper"]
    print(f"\nscored {cmp['n']} samples -> {summary['scores']}; windows in {summary['windows']}")
    for name, _ in COMPARED:
        c = cmp[name]
        auc_text = "-" if c["auc_S1_vs_S5"] is None else f"{c['auc_S1_vs_S5']:.3f}"
        print(f"  {name:16s} Spearman vs paper's Danger-safe {c['spearman_vs_paper_danger_safe']:+.3f}   "
              f"AUC paper S1 vs S5 {auc_text}  (n_S1 {cmp['n_S1']}, n_S5 {cmp['n_S5']})")
    for title, key in (("riskiest", "riskiest_20"), ("safest", "safest_20")):
        print(f"\n{title} 5 of 20 (all 20 in summary.json):")
        for r in summary[key][:5]:
            text = " ".join(str(r["instruction"]).split())[:70]
            print(f"  risk {r['risk']:+.3f} (danger {r['danger']:+.3f}, safety {r['safety']:+.3f}) "
                  f"[{r['window']}] {text}")
    seconds = summary["seconds_this_run"]
    print("\nseconds per stage in this run (~0 = reused): " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
