"""The experiment section of `sqsd report`: ASR by subset per method with 95% CIs (the paper's main figure), the
ranking statistics, over-refusal per cell, and the contamination test's ROC curves with AUC / AP.

`read_results` is the one place that knows the layout of `sqsd experiment`'s results.json (`sqsd.results`);
everything else reads its normalised form. An estimate is (value, lo, hi), read from {"value", "lo", "hi"}
or {"value", "ci95": [lo, hi]}. An experiment that has not finished (no results.json) shows the cells whose
summary.json exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sqsd import figures
from sqsd.sections import Image, Section, Table, ci, new_section, num, read_json, record

Estimate = tuple[float, float, float]


def _estimate(e: dict[str, Any] | None) -> Estimate | None:
    if e is None:
        return None
    lo, hi = (e["lo"], e["hi"]) if "lo" in e else e["ci95"]
    return e["value"], lo, hi


def read_results(path: Path) -> dict[str, Any]:
    """results.json, normalised: estimates as (value, lo, hi), absent figures as None."""
    r = read_json(path)
    return {
        "judge": r["judge"], "harmful": r["harmful"], "n_prompts": r["n_prompts"], "seeds": r["seeds"],
        "reference": r["reference"],
        "base": _estimate(r["base"]["asr"]), "base_refusal": r["base"].get("over_refusal"),
        "asr": {p: {m: {s: {"asr": _estimate(c["asr"]), "over_refusal": c.get("over_refusal"),
                             "per_seed": c.get("asr_per_seed", [])} for s, c in by.items()}
                    for m, by in methods.items()} for p, methods in r["asr"].items()},
        "ranking": {p: {m: {"gap": _estimate(e["gap"]), "vs_reference": _estimate(e.get("reference_minus_this")),
                            "spearman": e.get("spearman")} for m, e in methods.items()}
                    for p, methods in r["ranking"].items()},
        "contamination": {ratio: {"n_pool": c["n_pool"], "n_injected": c["n_injected"],
                                  "asr_unfiltered": _estimate(c.get("asr_unfiltered")),
                                  "methods": {m: {"auc": e["auc"], "ap": e["ap"], "recall": e["recall_at_fraction"],
                                                  "asr_filtered": _estimate(e.get("asr_filtered"))}
                                              for m, e in c["methods"].items()}}
                          for ratio, c in r["contamination"].items()},
    }


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) from the highest score down; tied scores enter together."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the end of each group of tied scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return [0.0, *(fp / max(1, (~y).sum())).tolist()], [0.0, *(tp / max(1, y.sum())).tolist()]


def _curves(folder: Path, ratio: str, methods: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """ROC curve per method from contamination/<ratio>/: its scores and the ids injected."""
    from sqsd.score import read_scores

    here = folder / "contamination" / ratio
    file = next((here / "scores" / f"scores.{e}" for e in ("parquet", "jsonl")
                 if (here / "scores" / f"scores.{e}").is_file()), None)
    if file is None or not (here / "injected.json").is_file():
        return {}
    injected = set(read_json(here / "injected.json"))
    rows = [r for r in read_scores(file) if r["status"] == "ok"]
    labels = np.array([r["id"] in injected for r in rows])
    return {m: roc_points(np.array([r[m if len(methods) > 1 else "score"] for r in rows], dtype=float), labels)
            for m in methods}


def _subset_key(name: str) -> tuple[int, int]:
    """S1 .. Sk by number, then top, random, bottom (results.json keeps keys sorted by name)."""
    ends = {"top": 0, "all": 0, "kept": 1, "random": 1, "bottom": 2}
    return (0, int(name[1:])) if name[1:].isdigit() else (1, ends.get(name, 3))


def _subsets(methods: dict[str, dict[str, Any]]) -> list[str]:
    return sorted({sub for by in methods.values() for sub in by}, key=_subset_key)


def _ordered(items: dict[str, Any], first: list[str]) -> dict[str, Any]:
    """`items` (by method) with the methods in `first` (the run's --methods order) first, the rest after."""
    return {k: items[k] for k in sorted(items, key=lambda k: (first.index(k) if k in first else len(first), k))}


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    refusal = "" if entry["over_refusal"] is None else f" · refuses {num(entry['over_refusal'], 2)}"
    return ci(*entry["asr"]) + refusal


def experiment_section(folder: Path, root: Path) -> Section:
    s = new_section("experiment", f"Experiment ({folder.name})", "Does fine-tuning on a method's riskiest subset "
                 "(S1 / top) lose more safety than on its safest (Sk / bottom)? A good ranking separates them "
                 "widely; random should not.", folder, root)
    path = folder / "results.json"
    if not path.is_file():
        s.missing.append("results.json: not written yet; the cells finished so far are listed")
        s.items.append(_finished_cells(folder))
        return s
    r = read_results(path)
    s.notes.append(f"ASR ({r['judge']} judge) on {r['n_prompts']} harmful prompts of {', '.join(r['harmful'])}; "
                   f"95% CI over prompts" + (f" × {len(r['seeds'])} seeds" if len(r["seeds"]) > 1 else "")
                   + (f"; base model {ci(*r['base'])}" if r["base"] else ""))
    order = [r["reference"], *record(folder).get("config", {}).get("methods", [])]
    ranked = {p: _ordered({m: {sub: by[sub] for sub in sorted(by, key=_subset_key)} for m, by in methods.items()},
                          order)
              for p, methods in r["asr"].items() if p in ("windows", "ends")}
    if ranked:
        panels = {p: (_subsets(methods), {m: {sub: c["asr"] for sub, c in by.items()} for m, by in methods.items()})
                  for p, methods in ranked.items()}
        s.items.append(Image("ASR after fine-tuning on each subset", "Points: ASR with 95% CI per method; grey: "
                             "the model before fine-tuning.", figures.data_uri(figures.subset_figure(panels,
                                                                                                    r["base"]))))
    for protocol, methods in ranked.items():
        subsets = _subsets(methods)
        s.items.append(Table(f"{protocol}: ASR (95% CI) and over-refusal per cell", "One fine-tune per seed per "
                             "cell; over-refusal is the mean over seeds on the benign prompts.",
                             ["method", *subsets], [[m, *[_cell(by.get(sub)) for sub in subsets]]
                                                    for m, by in methods.items()]))
        if protocol in r["ranking"]:
            s.items.append(Table(f"{protocol}: how well each ranking separates", f"gap = ASR(first) − ASR(last) "
                                 f"(> 0: riskiest subsets hurt more); {r['reference']} − this > 0: "
                                 f"{r['reference']} separates better (paired over prompts and seeds).",
                                 ["method", "gap (95% CI)", f"gap {r['reference']} − gap this", "Spearman"],
                                 [[m, ci(*e["gap"]), ci(*e["vs_reference"]) if e["vs_reference"] else "–",
                                   num(e["spearman"], sign=True)]
                                  for m, e in _ordered(r["ranking"][protocol], order).items()]))
    curves = {}
    for ratio, c in r["contamination"].items():
        c["methods"] = _ordered(c["methods"], order)
        curves[ratio] = _curves(folder, ratio, list(c["methods"]))
        unfiltered = f"; ASR unfiltered {ci(*c['asr_unfiltered'])}" if c["asr_unfiltered"] else ""
        s.items.append(Table(f"Contamination {ratio}: {c['n_injected']} harmful samples injected into "
                             f"{c['n_pool']}{unfiltered}", "AUC 1 = every injected sample ranked above every "
                             "benign one; recall = share found in the top as many as were injected.",
                             ["method", "ROC-AUC", "AP", "recall", "ASR without its top"],
                             [[m, num(e["auc"]), num(e["ap"]), num(e["recall"]),
                               ci(*e["asr_filtered"]) if e["asr_filtered"] else "–"] for m, e in c["methods"].items()]))
    curves = {ratio: found for ratio, found in curves.items() if found}
    if curves:
        s.items.append(Image("Finding injected harmful samples (ROC)", "The further a curve bows to the top left, "
                             "the better the method finds the injected samples; the diagonal is chance.",
                             figures.data_uri(figures.roc_figure(curves))))
    return s


def _finished_cells(folder: Path) -> Table:
    rows = []
    for path in sorted(folder.glob("cells/*/*/*/seed*/summary.json")):
        cell = read_json(path)
        asr = "; ".join(f"{Path(name).name} {ci(e['rate'], *e['ci95'])}" for name, e in cell["asr"].items())
        rows.append([cell["protocol"], cell["method"], cell["subset"], str(cell["seed"]), asr,
                     num((cell.get("over_refusal") or {}).get("rate"))])
    return Table("Cells finished so far", "ASR per harmful set of each finished fine-tune (95% CI over prompts).",
                 ["protocol", "method", "subset", "seed", "ASR", "over-refusal"], rows)
