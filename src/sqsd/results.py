"""The statistics of `sqsd experiment`: results.json and the table printed at the end, from its stages' files.

A prompt's outcome in one evaluation is the fraction of its samples the judge found unsafe (unparsed verdicts
left out; a prompt with none left is an error), read from the judged records `harmful.<judge>.jsonl` that
`sqsd evaluate` writes. The prompts of every harmful set, each set in id order, are concatenated: a cell (one
fine-tune) is a vector over prompts, and the cells of one method x subset, one per seed, a matrix (n_seeds, n_prompts). The maths is `sqsd.stats`:
bootstrap CIs over prompts and seeds, resampled with the same indices for every matrix of one comparison
(paired), so a gap or a difference of gaps is judged on the same prompts and seeds.

results.json:
    base                    ASR of the model itself (CI over prompts) and its over-refusal rate
    asr[protocol][method][subset]   ASR (CI over prompts x seeds), per-seed ASR, mean over-refusal, fine-tunes
    ranking[protocol][method]       gap = ASR(S1 or top) − ASR(Sk or bottom) with its CI; windows: Spearman
                            of the window index (1 = riskiest) with the ASR (−1: ASR falls window by window);
                            every method but the reference: reference_minus_this = the reference's gap − this
                            one's, paired (> 0: the reference separates risky from safe better)
    contamination[ratio]    per method: ROC-AUC, average precision and recall at the injected fraction of
                            its scores for the injected samples; with fine-tunes, ASR unfiltered and after
                            removing each method's top
Figures that are undefined (a Spearman correlation of constant ASRs) are null.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sqsd.config import ExperimentConfig
from sqsd.data import load_records
from sqsd.errors import SqsdError
from sqsd.evaluate import JUDGED_FIELDS, SUMMARY_FILE
from sqsd.readers import read_rows
from sqsd.score import OK, method_column, read_scores
from sqsd.stats import average_precision, gap_ci, mean_ci, paired_difference, recall_at, roc_auc, spearman


def _prompt_ids(harmful: str, limit: int | None) -> tuple[str, ...]:
    return tuple(sorted(r.id for r in load_records(harmful, limit=limit).records))


def outcomes(config: ExperimentConfig, out: Path, evals: list[str]) -> np.ndarray:
    """Per-prompt ASR (n_prompts,) of one model over every harmful set (`evals`: its folders, in set order)."""
    values: list[float] = []
    for folder, harmful in zip(evals, config.harmful):
        verdicts: dict[str, list[bool]] = defaultdict(list)
        for row in read_rows(out / folder / f"harmful.{config.judge}.jsonl", JUDGED_FIELDS):
            if row.fields["unsafe"] is not None and row.fields["sample"] < config.n:
                verdicts[row.fields["id"]].append(row.fields["unsafe"])
        for i in _prompt_ids(harmful, config.limit):
            if not verdicts[i]:  # every prompt must count in every table, or comparisons would not be paired
                raise SqsdError(f"{out / folder}: no readable verdict on prompt {i!r} (unparsed or missing); "
                                "judge it again (delete the judged file) or use another --judge")
            values.append(float(np.mean(verdicts[i])))
    return np.array(values)


def _over_refusal(out: Path, evals: list[str]) -> float | None:
    found = json.loads((out / evals[0] / SUMMARY_FILE).read_text()).get("over_refusal")
    return None if found is None else found["rate"]


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _subsets(protocol: str, n_windows: int) -> list[str]:
    return [f"S{i + 1}" for i in range(n_windows)] if protocol == "windows" else ["top", "bottom"]


def assemble(config: ExperimentConfig, out: Path, base: list[str], cells: list[Any],
             detection: dict[str, Any]) -> dict[str, Any]:
    """results.json from the base model's evaluation folders, the cells and the contamination scores."""
    kw = {"n_bootstrap": config.n_bootstrap, "seed": config.seed}
    groups: dict[tuple[str, str, str], list[Any]] = defaultdict(list)
    for cell in sorted(cells, key=lambda c: config.seeds.index(c.seed)):
        groups[cell.protocol, cell.method, cell.subset].append(cell)
    matrices = {key: np.stack([outcomes(config, out, c.evals) for c in group]) for key, group in groups.items()}
    base_asr = outcomes(config, out, base)
    results: dict[str, Any] = {
        "judge": config.judge, "harmful": list(config.harmful), "n_prompts": len(base_asr),
        "seeds": list(config.seeds), "reference": config.methods[0],
        "base": {"asr": mean_ci(base_asr[None, :], **kw).to_dict(), "over_refusal": _over_refusal(out, base)},
        "asr": {}, "ranking": {}, "contamination": {}}
    for (protocol, method, subset), group in groups.items():
        refusals = [_over_refusal(out, c.evals) for c in group]
        results["asr"].setdefault(protocol, {}).setdefault(method, {})[subset] = {
            "asr": mean_ci(matrices[protocol, method, subset], **kw).to_dict(),
            "asr_per_seed": [float(row.mean()) for row in matrices[protocol, method, subset]],
            "over_refusal": None if None in refusals else float(np.mean(refusals)),
            "finetunes": [c.finetune for c in group]}
    reference = config.methods[0]
    for protocol in [p for p in ("windows", "ends") if p in config.protocols]:
        names = _subsets(protocol, config.n_windows)
        ends = {m: (matrices[protocol, m, names[0]], matrices[protocol, m, names[-1]]) for m in config.methods}
        ranking = results["ranking"][protocol] = {}
        for m in config.methods:
            entry = ranking[m] = {"gap": gap_ci(*ends[m], **kw).to_dict()}
            if protocol == "windows":
                entry["spearman"] = _num(spearman(np.arange(1, len(names) + 1),
                                                  np.array([matrices[protocol, m, s].mean() for s in names])))
            if m != reference:
                entry["reference_minus_this"] = paired_difference(*ends[reference], *ends[m], **kw).to_dict()
    for ratio, found in detection.items():
        rows = [r for r in read_scores(out / found["scores"]) if r["status"] == OK]
        injected = set(found["injected"])
        labels = np.array([r["id"] in injected for r in rows])
        fraction = len(found["injected"]) / found["n_pool"]
        entry = results["contamination"][ratio] = {"n_pool": found["n_pool"], "n_injected": len(found["injected"]),
                                                   "methods": {}}
        protocol = f"contamination-{ratio}"
        if (protocol, "unfiltered", "all") in matrices:
            entry["asr_unfiltered"] = mean_ci(matrices[protocol, "unfiltered", "all"], **kw).to_dict()
        for m in config.methods:
            scores = np.array([r[method_column(config.methods, m)] for r in rows], dtype=float)
            entry["methods"][m] = {"auc": roc_auc(scores, labels), "ap": average_precision(scores, labels),
                                   "recall_at_fraction": recall_at(scores, labels, fraction)}
            if (protocol, m, "kept") in matrices:
                entry["methods"][m]["asr_filtered"] = mean_ci(matrices[protocol, m, "kept"], **kw).to_dict()
    return results


def _ci(e: dict[str, Any] | None) -> str:
    return "-" if e is None else f"{e['value']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    return _ci(entry["asr"]) + ("" if entry["over_refusal"] is None else f" ({entry['over_refusal']:.2f})")


def print_table(results: dict[str, Any]) -> None:
    """The results as plain-text tables: ASR by method and subset, gaps and paired differences, detection."""
    seeds = len(results["seeds"])
    print(f"\nASR ({results['judge']} judge) on {results['n_prompts']} harmful prompts of "
          f"{', '.join(results['harmful'])}; 95% CI over prompts" + (f" x {seeds} seeds" if seeds > 1 else ""))
    base = results["base"]
    refusal = "" if base["over_refusal"] is None else f"   over-refusal {base['over_refusal']:.3f}"
    print(f"  {'base model':<18}{_ci(base['asr'])}{refusal}")
    for protocol, methods in results["asr"].items():
        if protocol not in ("windows", "ends"):
            continue  # contamination fine-tunes: in their own table below
        subsets = list(dict.fromkeys(s for by in methods.values() for s in by))
        print(f"\n{protocol}: ASR (over-refusal)\n  {'method':<18}" + "".join(f"{s:<32}" for s in subsets))
        for method, by in methods.items():
            print(f"  {method:<18}" + "".join(f"{_cell(by.get(s)):<32}" for s in subsets))
        if protocol in results["ranking"]:
            ref = results["reference"]
            print(f"  {'method':<18}{'gap first - last':<32}{f'gap {ref} - gap this (paired)':<32}spearman")
            for method, r in results["ranking"][protocol].items():
                rho = r.get("spearman")
                print(f"  {method:<18}{_ci(r['gap']):<32}{_ci(r.get('reference_minus_this')):<32}"
                      + ("-" if rho is None else f"{rho:+.3f}"))
    for ratio, found in results["contamination"].items():
        print(f"\ncontamination {ratio} ({found['n_injected']} injected of {found['n_pool']}):"
              + (f" ASR unfiltered {_ci(found['asr_unfiltered'])}" if "asr_unfiltered" in found else ""))
        print(f"  {'method':<18}{'AUC':>7}{'AP':>7}{'recall':>8}  ASR without its top")
        for method, m in found["methods"].items():
            print(f"  {method:<18}{m['auc']:>7.3f}{m['ap']:>7.3f}{m['recall_at_fraction']:>8.3f}  "
                  + _ci(m.get("asr_filtered")))
