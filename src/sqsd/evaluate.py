"""`sqsd evaluate`: attack success rate (ASR) with confidence intervals, and the over-refusal rate.

Steps, each cached in the output folder so a rerun only does what is missing:

1. generate on the harmful prompts (and the benign ones) with `sqsd.generate` — `harmful.generations.jsonl`,
   `benign.generations.jsonl`, each with its sidecar; a rerun reuses them;
2. judge the harmful responses — `harmful.<judge>.jsonl`, one line per response: prompt, response, judge,
   label (unsafe / safe / unparsed), the judge's raw output, categories; keyed by (id, sample) and the
   response text, so a different judge re-judges without regenerating;
3. `summary.json`: per judge, ASR (a prompt's ASR is the fraction of its samples judged unsafe; the reported
   ASR is the mean over prompts, with a percentile bootstrap 95% CI over prompts), "any sample unsafe" ASR,
   per-category ASR, unparsed count; and the over-refusal rate (benign prompts refused, keyword judge).

The folder is a run folder (`runs.open_run`): its run.json holds the config and the model/adapter fingerprints.
`limit`, `batch_size` and the judge may change between reruns (more prompts are generated, another judge is
added); every figure of the summary counts exactly the prompts of the current run.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sqsd.config import EvaluateConfig, GenerateConfig, to_dict
from sqsd.data import load_records
from sqsd.errors import SqsdError
from sqsd.fingerprints import fingerprint, model_fingerprint
from sqsd.generate import generate_file
from sqsd.judges import HarmBenchJudge, KeywordJudge, LlamaGuardJudge
from sqsd.options import AdapterArgs, GenerationArgs, ModelArgs
from sqsd.readers import read_rows
from sqsd.runs import on_main, open_run, write_json_atomic
from sqsd.stats import bootstrap_ci

CATEGORY_FIELDS = ("category", "Category", "risk_area", "SemanticCategory")
SUMMARY_FILE = "summary.json"
# Config fields a rerun may change: how many prompts, how fast, which judge (each judge has its own file).
RESUMABLE_FIELDS = ("limit", "batch_size", "judge", "judge_model", "judge_batch_size", "n_bootstrap")


def rate_summary(per_prompt: Sequence[float], n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Mean of per-prompt values with its bootstrap CI and the count."""
    lo, hi = bootstrap_ci(per_prompt, n_bootstrap, seed)
    mean = float(np.mean(per_prompt)) if len(per_prompt) else float("nan")
    return {"rate": mean, "ci95": [lo, hi], "n": len(per_prompt)}


def asr_summary(rows: Sequence[dict[str, Any]], n_bootstrap: int, seed: int) -> dict[str, Any]:
    """ASR from judged rows ({id, unsafe, category}): averaged over samples, 'any sample', per category."""
    by_prompt: dict[str, list[bool]] = defaultdict(list)
    category: dict[str, str | None] = {}
    unparsed = 0
    for row in rows:
        category[row["id"]] = row.get("category")
        if row["unsafe"] is None:
            unparsed += 1
        else:
            by_prompt[row["id"]].append(bool(row["unsafe"]))
    ids = sorted(by_prompt)
    mean = [float(np.mean(by_prompt[i])) for i in ids]
    out = {**rate_summary(mean, n_bootstrap, seed), "n_responses": len(rows), "n_unparsed": unparsed}
    out["any_sample"] = rate_summary([float(any(by_prompt[i])) for i in ids], n_bootstrap, seed)
    per_category: dict[str, list[float]] = defaultdict(list)
    for i, value in zip(ids, mean):
        if category[i] is not None:
            per_category[category[i]].append(value)
    out["per_category"] = {c: {"rate": float(np.mean(v)), "n": len(v)} for c, v in sorted(per_category.items())}
    return out


def make_judge(config: EvaluateConfig):
    """The judge object named by the config (model-based judges load their checkpoint here)."""
    if config.judge == "keyword":
        return KeywordJudge()
    from sqsd.model import load_model

    model, tokenizer = load_model(config.judge_model, config.dtype, config.device)
    if config.judge == "llama-guard":
        return LlamaGuardJudge(model, tokenizer, batch_size=config.judge_batch_size)
    return HarmBenchJudge(model, tokenizer, batch_size=config.judge_batch_size)


def _category(meta: dict[str, Any]) -> str | None:
    value = next((meta[f] for f in CATEGORY_FIELDS if meta.get(f)), None)
    return None if value is None else str(value)


# what `judge_file` and the summary read back from the generations files
GENERATED_FIELDS: dict[str, type | tuple[type, ...]] = {"id": str, "sample": int, "prompt": str, "response": str}
# what `judge_file` reads back from the lines it wrote (nulls: an unparsed verdict)
JUDGED_FIELDS: dict[str, type | tuple[type, ...]] = {"id": str, "sample": int, "response": str, "judge": str,
                                                      "unsafe": (bool, type(None))}


def _rows(path: Path, required: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    return [r.fields for r in read_rows(path, required)]


def judge_file(generations: Path, judged: Path, get_judge: Callable[[], Any], judge_id: str,
               overwrite: bool, wanted: set[tuple[str, int]] | None = None) -> list[dict]:
    """Judge the responses of `generations` into `judged`, reusing earlier verdicts on the same responses, and
    return the verdicts of the (id, sample) pairs in `wanted` (all when None), in file order. Verdicts on other
    responses of the file stay in `judged` for a later run.

    `get_judge` is called only when some response still needs a verdict, so a rerun never loads a judge model.
    """
    rows = [r for r in _rows(generations, GENERATED_FIELDS) if wanted is None or (r["id"], r["sample"]) in wanted]
    cached: dict[tuple[str, int, str], dict] = {}
    if judged.exists():
        try:
            old = _rows(judged, JUDGED_FIELDS)
        except SqsdError as e:  # a hand edit or a disk fault: the verdicts are cheap to redo, the generations not
            raise SqsdError(f"{e}; delete {judged} to judge every response again (the generations are kept)") from None
        if old and old[0]["judge"] != judge_id and not overwrite:
            raise SqsdError(f"{judged} was judged by {old[0]['judge']}, not {judge_id}; pass --overwrite")
        cached = {(r["id"], r["sample"], r["response"]): r for r in old if r["judge"] == judge_id}
    todo = [r for r in rows if (r["id"], r["sample"], r["response"]) not in cached]
    if todo:
        verdicts = get_judge().judge([r["prompt"] for r in todo], [r["response"] for r in todo])
        for row, v in zip(todo, verdicts):
            label = "unparsed" if v.unsafe is None else "unsafe" if v.unsafe else "safe"
            cached[(row["id"], row["sample"], row["response"])] = {
                "id": row["id"], "sample": row["sample"], "prompt": row["prompt"], "response": row["response"],
                "category": _category(row.get("meta", {})), "judge": judge_id, "label": label,
                "unsafe": v.unsafe, "categories": list(v.categories), "raw": v.raw}
    out = [cached.pop((r["id"], r["sample"], r["response"])) for r in rows]
    tmp = judged.with_name(judged.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out + list(cached.values())),
                   encoding="utf-8")
    tmp.replace(judged)
    return out


def evaluate(config: EvaluateConfig, get_model: Callable[[], tuple[Any, Any]] | None = None,
             extra_inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the evaluation of `config` and return the summary (also in output_dir/summary.json).

    `get_model` lets a caller that already holds the model (steering, experiments) pass it in; by default the
    model (+ adapter) named in the config is loaded, and only if some generation is missing. `extra_inputs`
    are recorded with the model's fingerprint (steering: the direction and its coefficient), so a folder made
    for other ones is refused. Rank 0 only under a launcher.
    """
    return on_main(lambda: _evaluate(config, get_model, extra_inputs or {}), config.device)


def _evaluate(config: EvaluateConfig, get_model: Callable[[], tuple[Any, Any]] | None,
              extra_inputs: dict[str, Any]) -> dict[str, Any]:
    out = Path(config.output_dir)

    def inputs() -> dict[str, Any]:
        return {"model": model_fingerprint(config.model),
                "adapter": fingerprint(config.adapter) if config.adapter else None, **extra_inputs}

    with open_run(out, config, inputs, overwrite=config.overwrite, ignore=RESUMABLE_FIELDS,
                  input_fields=("model", "adapter")) as run:
        summary = _evaluate_in(config, out, run.inputs, get_model)
        run.finish({"summary": SUMMARY_FILE})
    _print_summary(summary, config.judge)
    return summary


def _evaluate_in(config: EvaluateConfig, out: Path, inputs: dict[str, Any],
                 get_model: Callable[[], tuple[Any, Any]] | None) -> dict[str, Any]:
    shared = {f.name: getattr(config, f.name) for group in (ModelArgs, AdapterArgs, GenerationArgs)
              for f in dataclasses.fields(group)}
    summary: dict[str, Any] = {"model": config.model, "adapter": config.adapter, "inputs": inputs}
    files, wanted = {}, {}
    for name, data in (("harmful", config.harmful), ("benign", config.benign)):
        if not data:
            continue
        gen_config = GenerateConfig(data=data, output=str(out / f"{name}.generations.jsonl"), limit=config.limit,
                                    overwrite=config.overwrite, **shared)
        records = load_records(data, limit=config.limit).records
        files[name] = generate_file(gen_config, records, inputs, get_model)
        # the file may hold more prompts (an earlier, larger --limit): the figures count this run's only
        wanted[name] = {(r.id, s) for r in records for s in range(config.n)}
        summary["generation"] = {k: v for k, v in to_dict(gen_config).items() if k not in ("data", "output")}
        summary[f"{name}_prompts"] = {"data": data, "n": len(records)}

    judge_id = config.judge if config.judge == "keyword" else f"{config.judge}:{config.judge_model}"
    judged = judge_file(files["harmful"], out / f"harmful.{config.judge}.jsonl", lambda: make_judge(config),
                        judge_id, config.overwrite, wanted["harmful"])
    try:
        old = json.loads((out / SUMMARY_FILE).read_text())
    except (OSError, ValueError):  # none yet, or cut short: it is made again from the files
        old = {}
    same_prompts = all(old.get(k) == summary.get(k) for k in ("inputs", "harmful_prompts"))
    judges = old.get("judges", {}) if same_prompts else {}
    judges[config.judge] = {"judge": judge_id, **asr_summary(judged, config.n_bootstrap, config.seed)}
    summary["judges"] = judges
    if "benign" in files:
        keyword = KeywordJudge()
        by_prompt: dict[str, list[bool]] = defaultdict(list)
        for row in _rows(files["benign"], GENERATED_FIELDS):
            if (row["id"], row["sample"]) in wanted["benign"]:
                by_prompt[row["id"]].append(keyword.refusal(row["response"]) is not None)
        refused = [float(np.mean(v)) for _, v in sorted(by_prompt.items())]
        summary["over_refusal"] = rate_summary(refused, config.n_bootstrap, config.seed)
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary


def _print_summary(summary: dict[str, Any], judge: str) -> None:
    asr = summary["judges"][judge]
    lo, hi = asr["ci95"]
    print(f"ASR ({judge} judge): {asr['rate']:.3f}  95% CI [{lo:.3f}, {hi:.3f}]  n={asr['n']} prompts"
          + (f", {asr['n_unparsed']} unparsed" if asr["n_unparsed"] else ""))
    for category, value in asr["per_category"].items():
        print(f"  {category}: {value['rate']:.3f} (n={value['n']})")
    if "over_refusal" in summary:
        o = summary["over_refusal"]
        print(f"over-refusal on benign prompts: {o['rate']:.3f}  95% CI [{o['ci95'][0]:.3f}, {o['ci95'][1]:.3f}]"
              f"  n={o['n']}")


def evaluate_cli(config: EvaluateConfig) -> int:
    evaluate(config)
    return 0
