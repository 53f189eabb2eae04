"""`sqsd report RUN_DIR`: one self-contained page of what a run folder holds, that a person reads instead of JSON.

The folder, and its subfolders a few levels down (the demo folder holds several runs), are searched for the
kinds of run `sections.kinds_of` knows; each found gets its section (`sections`, `report_experiment`), in the
order experiment, scores, demo, drift, steering, evaluation. A run that owns its subfolders (an experiment's
cells, a steering run's α folders, an evaluation's files, a score run's chunks) is one section, not many.

Output: RUN_DIR/report/index.html (or --output), rendered from the jinja2 templates of `sqsd/templates/`:
figures as base64 PNGs, CSS and a few lines of script (sort and filter the full table) inline, nothing fetched,
so the file opens from disk anywhere. `--format md` writes the same tables as Markdown (index.md), without the
figures and the full table, for CI logs and pull requests.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from sqsd import __version__
from sqsd.config import ReportConfig
from sqsd.errors import SqsdError
from sqsd.report_experiment import experiment_section
from sqsd.runs import RUN_FILE, output_file
from sqsd.sections import (
    Section,
    Table,
    demo_section,
    drift_section,
    evaluation_section,
    facts,
    kinds_of,
    record,
    scores_section,
    steering_section,
)

BUILDERS: dict[str, Callable[[Path, Path], Section]] = {
    "experiment": experiment_section, "scores": scores_section, "demo": demo_section, "drift": drift_section,
    "steering": steering_section, "evaluation": evaluation_section}
OWNERS = ("experiment", "scores", "steering", "evaluation")  # kinds whose subfolders are parts of them
DEPTH = 3  # how far below RUN_DIR runs are looked for (the demo's scores: scores-nN/scores)
REPORT_DIR = "report"


def find_runs(folder: Path, depth: int = 0) -> list[tuple[str, Path]]:
    """(kind, folder) of every reportable run in `folder` and below, parents before their subfolders."""
    kinds = kinds_of(folder)
    found = [(kind, folder) for kind in kinds]
    if set(kinds) & set(OWNERS) or depth == DEPTH:
        return found
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != REPORT_DIR
                        and not p.name.startswith(".")):
        found += find_runs(child, depth + 1)
    return found


def _run_folders(folder: Path, depth: int = 0) -> list[Path]:
    """Every folder with a run.json up to DEPTH below `folder` (not inside one that has one)."""
    if (folder / RUN_FILE).is_file():
        return [folder]
    if depth == DEPTH:
        return []
    return [f for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            for f in _run_folders(child, depth + 1)]


def build(run_dir: str | Path) -> dict:
    """What the templates render: the header and the sections of `run_dir`."""
    root = Path(run_dir)
    if not root.is_dir():
        raise SqsdError(f"{root}: not a folder; give a run folder (the --output-dir of an sqsd command)")
    runs = find_runs(root)
    if not runs:
        raise SqsdError(f"{root} holds nothing sqsd report can show: no scores file, results.json, "
                        "trajectory.jsonl, steering.jsonl, evaluation or demo summary.json in it or the "
                        f"{DEPTH} levels of folders below it")
    order = list(BUILDERS)
    sections = [BUILDERS[kind](folder, root) for kind, folder in sorted(runs, key=lambda r: order.index(r[0]))]
    reported: dict[Path, list[str]] = {}
    for kind, folder in runs:
        reported.setdefault(folder, []).append(kind)
    # the folder's own run.json, unless its section shows it
    lines, missing = facts(root) if root not in reported else ([], [])
    written = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by sqsd {__version__}"
    header = Section("header", f"sqsd report: {root.resolve().name}", "What was run, on what, and what the folder "
                     "holds; each section below says how to read it.", str(root),
                     [("folder", str(root)), ("report written", written), *lines], missing=missing)
    inside = [f for f in _run_folders(root) if f != root]
    if inside:
        header.items.append(Table("Runs in this folder", "Every run folder found, whether its command finished, "
                                  "and the section that shows it.", ["folder", "finished", "section"],
                                  [[str(f.relative_to(root)), "yes" if "result" in record(f) else "no",
                                    ", ".join(reported.get(f, ["–"]))] for f in inside]))
    return {"header": header, "sections": sections}


def render(page: dict, fmt: str) -> str:
    """The page as HTML or Markdown, from the package's templates."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("sqsd", "templates"),
                             autoescape=jinja2.select_autoescape(["html.j2"]), trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["md"] = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
    return env.get_template(f"report.{fmt}.j2").render(**page)


def report(config: ReportConfig) -> Path:
    """Write the report of `config.run_dir` (see the module docstring); returns its path."""
    page = build(config.run_dir)
    output = Path(config.output or Path(config.run_dir) / REPORT_DIR / f"index.{config.format}")
    output = output_file(output, "--output")
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(render(page, config.format), encoding="utf-8")
    tmp.replace(output)
    kinds = ", ".join(f"{s.kind} ({s.folder})" for s in page["sections"])
    print(f"wrote {output} ({output.stat().st_size / 1024:.0f} KiB): {kinds}")
    return output


def report_cli(config: ReportConfig) -> int:
    report(config)
    return 0
