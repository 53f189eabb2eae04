"""`sqsd steer`: the safety of θ₀ + α·s·T for a grid of α, per direction (docs/design.md §2, mechanism
analysis (b)).

For each direction T and each α, the weights of the direction's modules become W_m + α·s·T_m in memory, the
model is evaluated exactly as `sqsd evaluate` does (same generation, judge, ASR with bootstrap CI, over-refusal),
and the original weights are copied back. s is the direction's scaling (`meta["scaling"]`: the LoRA adapter's
alpha/r, recorded when the direction was built from an adapter; 1.0 when absent, e.g. a dense direction), so
α = 1 reproduces the adapter merged into the model, α = 0 is the base model, and negative α steers away.

Output folder:
    <direction stem>/alpha_<α>/   an `sqsd evaluate` folder (generations, judgments, summary.json) whose
                                  run.json also records the direction file, α and scaling; reruns reuse it
    steering.jsonl, steering.csv  one row per (direction, α): direction, kind, alpha, scaling, asr, ci_low,
                                  ci_high, over_refusal, n
    steering.png                  ASR vs α per direction (`figures.plot_steering`)

The model is loaded once, and only if some generation is missing. Steering never subtracts: the touched
weights are copied (to CPU) before the first change and copied back after each α, so the model returns to θ₀
bit for bit.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sqsd.config import EvaluateConfig, SteerConfig
from sqsd.directions import Direction, check, load
from sqsd.errors import SqsdError
from sqsd.fingerprints import fingerprint, model_fingerprint
from sqsd.options import EvalArgs, ModelArgs, OverwriteArgs
from sqsd.runs import on_main, open_run

TABLE = "steering"
FIELDS = ("direction", "kind", "alpha", "scaling", "asr", "ci_low", "ci_high", "over_refusal", "n")


def scaling_of(direction: Direction) -> float:
    """The factor s with which α = 1 reproduces the direction's adapter (1.0 when it did not come from one)."""
    return float(direction.meta.get("scaling", 1.0))


def alpha_folder(alpha: float) -> str:
    return f"alpha_{alpha:g}"


@contextmanager
def steered(model: torch.nn.Module, direction: Direction, coefficient: float) -> Iterator[torch.nn.Module]:
    """The model with W_m ← W_m + coefficient·T_m on the direction's modules, restored bit for bit on exit.

    The sum is formed in float32 (float64 for a float64 model) and cast to the weight's dtype. `coefficient` is
    α·s: pass `alpha * scaling_of(direction)` to steer by α.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [n for n in direction.modules if n not in linears]
    if missing:
        raise SqsdError(f"the model has no linear layer {missing[0]} (named by the direction)")
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, term in direction.modules.items():
                weight = linears[name].weight
                saved[name] = weight.detach().to("cpu", copy=True)
                if coefficient == 0:
                    continue
                dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
                new = weight.detach().to(dtype) + coefficient * term.to(dtype, weight.device).dense()
                weight.copy_(new.to(weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                linears[name].weight.copy_(original)


class _Base:
    """The base model, loaded at the first need, and the directions checked against it then."""

    def __init__(self, config: SteerConfig, directions: dict[str, Direction], model_fp: str):
        self.config, self.directions, self.model_fp = config, directions, model_fp
        self.pair: tuple[Any, Any] | None = None

    def get(self) -> tuple[Any, Any]:
        if self.pair is None:
            from sqsd.model import load_model

            model, tokenizer = load_model(self.config.model, self.config.dtype, self.config.device)
            for path, direction in self.directions.items():
                try:
                    check(direction, model, self.model_fp)
                except SqsdError as e:
                    raise SqsdError(f"{path}: {e}") from e
            self.pair = (model, tokenizer)
        return self.pair


def _names(paths: tuple[str, ...]) -> list[str]:
    names = [Path(p).stem for p in paths]
    for name in names:
        if names.count(name) > 1:
            raise SqsdError(f"two direction files are both named {name!r}; rename one (the file stem names its "
                            "output folder)")
    return names


def steer(config: SteerConfig) -> list[dict[str, Any]]:
    """Run (or resume) the steering grid of `config`; returns the table rows (also in steering.jsonl/.csv).
    Rank 0 only under a launcher."""
    return on_main(lambda: _steer(config), config.device)


def _steer(config: SteerConfig) -> list[dict[str, Any]]:
    from sqsd.evaluate import evaluate

    out = Path(config.output_dir)
    names = _names(config.directions)
    directions = {path: load(path) for path in config.directions}
    # the grid may grow (more directions or alphas): each (direction, alpha) folder checks its own inputs
    with open_run(out, config, lambda: {"model": model_fingerprint(config.model)}, overwrite=config.overwrite,
                  input_fields=("model", "directions"), ignore=("alphas",)) as run:
        base = _Base(config, directions, run.inputs["model"])
        rows: list[dict[str, Any]] = []
        for name, path in zip(names, config.directions):
            direction = directions[path]
            s = scaling_of(direction)
            steering = {"direction": fingerprint(path), "scaling": s}
            for alpha in config.alphas:
                folder = out / name / alpha_folder(alpha)
                print(f"== {name}: alpha {alpha:g} (W + {alpha * s:g}·T) -> {folder}", flush=True)
                summary = _evaluate_steered(config, folder, base, direction, alpha * s, evaluate,
                                            {**steering, "alpha": alpha})
                rows.append(_row(name, direction, alpha, s, summary, config.judge))
                _write_table(out, rows)
        _print_table(rows)
        from sqsd.figures import plot_steering

        png = plot_steering(out / f"{TABLE}.jsonl", out / f"{TABLE}.png")
        run.finish({"rows": len(rows), "table": f"{TABLE}.jsonl"})
    print(f"table: {out / f'{TABLE}.jsonl'} (.csv)   plot: {png}")
    return rows


def _evaluate_steered(config: SteerConfig, folder: Path, base: _Base, direction: Direction, coefficient: float,
                      evaluate: Any, steering: dict[str, Any]) -> dict[str, Any]:
    shared = {f.name: getattr(config, f.name) for group in (ModelArgs, EvalArgs, OverwriteArgs)
              for f in dataclasses.fields(group)}
    eval_config = EvaluateConfig(output_dir=str(folder), **{**shared, "benign": config.benign or None})
    with _Steering(base, direction, coefficient) as get_model:
        return evaluate(eval_config, get_model, steering)


class _Steering:
    """A `get_model` for `evaluate` that steers the base model on first use; leaving restores θ₀."""

    def __init__(self, base: _Base, direction: Direction, coefficient: float):
        self.base, self.direction, self.coefficient = base, direction, coefficient
        self.context: Any = None

    def __call__(self) -> tuple[Any, Any]:
        model, tokenizer = self.base.get()
        if self.context is None:
            self.context = steered(model, self.direction, self.coefficient)
            self.context.__enter__()
        return model, tokenizer

    def __enter__(self) -> _Steering:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.context = None


def _row(name: str, direction: Direction, alpha: float, scaling: float, summary: dict[str, Any],
         judge: str) -> dict[str, Any]:
    asr = summary["judges"][judge]
    over = summary.get("over_refusal")
    return {"direction": name, "kind": direction.kind, "alpha": alpha, "scaling": scaling, "asr": asr["rate"],
            "ci_low": asr["ci95"][0], "ci_high": asr["ci95"][1],
            "over_refusal": over["rate"] if over else None, "n": asr["n"]}


def _write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{TABLE}.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / f"{TABLE}.jsonl")
    tmp = out / f"{TABLE}.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: "" if r[k] is None else r[k] for k in FIELDS} for r in rows)
    tmp.replace(out / f"{TABLE}.csv")


def _print_table(rows: list[dict[str, Any]]) -> None:
    width = max(len("direction"), *(len(r["direction"]) for r in rows))
    print(f"{'direction':<{width}}  {'alpha':>6}  {'ASR':>6}  {'95% CI':>15}  {'over-refusal':>12}  {'n':>5}")
    for r in rows:
        over = "-" if r["over_refusal"] is None else f"{r['over_refusal']:.3f}"
        print(f"{r['direction']:<{width}}  {r['alpha']:>6g}  {r['asr']:>6.3f}  "
              f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]  {over:>12}  {r['n']:>5}")


def steer_cli(config: SteerConfig) -> int:
    steer(config)
    return 0
