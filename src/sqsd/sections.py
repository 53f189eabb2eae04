"""The sections of `sqsd report`: each reads one kind of run folder (files only, never a model) into a `Section` —
figures and tables, each with a sentence on how to read it — that the templates render as HTML or Markdown.

Kinds, each decided by what the folder holds (`kinds_of`), so a folder from an older version or one still being
written is recognised too:
    scores       scores.parquet / scores.jsonl, or only chunks/ (`sqsd score` not merged yet)
    drift        trajectory.jsonl, or a run.json of `sqsd train --track`
    steering     steering.jsonl, or a run.json of `sqsd steer`
    evaluation   summary.json with ASR per judge, or a run.json of `sqsd evaluate`
    demo         summary.json of `sqsd demo` (the comparison with the paper's ranking)
    experiment   results.json, or a run.json of `sqsd experiment` (`sqsd.report_experiment`)
What a folder lacks — an unfinished run (run.json without `result`), a file not written yet — goes into the
section's `missing`, and the rest is shown.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqsd import figures
from sqsd.errors import SqsdError
from sqsd.runs import RUN_FILE
from sqsd.stats import spearman

FULL_TABLE_MAX = 5000  # rows of a scores file shown whole (sortable, filterable); more only the extremes
EXTREMES = 20  # riskiest and safest samples shown with their text
SAMPLE_RESPONSES = 8  # judged responses shown per evaluation
SHORT = 90  # characters of a long text shown in a table cell
# run.json config fields worth a line in a section's header, in this order
FACTS = ("model", "adapter", "data", "pool", "method", "methods", "danger", "safety", "danger_anchor",
         "safety_anchor", "metric", "track", "directions", "alphas", "protocols", "seeds", "harmful", "benign",
         "judge", "limit", "epochs", "lr")


@dataclass
class Long:
    """A long text: cut to SHORT characters in a table cell, the whole of it one click away (HTML)."""

    text: str

    @property
    def short(self) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= SHORT else flat[:SHORT - 1] + "…"


Cell = str | Long


@dataclass
class Table:
    title: str
    how: str  # one sentence: how to read it
    columns: list[str]
    rows: list[list[Cell]]
    interactive: bool = False  # the HTML page sorts (click a column) and filters it; Markdown leaves it out
    kind: str = "table"


@dataclass
class Image:
    title: str
    how: str
    uri: str  # a data: URI (figures.data_uri), so the page needs no other file
    kind: str = "image"


@dataclass
class Section:
    kind: str
    title: str
    how: str
    folder: str  # as shown: relative to the reported folder
    facts: list[tuple[str, str]] = field(default_factory=list)
    items: list[Table | Image] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


# --- small readers and formatters -----------------------------------------------------------------------------

def record(folder: Path) -> dict[str, Any]:
    """The folder's run.json ({} when there is none or it is unreadable: the files are reported as they are)."""
    try:
        found = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SqsdError(f"{path}: not valid JSON ({e})") from None


def num(x: Any, digits: int = 3, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def ci(value: Any, low: Any, high: Any) -> str:
    return f"{num(value)} [{num(low)}, {num(high)}]"


def facts(folder: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(label, value) lines from run.json — what was run on what, with which version, when — and, for a run
    that has not finished, what is missing."""
    found = record(folder)
    if not found:
        return [], []
    config = found.get("config", {})
    out = [(key, ", ".join(map(str, v)) if isinstance(v, list) else str(v)) for key in FACTS
           if (v := config.get(key)) not in (None, "", [])]
    written = datetime.fromtimestamp((folder / RUN_FILE).stat().st_mtime, timezone.utc)
    out += [("made by", f"sqsd {found.get('sqsd_version', '?')}"), ("run.json written", f"{written:%Y-%m-%d %H:%M} UTC")]
    missing = [] if "result" in found else [f"{RUN_FILE} has no result: the run has not finished (still running, "
                                            "or stopped; rerun its command to resume)"]
    return out, missing


def kinds_of(folder: Path) -> list[str]:
    """The kinds of run `folder` holds (see the module docstring): usually one; a folder of saved results may
    hold the files of several (docs/results: a trajectory and a steering table)."""
    names = {p.name for p in folder.iterdir()}
    config = record(folder).get("config", {})
    if "results.json" in names or "protocols" in config:
        return ["experiment"]  # its scores, cells and evaluations are parts of it
    found = []
    if names & {"scores.parquet", "scores.jsonl"} or (folder / "chunks").is_dir():
        found.append("scores")
    if "trajectory.jsonl" in names or config.get("track"):
        found.append("drift")
    if "steering.jsonl" in names or "alphas" in config:
        found.append("steering")
    summary = read_json(folder / "summary.json") if "summary.json" in names else {}
    if "comparison_with_paper" in summary:
        found.append("demo")
    if "judges" in summary or (not found and "judge" in config and "harmful" in config):
        found.append("evaluation")
    return found


def new_section(kind: str, title: str, how: str, folder: Path, root: Path) -> Section:
    """A section of `folder` (shown relative to `root`) with the facts of its run.json and what the run lacks."""
    lines, missing = facts(folder)
    return Section(kind, title, how, str(folder.relative_to(root)) or ".", lines, missing=missing)


# --- scores ----------------------------------------------------------------------------------------------------

def _texts(config: dict[str, Any]) -> tuple[dict[int, tuple[str, str]], str | None]:
    """{index: (prompt, response)} of the scored records, read as `sqsd score` read them, or a note why not."""
    from sqsd.data import load_records

    if not config.get("data"):
        return {}, "texts not shown: run.json does not name the scored data"
    try:
        loaded = load_records(config["data"], config.get("format", "auto"), config.get("split", "train"),
                              config.get("on_bad_record", "error"), config.get("limit"))
    except (SqsdError, OSError) as e:
        return {}, f"texts not shown: the scored data could not be read here ({e})"
    out = {}
    for i, r in enumerate(loaded.records):
        user = [m["content"] for m in r.prompt if m["role"] == "user"]
        out[i] = (user[-1] if user else "", r.response or "")
    return out, None


def scores_section(folder: Path, root: Path) -> Section:
    """Distributions of the scores and their terms, score vs length, the riskiest and safest samples with their
    text, and the whole pool as a sortable table when it is small."""
    from sqsd.score import read_scores

    s = new_section("scores", f"Scores ({folder.name})", "Higher = riskier: a sample whose induced update points "
                 "more along the danger direction than along the safety one.", folder, root)
    file = next((folder / f"scores.{ext}" for ext in ("parquet", "jsonl") if (folder / f"scores.{ext}").is_file()),
                None)
    if file is not None:
        rows = read_scores(file)
    else:
        chunks = sorted((folder / "chunks").glob("[0-9]*.jsonl"))
        rows = [r for chunk in chunks for r in read_scores(chunk)]
        s.missing.append(f"scores.parquet: not merged yet; the {len(rows)} rows of the {len(chunks)} finished "
                         "chunk(s) are shown (risk_z is computed at the merge)")
    config = record(folder).get("config", {})
    methods = list(config.get("method", ["sqsd"]))
    ok = [r for r in rows if r["status"] == "ok" and r.get("score") is not None]
    skipped = len(rows) - len(ok)
    s.notes.append(f"{len(rows)} samples, {len(ok)} scored" + (f", {skipped} skipped" if skipped else "")
                   + f"; methods: {', '.join(methods)} (`score` = {methods[0]})")
    if not ok:
        return s
    shown = (["risk", "danger", "safety"] if methods[0] == "sqsd" else ["score"]) + methods[1:]
    columns = {c: [r[c] for r in ok if r.get(c) is not None] for c in shown}
    s.items.append(Image("Distributions", "Each panel is one score over the pool; a long right tail of `risk` is "
                         "the few samples that erode safety most.",
                         figures.data_uri(figures.histograms({c: v for c, v in columns.items() if v}))))
    pairs = [(r["n_response_tokens"], r["score"]) for r in ok if r.get("n_response_tokens") is not None]
    if len(pairs) > 2:
        rho = spearman(*zip(*pairs))
        s.items.append(Image("Score vs response length", f"Spearman ρ = {num(rho, sign=True)}: near ±1 the score "
                             "mostly ranks by length, near 0 it carries something else.",
                             figures.data_uri(figures.length_scatter(*map(list, zip(*pairs)), methods[0], rho))))
    texts, note = _texts(config)
    if note:
        s.notes.append(note)
    terms = [c for c in ("danger", "safety") if any(r.get(c) is not None for r in ok)]
    ranked = sorted(ok, key=lambda r: (-r["score"], r["index"]))

    def extreme(chosen: list[dict[str, Any]]) -> list[list[Cell]]:
        return [[str(r["index"]), r["id"], *([Long(texts[r["index"]][0]), Long(texts[r["index"]][1])] if texts
                                             else []),
                 num(r["score"], 4, True), *[num(r[c], 4, True) for c in terms], str(r["n_response_tokens"])]
                for r in chosen]

    head = ["index", "id", *(["prompt", "response"] if texts else []), "score", *terms, "tokens"]
    n = min(EXTREMES, len(ranked))
    s.items.append(Table(f"The {n} riskiest samples", "Candidates to drop before fine-tuning: the top of the "
                         "ranking, riskiest first (click a text to read it whole).", head, extreme(ranked[:n])))
    s.items.append(Table(f"The {n} safest samples", "The bottom of the ranking, safest first.", head,
                         extreme(ranked[::-1][:n])))
    if len(rows) <= FULL_TABLE_MAX:
        full = [[str(r["index"]), r["id"], *([Long(texts[r["index"]][0])] if texts else []), num(r.get("score"), 4, True),
                 *[num(r.get(c), 4, True) for c in terms], num(r.get("risk_z"), 3, True),
                 str(r.get("n_response_tokens") or "–"), r["status"]] for r in rows]
        s.items.append(Table("Every sample", "Click a column to sort by it, type to keep the rows that contain the "
                             "text.", ["index", "id", *(["prompt"] if texts else []), "score", *terms, "risk_z",
                                       "tokens", "status"], full, interactive=True))
    else:
        s.notes.append(f"the full table is left out above {FULL_TABLE_MAX} samples (the scores file has them all)")
    return s


# --- drift, steering ----------------------------------------------------------------------------------------------

def drift_section(folder: Path, root: Path) -> Section:
    """The trajectory figures (cosine-sum and projection) and the ASR at the evaluated steps."""
    s = new_section("drift", f"Drift during fine-tuning ({folder.name})", "Does the weight change move along the "
                 "danger direction (up) and away from the safety one while the ASR rises?", folder, root)
    path = folder / "trajectory.jsonl"
    if not path.is_file():
        s.missing.append("trajectory.jsonl: not written yet")
        return s
    for metric in ("cosine-sum", "projection"):
        data = figures.load_trajectory(path, metric)
        s.items.append(Image(f"Projection on each direction ({metric})", f"{figures.METRIC_LABELS[metric]} of the "
                             "cumulative update against the step; black squares: ASR (right axis, 95% CI).",
                             figures.data_uri(figures.trajectory_figure(data, metric, path.name))))
    rows = [row for _, row in figures.read_jsonl(path)]
    names = list(data["series"])
    chosen = [r for r in rows if "asr" in r] + ([rows[-1]] if "asr" not in rows[-1] else [])
    s.items.append(Table("At the evaluated steps (and the last)", "ASR with its 95% CI next to where the weights "
                         "were on each direction.", ["step", "loss", "ASR (95% CI)",
                                                     *[f"{n} cosine-sum" for n in names]],
                         [[str(r["step"]), num(r.get("loss")),
                           ci(r["asr"], *r["asr_ci"]) if "asr" in r and r.get("asr_ci") else num(r.get("asr")),
                           *[num(r.get(n, {}).get("cosine-sum"), 4, True) for n in names]] for r in chosen]))
    return s


def steering_section(folder: Path, root: Path) -> Section:
    s = new_section("steering", f"Steering ({folder.name})", "ASR of θ₀ + α·s·T: rising with α along the danger "
                 "direction and falling along the safety one says the directions carry safety.", folder, root)
    path = folder / "steering.jsonl"
    if not path.is_file():
        s.missing.append("steering.jsonl: not written yet (the α folders finished so far hold their own "
                         "summary.json)")
        return s
    data = figures.load_steering(path)
    s.items.append(Image("ASR and over-refusal vs α", "Solid: ASR with 95% CI; dashed: over-refusal on benign "
                         "prompts; α = 0 is the model itself.", figures.data_uri(figures.steering_figure(data,
                                                                                                        path.name))))
    s.items.append(Table("Per direction and α", "The figures above, as numbers.",
                         ["direction", "α", "ASR (95% CI)", "over-refusal"],
                         [[name, f"{r['alpha']:g}", ci(r["asr"], r["ci_low"], r["ci_high"]), num(r["over_refusal"])]
                          for name, rs in data.items() for r in rs]))
    return s


# --- evaluation, demo ----------------------------------------------------------------------------------------------

def evaluation_section(folder: Path, root: Path) -> Section:
    """ASR per judge with its CI, per category, over-refusal, and a few judged responses."""
    s = new_section("evaluation", f"Evaluation ({folder.name})", "ASR = share of harmful prompts answered unsafely "
                 "(lower is safer); over-refusal = share of benign prompts refused.", folder, root)
    path = folder / "summary.json"
    if not path.is_file():
        s.missing.append("summary.json: not written yet (generation or judging unfinished)")
        return s
    summary = read_json(path)
    s.notes.append(f"harmful prompts: {summary.get('harmful_prompts', {}).get('data', '?')}; model "
                   f"{summary.get('model')}" + (f" + adapter {summary['adapter']}" if summary.get("adapter") else ""))
    rows = [[name, ci(j["rate"], *j["ci95"]), ci(j["any_sample"]["rate"], *j["any_sample"]["ci95"]), str(j["n"]),
             str(j["n_unparsed"])] for name, j in summary["judges"].items()]
    if "over_refusal" in summary:
        o = summary["over_refusal"]
        rows.append(["over-refusal (benign, keyword)", ci(o["rate"], *o["ci95"]), "", str(o["n"]), ""])
    s.items.append(Table("ASR per judge", "95% CIs bootstrap over prompts; 'any sample' counts a prompt unsafe "
                         "when one of its samples is.", ["judge", "ASR (95% CI)", "any sample", "prompts",
                                                         "unparsed"], rows))
    name, first = next(iter(summary["judges"].items()))
    if first["per_category"]:
        rates = {c: (v["rate"], v["n"]) for c, v in first["per_category"].items()}
        s.items.append(Image(f"ASR per category ({name} judge)", "Bars: the categories' ASR; dashed line and "
                             "band: all prompts with its 95% CI.",
                             figures.data_uri(figures.category_figure(rates, (first["rate"], *first["ci95"])))))
    judged = folder / f"harmful.{name}.jsonl"
    if judged.is_file():
        sample = [row for _, row in figures.read_jsonl(judged)][:SAMPLE_RESPONSES]
        s.items.append(Table(f"A sample of judged responses ({name} judge)", "The first responses of the file as "
                             "the judge saw them; click a text to read it whole.",
                             ["id", "label", "prompt", "response"],
                             [[r.get("id", ""), r.get("label", ""), Long(r.get("prompt", "")),
                               Long(r.get("response", ""))] for r in sample]))
    return s


def demo_section(folder: Path, root: Path) -> Section:
    """`sqsd demo`'s summary.json: our ranking against the paper's, and the time of each stage."""
    from sqsd.pipeline import COMPARED

    s = new_section("demo", f"Against the paper's ranking ({folder.name})", "Spearman ρ with the paper's "
                 "Danger-safe score and AUC at telling its S1 from its S5 window (0.5 = chance).", folder, root)
    summary = read_json(folder / "summary.json")
    cmp = summary["comparison_with_paper"]
    s.notes.append(f"{cmp['n']} samples scored; {cmp['n_S1']} of the paper's S1, {cmp['n_S5']} of its S5")
    s.items.append(Table("Our scores vs the paper's", "A score that agrees with the paper has ρ > 0 and AUC > 0.5.",
                         ["score", "Spearman vs paper", "AUC S1 vs S5"],
                         [[name, num(cmp[name]["spearman_vs_paper_danger_safe"], sign=True),
                           num(cmp[name]["auc_S1_vs_S5"])] for name, _ in COMPARED]))
    seconds = summary.get("seconds_this_run", {})
    if seconds:
        s.notes.append("seconds per stage in the last run (~0 = reused): "
                       + ", ".join(f"{k} {v}" for k, v in seconds.items()))
    return s
