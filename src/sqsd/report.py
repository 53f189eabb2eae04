"""Figures from saved results (matplotlib, PNG). Every function reads files only, never a model.

- `plot_trajectory(trajectory.jsonl, out.png)`: the projection of the cumulative weight change on each tracked
  direction against the training step, with the ASR (and its 95% CI) where it was measured on a second axis —
  the paper's Figure 2 (`sqsd train --track`).
- `plot_steering(steering.jsonl, out.png)`: ASR against the steering coefficient α per direction with 95% CI
  error bars, over-refusal dashed — the paper's Figure 5 (`sqsd steer`).

A malformed input line is an SqsdError naming the file, the line and the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sqsd.config import ReportSteeringConfig, ReportTrajectoryConfig
from sqsd.errors import SqsdError

METRIC_LABELS = {"cosine-sum": "Σ_m cos(ΔW_m, T_m)", "projection": "⟨ΔW, T⟩ / ‖T‖", "cosine": "cos(ΔW, T)"}


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error."""
    path = Path(path)
    if not path.is_file():
        raise SqsdError(f"{path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise SqsdError(f"{path}:{number}: not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise SqsdError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise SqsdError(f"{path} is empty")
    return rows


def _number(path: Path, number: int, row: dict[str, Any], key: str, optional: bool = False) -> float | None:
    value = row.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "missing" if key not in row else f"not a number ({value!r})"
        raise SqsdError(f"{path}:{number}: field '{key}': {what}")
    return float(value)


def _ci(path: Path, number: int, row: dict[str, Any], key: str) -> tuple[float, float] | None:
    value = row.get(key)
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise SqsdError(f"{path}:{number}: field '{key}': expected [low, high], got {value!r}")
    return float(value[0]), float(value[1])


def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), dpi=120)
    return fig, fig.subplots()


def _save(fig: Any, output: str | Path) -> Path:
    from sqsd.runs import output_file

    output = output_file(Path(output), "--output")
    fig.tight_layout()
    fig.savefig(output, format="png")
    return output


def load_trajectory(path: str | Path, metric: str = "cosine-sum") -> dict[str, Any]:
    """{"steps": {direction: [(step, value)]}, "asr": [(step, asr, (lo, hi) | None)]} from a trajectory.jsonl."""
    if metric not in METRIC_LABELS:
        raise SqsdError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_LABELS)}")
    path = Path(path)
    series: dict[str, list[tuple[float, float]]] = {}
    asr: list[tuple[float, float, tuple[float, float] | None]] = []
    for number, row in read_jsonl(path):
        step = _number(path, number, row, "step")
        for key, value in row.items():
            if isinstance(value, dict):
                series.setdefault(key, []).append((step, _number(path, number, value, metric)))
        if "asr" in row:
            asr.append((step, _number(path, number, row, "asr"), _ci(path, number, row, "asr_ci")))
    if not series:
        raise SqsdError(f"{path}: no tracked direction in any line (expected fields like "
                        f'"danger": {{"{metric}": ...}})')
    return {"series": series, "asr": asr}


def plot_trajectory(path: str | Path, output: str | Path, metric: str = "cosine-sum") -> Path:
    """Projection on each tracked direction vs step; ASR on the right axis where measured."""
    data = load_trajectory(path, metric)
    fig, ax = _figure()
    for name, points in data["series"].items():
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, marker="." if len(steps) < 60 else None, label=name)
    ax.axhline(0.0, color="0.7", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{metric}: {METRIC_LABELS[metric]}")
    handles, labels = ax.get_legend_handles_labels()
    if data["asr"]:
        right = ax.twinx()
        points = sorted(data["asr"], key=lambda p: p[0])
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        low = [p[1] - p[2][0] if p[2] else 0.0 for p in points]
        high = [p[2][1] - p[1] if p[2] else 0.0 for p in points]
        right.errorbar(steps, values, yerr=[low, high], color="black", marker="s", linestyle=":", capsize=3,
                       label="ASR (95% CI)")
        right.set_ylabel("attack success rate")
        right.set_ylim(-0.02, 1.02)
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="best", fontsize="small")
    ax.set_title(f"Drift along the directions ({Path(path).name})", fontsize="medium")
    return _save(fig, output)


def load_steering(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """{direction: rows sorted by alpha} from a steering.jsonl, each row checked."""
    path = Path(path)
    out: dict[str, list[dict[str, Any]]] = {}
    for number, row in read_jsonl(path):
        name = row.get("direction")
        if not isinstance(name, str) or not name:
            raise SqsdError(f"{path}:{number}: field 'direction': expected a name, got {name!r}")
        point = {"alpha": _number(path, number, row, "alpha"), "asr": _number(path, number, row, "asr"),
                 "ci_low": _number(path, number, row, "ci_low", optional=True),
                 "ci_high": _number(path, number, row, "ci_high", optional=True),
                 "over_refusal": _number(path, number, row, "over_refusal", optional=True)}
        out.setdefault(name, []).append(point)
    return {name: sorted(rows, key=lambda r: r["alpha"]) for name, rows in out.items()}


def plot_steering(path: str | Path, output: str | Path) -> Path:
    """ASR vs α per direction with 95% CI error bars; over-refusal (where measured) dashed in the same colour."""
    data = load_steering(path)
    fig, ax = _figure()
    for name, rows in data.items():
        alphas = [r["alpha"] for r in rows]
        asr = [r["asr"] for r in rows]
        low = [r["asr"] - r["ci_low"] if r["ci_low"] is not None and not math.isnan(r["ci_low"]) else 0.0
               for r in rows]
        high = [r["ci_high"] - r["asr"] if r["ci_high"] is not None and not math.isnan(r["ci_high"]) else 0.0
                for r in rows]
        line = ax.errorbar(alphas, asr, yerr=[low, high], marker="o", capsize=3, label=f"{name}: ASR")
        refusal = [(r["alpha"], r["over_refusal"]) for r in rows if r["over_refusal"] is not None]
        if refusal:
            ax.plot(*zip(*refusal), linestyle="--", marker="x", color=line.lines[0].get_color(),
                    label=f"{name}: over-refusal")
    ax.axvline(0.0, color="0.7", linewidth=0.8)
    ax.set_xlabel("steering coefficient α  (θ₀ + α·s·T)")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(f"Safety along the directions ({Path(path).name})", fontsize="medium")
    return _save(fig, output)


def report_trajectory_cli(config: ReportTrajectoryConfig) -> int:
    out = plot_trajectory(config.file, config.output or Path(config.file).with_suffix(".png"), config.metric)
    print(f"wrote {out}")
    return 0


def report_steering_cli(config: ReportSteeringConfig) -> int:
    out = plot_steering(config.file, config.output or Path(config.file).with_suffix(".png"))
    print(f"wrote {out}")
    return 0
