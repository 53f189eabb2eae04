"""Drift tracking (docs/design.md §2, mechanism analysis (a)): how far fine-tuning has moved the weights along each
danger/safety direction, at every logging step, next to the safety measured at chosen steps.

For a tracked direction T (per module m) and the cumulative weight change ΔW_m(t) since training began, each
logging step gets the three projection metrics of `projection.Projections.metric` with ΔW in place of a sample's
induced update δW:

    cosine-sum  Σ_m cos(ΔW_m, T_m)                (a module that has not moved counts 0)
    projection  ⟨ΔW, T⟩ / ‖T‖                     over the direction's modules concatenated
    cosine      ⟨ΔW, T⟩ / (‖ΔW‖ ‖T‖)
    norm_delta  ‖ΔW‖                               over the direction's modules

What ΔW is:
- LoRA training: ΔW_m(t) = s·(B(t)A(t) − B(0)A(0)), with B(0), A(0) copied when the Trainer is built (before a
  resumed run loads its checkpoint). PEFT starts with B = 0, but this is not assumed. ΔW is kept in factor
  form U·V with U = [s·B(t), −s·B(0)] (out×2r) and V = [A(t); A(0)] (2r×in); every inner product and norm is
  an r×r (or out×r, r×in) product — ‖UV‖² = ⟨VVᵀ, UᵀU⟩, ⟨UV, T⟩ = ⟨U, T Vᵀ⟩ — so no out×in matrix is ever
  formed and a measurement costs far less than a training step.
- Full fine-tuning: ΔW_m = W_m(t) − W_m(0), with a copy of the tracked weights (only those) taken at the start.
- A tracked module the training does not touch (no LoRA on it) has ΔW_m = 0.

Output: `trajectory.jsonl` in the run folder, one line per logging step plus step 0 (before training):
    {"step", "epoch", "loss" (when logged), "<direction>": {"cosine-sum", "projection", "cosine", "norm_delta"},
     ..., and at the `eval_steps`: "asr", "asr_ci": [lo, hi], "asr_n"}
The direction name is its file's stem. ASR is measured by greedy generation on the given harmful prompts with
the model as it is at that step, judged by the keyword judge (the generations go to `track_eval/step-N.jsonl`).
Only the main process measures and writes. A resumed run trims the file to the checkpoint's step first, so no
step appears twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import TrainerCallback

from sqsd.directions import Direction
from sqsd.errors import SqsdError
from sqsd.options import EVAL_MAX_NEW_TOKENS, METRICS
from sqsd.projection import Projections
from sqsd.stats import bootstrap_ci

TRAJECTORY_FILE = "trajectory.jsonl"
TRAJECTORY_PLOT = "trajectory.png"
EVAL_DIR = "track_eval"
RESERVED = ("step", "epoch", "loss", "asr", "asr_ci", "asr_n")


def direction_names(paths: Sequence[str | Path]) -> list[str]:
    """The name of each direction file in a trajectory: its stem (which must be unique and not a reserved key)."""
    names = [Path(p).stem for p in paths]
    for name in names:
        if names.count(name) > 1:
            raise SqsdError(f"two tracked direction files are both named {name!r}; rename one (the file stem "
                            "names the direction in trajectory.jsonl)")
        if name in RESERVED:
            raise SqsdError(f"a tracked direction file may not be named {name!r} (a trajectory.jsonl field); "
                            "rename it")
    return names


class _Tracked:
    """One tracked module: how its weight change is read, and the direction terms on it."""

    def __init__(self, name: str, layer: torch.nn.Module, mode: str, adapter: str | None):
        self.name, self.layer, self.mode, self.adapter = name, layer, mode, adapter
        self.A0 = self.B0 = self.W0 = None

    def capture(self) -> None:
        if self.mode == "lora":
            A = self.layer.lora_A[self.adapter].weight.detach()
            B = self.layer.lora_B[self.adapter].weight.detach()
            # Keep B(0)A(0) only if it is not zero (PEFT's default init has B = 0).
            nonzero = bool(A.abs().max() > 0) and bool(B.abs().max() > 0)
            self.A0, self.B0 = (A.clone(), B.clone()) if nonzero else (None, None)
        elif self.mode == "full":
            self.W0 = self.layer.weight.detach().clone()

    def device(self) -> torch.device:
        if self.mode == "lora":
            return self.layer.lora_A[self.adapter].weight.device
        return self.layer.weight.device if self.mode == "full" else torch.device("cpu")

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = U V as (U (out, k), V (k, in)), LoRA only."""
        s = float(self.layer.scaling[self.adapter])
        A = self.layer.lora_A[self.adapter].weight.detach().to(dtype)
        B = self.layer.lora_B[self.adapter].weight.detach().to(dtype)
        if self.A0 is None:
            return s * B, A
        A0, B0 = self.A0.to(device=A.device, dtype=dtype), self.B0.to(device=B.device, dtype=dtype)
        return torch.cat([s * B, -s * B0], dim=1), torch.cat([A, A0], dim=0)

    def measure(self, terms: Sequence[Any], dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(‖ΔW‖², [⟨ΔW, T⟩ for each term]) in `dtype`; a term may be None (direction not on this module)."""
        if self.mode == "frozen":
            zero = torch.zeros((), dtype=dtype)
            return zero, [zero for _ in terms]
        if self.mode == "lora":
            U, V = self.factors(dtype)
            sq = ((V @ V.T) * (U.T @ U)).sum()
            dots = [(U * t.times_t(V)).sum() if t is not None else torch.zeros((), dtype=dtype, device=U.device)
                    for t in terms]
            return sq, dots
        W = self.layer.weight.detach()
        if self.W0.device != W.device:  # the Trainer moved the model after the copy was taken: follow it once
            self.W0 = self.W0.to(W.device)
        D = W.to(dtype) - self.W0.to(dtype)
        dots = []
        for t in terms:
            if t is None:
                dots.append(torch.zeros((), dtype=dtype, device=D.device))
            elif hasattr(t, "A"):  # ⟨D, B_d A_d⟩ = ⟨B_dᵀ D, A_d⟩, no out×in product formed beyond D itself
                dots.append(((t.B.T @ D) * t.A).sum())
            else:
                dots.append((D * t.T).sum())
        return (D * D).sum(), dots


class DriftTracker(TrainerCallback):
    """Writes `trajectory.jsonl` (see the module docstring) during `train_model`; pass it in `callbacks=`.

    `directions` maps a name to a Direction whose modules are the base model's module names. With
    `eval_steps`, `eval_records` (harmful prompts) and `tokenizer`, the ASR is measured at those steps.
    """

    def __init__(self, directions: Mapping[str, Direction], output_dir: str | Path, *,
                 eval_steps: Sequence[int] = (), eval_records: Sequence[Any] = (), tokenizer: Any = None,
                 max_new_tokens: int = EVAL_MAX_NEW_TOKENS, batch_size: int = 8, system_prompt: str | None = None,
                 max_prompt_length: int = 1024, n_bootstrap: int = 1000, seed: int = 0):
        if not directions:
            raise SqsdError("DriftTracker needs at least one direction")
        if eval_steps and (not eval_records or tokenizer is None):
            raise SqsdError("DriftTracker: eval_steps need eval_records (harmful prompts) and the tokenizer")
        self.directions = dict(directions)
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / TRAJECTORY_FILE
        self.eval_steps = set(eval_steps)
        self.eval_records, self.tokenizer = list(eval_records), tokenizer
        self.gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "system_prompt": system_prompt,
                    "max_prompt_length": max_prompt_length}
        self.n_bootstrap, self.seed = n_bootstrap, seed
        self.module_names = sorted({m for d in self.directions.values() for m in d.modules})
        self.tracked: list[_Tracked] | None = None
        self.dtype = torch.float32
        self.terms: dict[str, list[Any]] = {}  # direction -> term per tracked module (None where absent)
        self.t_sq: dict[str, torch.Tensor] = {}  # direction -> (M,) ‖T_m‖²
        self.pending: dict[str, Any] | None = None

    # -- setup ---------------------------------------------------------------------------------------------
    def capture(self, model: torch.nn.Module) -> None:
        """Record the starting point ΔW = 0 (LoRA factors or tracked weights) and prepare the directions."""
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        adapter = model.active_adapter if isinstance(model, PeftModel) else None
        named = dict(base.named_modules())
        tracked = []
        for name in self.module_names:
            layer = named.get(name)
            if layer is None:
                raise SqsdError(f"a tracked direction names module {name!r}, which the model does not have")
            if adapter is not None:
                mode = "lora" if hasattr(layer, "lora_A") and adapter in layer.lora_A else "frozen"
            elif isinstance(layer, torch.nn.Linear):
                mode = "full"
            else:
                raise SqsdError(f"tracked module {name} is not a linear layer")
            tracked.append(_Tracked(name, layer, mode, adapter))
        param = next(model.parameters())
        self.dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        for t in tracked:
            t.capture()
        self.tracked = tracked
        for dname, direction in self.directions.items():
            terms = []
            for t in tracked:
                term = direction.modules.get(t.name)
                terms.append(None if term is None else term.to(self.dtype, t.device()))
            self.terms[dname] = terms
            self.t_sq[dname] = torch.stack([torch.zeros((), dtype=self.dtype) if term is None
                                            else term.sq_norm().cpu() for term in terms])

    # -- measuring -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self) -> dict[str, dict[str, float]]:
        """{direction: {metric: value, "norm_delta": ‖ΔW‖}} for the weights as they are now."""
        assert self.tracked is not None, "capture() first"
        sq = torch.zeros(len(self.tracked), dtype=self.dtype)
        dots = {d: torch.zeros(len(self.tracked), dtype=self.dtype) for d in self.directions}
        names = list(self.directions)
        for m, t in enumerate(self.tracked):
            s, ds = t.measure([self.terms[d][m] for d in names], self.dtype)
            sq[m] = s.cpu()
            for d, value in zip(names, ds):
                dots[d][m] = value.cpu()
        out = {}
        for d in names:
            on = torch.tensor([term is not None for term in self.terms[d]])
            p = Projections(modules=[t.name for t, k in zip(self.tracked, on) if k], dots=dots[d][on][None, None],
                            sq=sq[on][None], t_sq=self.t_sq[d][on][None],
                            on=torch.ones(1, int(on.sum()), dtype=torch.bool), loss=torch.zeros(1),
                            n_tokens=torch.zeros(1))
            out[d] = {metric: float(p.metric(metric)[0, 0]) for metric in METRICS}
            out[d]["norm_delta"] = float(sq[on].sum().sqrt())
        return out

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """ASR of the model as it is now: greedy generation on the eval prompts, keyword judge."""
        from sqsd.generate import generate_records
        from sqsd.judges import KeywordJudge

        gens = generate_records(model, self.tokenizer, self.eval_records, progress=False, **self.gen)
        verdicts = KeywordJudge().judge([g.prompt for g in gens], [g.response for g in gens])
        unsafe = [float(bool(v.unsafe)) for v in verdicts]
        folder = self.output_dir / EVAL_DIR
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"step-{step}.jsonl", "w", encoding="utf-8") as f:
            for g, v in zip(gens, verdicts):
                f.write(json.dumps({"id": g.id, "prompt": g.prompt, "response": g.response, "judge": "keyword",
                                    "label": "unsafe" if v.unsafe else "safe", "raw": v.raw}) + "\n")
        lo, hi = bootstrap_ci(unsafe, self.n_bootstrap, self.seed)
        return {"asr": sum(unsafe) / len(unsafe), "asr_ci": [lo, hi], "asr_n": len(unsafe)}

    def _row(self, model: torch.nn.Module, state: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        row.update(self.measure())
        if state.global_step in self.eval_steps:
            row.update(self.evaluate(model, state.global_step))
        return row

    def _write(self, row: dict[str, Any]) -> None:
        first = {k: row[k] for k in ("step", "epoch", "loss") if k in row}
        with open(self.path, "a") as f:
            f.write(json.dumps({**first, **row}) + "\n")

    def _flush(self) -> None:
        if self.pending is not None:
            self._write(self.pending)
            self.pending = None

    # -- Trainer events --------------------------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # Before a resumed run loads its checkpoint: the factors/weights here are those of step 0.
        if state.is_world_process_zero and model is not None:
            self.capture(model)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if self.tracked is None:  # added after the Trainer was built: only right for a fresh start
            if state.global_step:
                raise SqsdError("DriftTracker must be passed to the Trainer (callbacks=) to track a resumed run")
            self.capture(model)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        trim(self.path, state.global_step)
        if state.global_step == 0:
            self._write(self._row(model, state))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self._flush()
        logging = bool(control.should_log)  # set for this step by DefaultFlowCallback, which runs first
        if logging or state.global_step in self.eval_steps:
            row = self._row(model, state)
            if logging:
                self.pending = row  # written by on_log, with the loss
            else:
                self._write(row)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.pending is not None and logs and "loss" in logs and self.pending["step"] == state.global_step:
            self.pending["loss"] = float(logs["loss"])
            self._flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._flush()


def trim(path: Path, keep_until: int) -> None:
    """Keep the trajectory lines of steps <= `keep_until` (a resumed run), none for a fresh start (step 0).
    A torn last line (a crash mid-write) is dropped."""
    if not path.exists():
        return
    kept = []
    if keep_until > 0:
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= keep_until:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    path.write_text("".join(line + "\n" for line in kept))


def tracker_from_config(config: Any, model: torch.nn.Module, tokenizer: Any, output_dir: str | Path, *,
                        main: bool = True, base_fingerprint: str | None = None) -> DriftTracker:
    """The DriftTracker of a TrainConfig (`--track` and `--track-eval-*`): loads and checks the direction files
    against `model` (the base model, before LoRA is attached) and, on the main process, the eval prompts."""
    from sqsd.directions import check, load

    names = direction_names(config.track)
    loaded = {}
    for name, path in zip(names, config.track):
        direction = load(path)
        try:
            check(direction, model, base_fingerprint)
        except SqsdError as e:
            raise SqsdError(f"--track {path}: {e}") from e
        loaded[name] = direction
    records: list[Any] = []
    if config.track_eval_steps and main:
        from sqsd.data import load_records

        records = load_records(config.track_eval_harmful, limit=config.track_eval_limit).records
    return DriftTracker(loaded, output_dir, eval_steps=config.track_eval_steps if main else (),
                        eval_records=records, tokenizer=tokenizer, max_new_tokens=config.track_eval_max_new_tokens,
                        batch_size=config.batch_size, system_prompt=config.system_prompt,
                        max_prompt_length=config.max_length, seed=config.seed)
