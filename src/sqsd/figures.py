"""Figures from saved results (matplotlib, no pyplot, PNG). Every function reads data or files only, never a model.

Each `*_figure` returns a matplotlib Figure: `save_png` writes it as a file (what `sqsd train --track` and
`sqsd steer` leave beside their tables), `data_uri` embeds it in the report page (`sqsd.report`).

- `trajectory_figure`: the projection of the cumulative weight change on each tracked direction against the
  training step, with the ASR (and its 95% CI) where it was measured on a second axis — the paper's Figure 2.
- `steering_figure`: ASR against the steering coefficient α per direction with 95% CI error bars,
  over-refusal dashed — the paper's Figure 5.
- `histograms`, `length_scatter`: the distribution of each score column, and a score against response length.
- `subset_figure`: ASR per subset (windows S1..Sk, or top/random/bottom) per method with 95% CI bars, the base
  model's ASR as a band — the paper's main figure; `roc_figure`: ROC curves of the contamination test;
  `category_figure`: ASR per harm category.

A malformed input line is an SqsdError naming the file, the line and the field.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

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


def _figure(width: float = 7.0, height: float = 4.2, ncols: int | None = None) -> tuple[Any, Any]:
    """A figure and its axes: one, or with `ncols` a list of that many side by side."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), dpi=110)
    return fig, fig.subplots() if ncols is None else list(fig.subplots(1, ncols, squeeze=False)[0])


def save_png(fig: Any, output: str | Path) -> Path:
    """Write `fig` as a PNG file (its folder is created; a folder in its place names --output)."""
    from sqsd.runs import output_file

    output = output_file(Path(output), "--output")
    fig.tight_layout()
    fig.savefig(output, format="png")
    return output


def data_uri(fig: Any) -> str:
    """`fig` as a `data:image/png;base64,...` URI: a page that embeds it needs no other file."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


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
    """`trajectory_figure` of a trajectory.jsonl, as a PNG file."""
    return save_png(trajectory_figure(load_trajectory(path, metric), metric, Path(path).name), output)


def trajectory_figure(data: dict[str, Any], metric: str, source: str) -> Any:
    """Projection on each tracked direction vs step (`load_trajectory`); ASR on the right axis where measured."""
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
    ax.set_title(f"Drift along the directions ({source}, {metric})", fontsize="medium")
    return fig


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
    """`steering_figure` of a steering.jsonl, as a PNG file."""
    return save_png(steering_figure(load_steering(path), Path(path).name), output)


def steering_figure(data: dict[str, list[dict[str, Any]]], source: str) -> Any:
    """ASR vs α per direction (`load_steering`) with 95% CI error bars; over-refusal (where measured) dashed in
    the same colour."""
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
    ax.set_title(f"Safety along the directions ({source})", fontsize="medium")
    return fig


def histograms(columns: dict[str, list[float]]) -> Any:
    """One histogram per score column (`{name: values}`), side by side, each with its median marked."""
    fig, axes = _figure(width=min(3.2 * len(columns), 12.0), height=3.0, ncols=len(columns))
    for ax, (name, values) in zip(axes, columns.items()):
        ax.hist(values, bins=min(60, max(10, len(values) // 20)), color="#4c72b0")
        ax.axvline(sorted(values)[len(values) // 2], color="black", linewidth=0.8, linestyle=":")
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("value (dotted: median)", fontsize="small")
    axes[0].set_ylabel("samples")
    return fig


def length_scatter(lengths: list[float], scores: list[float], name: str, rho: float) -> Any:
    """A score against the response length in tokens, with Spearman's ρ in the title."""
    fig, ax = _figure(width=6.0, height=3.6)
    ax.scatter(lengths, scores, s=6, alpha=0.5, color="#4c72b0", linewidths=0)
    ax.set_xlabel("response tokens")
    ax.set_ylabel(name)
    ax.set_title(f"{name} vs response length: Spearman ρ = {rho:+.3f}", fontsize="medium")
    return fig


def subset_figure(panels: dict[str, tuple[list[str], dict[str, dict[str, tuple[float, float, float]]]]],
                  base: tuple[float, float, float] | None) -> Any:
    """ASR per subset per method with 95% CI bars, one panel per protocol: `panels[protocol]` = (the subsets in
    order along x, {method: {subset: (value, lo, hi)}}); the base model's ASR (value, lo, hi) as a grey line and
    band across every panel."""
    fig, axes = _figure(width=min(6.0 * len(panels), 12.0), height=3.8, ncols=len(panels))
    for ax, (protocol, (subsets, methods)) in zip(axes, panels.items()):
        width = 0.8 / max(1, len(methods))
        if base is not None:
            ax.axhspan(base[1], base[2], color="0.85")
            ax.axhline(base[0], color="0.4", linestyle="--", linewidth=1, label="base model")
        for i, (method, by) in enumerate(methods.items()):
            xs = [subsets.index(s) + (i - (len(methods) - 1) / 2) * width for s in by]
            values = [v[0] for v in by.values()]
            err = [[v[0] - v[1] for v in by.values()], [v[2] - v[0] for v in by.values()]]
            ax.errorbar(xs, values, yerr=err, marker="o", linestyle="none", capsize=3, label=method)
        ax.set_xticks(range(len(subsets)), subsets)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(protocol, fontsize="medium")
        ax.set_xlabel("subset (S1 / top = riskiest by the method)")
    axes[0].set_ylabel("ASR after fine-tuning (95% CI)")
    axes[-1].legend(loc="best", fontsize="small")
    return fig


def roc_figure(curves: dict[str, dict[str, tuple[list[float], list[float]]]]) -> Any:
    """ROC curves, one panel per contamination ratio: `curves[ratio][method]` = (false, true positive rates)."""
    fig, axes = _figure(width=min(4.2 * len(curves), 12.6), height=3.8, ncols=len(curves))
    for ax, (ratio, methods) in zip(axes, curves.items()):
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle=":")
        for method, (fpr, tpr) in methods.items():
            ax.plot(fpr, tpr, label=method, drawstyle="default")
        ax.set_title(f"{ratio} injected", fontsize="medium")
        ax.set_xlabel("false positive rate")
        ax.set_aspect("equal")
    axes[0].set_ylabel("true positive rate (injected found)")
    axes[-1].legend(loc="lower right", fontsize="small")
    return fig


def category_figure(rates: dict[str, tuple[float, int]], overall: tuple[float, float, float]) -> Any:
    """ASR per harm category (`{category: (rate, n prompts)}`) as bars, the overall ASR and its CI as a band."""
    fig, ax = _figure(width=7.0, height=0.3 * len(rates) + 1.4)
    names = list(rates)
    ax.axvspan(overall[1], overall[2], color="0.88")
    ax.axvline(overall[0], color="0.3", linestyle="--", linewidth=1, label=f"all prompts {overall[0]:.3f}")
    ax.barh(range(len(names)), [rates[n][0] for n in names], color="#c44e52")
    ax.set_yticks(range(len(names)), [f"{n} (n={rates[n][1]})" for n in names], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("ASR")
    ax.legend(loc="lower right", fontsize="small")
    return fig
