"""Directions in parameter space: a per-module matrix T_m, kept low-rank (T = B·A) or dense.

A danger or safety direction is a LoRA adapter's B·A per module (docs/design.md §2); a dense direction is a
difference of two models' weights. Scoring never needs T itself, only products with it, so a low-rank
direction is never expanded: every method here works in factor space.

Module names are the base model's own (`model.layers.0.self_attn.q_proj`), free of PEFT prefixes.

`load` is the one place a direction file is opened: it validates the whole file (safetensors structure, header
metadata, tensor names, factor shapes, finite non-zero values whose norms fit float32) and turns any defect
into one SqsdError naming the file and the module, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sqsd.errors import SqsdError

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class LowRank:
    """T = B @ A with A (r, in) and B (out, r)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def sq_norm(self) -> torch.Tensor:
        """‖B A‖_F² = tr((AAᵀ)(BᵀB)), an r×r computation."""
        return ((self.A @ self.A.T) * (self.B.T @ self.B)).sum()

    def times_t(self, A: torch.Tensor) -> torch.Tensor:
        """T Aᵀ (out, r') for a factor A (r', in)."""
        return self.B @ (self.A @ A.T)

    def t_times(self, B: torch.Tensor) -> torch.Tensor:
        """Bᵀ T (r', in) for a factor B (out, r')."""
        return (B.T @ self.B) @ self.A

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x Tᵀ for rows x (..., in) -> (..., out)."""
        return (x @ self.A.T) @ self.B.T

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> LowRank:
        return LowRank(self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype))


@dataclass(frozen=True)
class Dense:
    """A full (out, in) matrix T."""

    T: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.T.shape)

    def sq_norm(self) -> torch.Tensor:
        return (self.T * self.T).sum()

    def times_t(self, A: torch.Tensor) -> torch.Tensor:
        return self.T @ A.T

    def t_times(self, B: torch.Tensor) -> torch.Tensor:
        return B.T @ self.T

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.T.T

    def dense(self) -> torch.Tensor:
        return self.T

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Dense:
        return Dense(self.T.to(device=device, dtype=dtype))


Matrix = LowRank | Dense  # one module's T_m


@dataclass(frozen=True)
class Direction:
    """A named set of per-module matrices, with metadata (kind, provenance) kept alongside."""

    modules: dict[str, Matrix]
    kind: str = "direction"
    meta: dict[str, Any] = field(default_factory=dict)

    def scaled(self, factor: float) -> Direction:
        """factor · T (for low-rank terms only B is scaled)."""
        return Direction({m: LowRank(t.A, factor * t.B) if isinstance(t, LowRank) else Dense(factor * t.T)
                          for m, t in self.modules.items()}, self.kind, self.meta)

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Direction:
        return Direction({m: t.to(dtype, device) for m, t in self.modules.items()}, self.kind, self.meta)

    def sq_norm(self) -> torch.Tensor:
        return sum(t.sq_norm() for t in self.modules.values())


def inner(s: Matrix, t: Matrix) -> torch.Tensor:
    """⟨S, T⟩_F; for two low-rank terms tr((A_s A_tᵀ)(B_tᵀ B_s)), an r×r computation."""
    if isinstance(s, LowRank) and isinstance(t, LowRank):
        return ((s.A @ t.A.T) * (s.B.T @ t.B)).sum()
    if isinstance(s, LowRank):  # ⟨B A, T⟩ = ⟨B, T Aᵀ⟩
        return (s.B * (t.dense() @ s.A.T)).sum()
    if isinstance(t, LowRank):
        return inner(t, s)
    return (s.T * t.T).sum()


def lora_factors(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} from a PEFT adapter state dict (keys like `...q_proj.lora_A.weight`)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["which"]] = value
    incomplete = sorted(m for m, p in parts.items() if set(p) != {"A", "B"})
    if incomplete:
        raise SqsdError(f"adapter has lora_A without lora_B (or the reverse) for {', '.join(incomplete[:3])}")
    return {m: (p["A"], p["B"]) for m, p in sorted(parts.items())}


def from_adapter(folder: str | Path, kind: str = "direction") -> Direction:
    """A low-rank direction T_m = B_m A_m from a PEFT LoRA adapter folder (scaling not applied,
    docs/design.md §2).

    The adapter's scaling (alpha/r, or alpha/√r with rsLoRA), rank and alpha go into the metadata, so that
    steering can reproduce the adapter itself (θ₀ + 1·scaling·T); so do its folder and the fingerprint of its
    weights (`source`, `source_fingerprint`), so that `score` can tell whether an anchor is this very adapter.
    """
    folder = Path(folder)
    path = folder / "adapter_model.safetensors"
    if not path.exists():
        raise SqsdError(f"{folder} is not a PEFT adapter folder (no adapter_model.safetensors)")
    factors = lora_factors(load_file(str(path)))
    if not factors:
        raise SqsdError(f"{path} holds no LoRA weights")
    meta: dict[str, Any] = {"source": str(folder), "source_fingerprint": adapter_fingerprint(folder)}
    config_file = folder / "adapter_config.json"
    if config_file.exists():
        peft = json.loads(config_file.read_text())
        r, alpha = peft.get("r"), peft.get("lora_alpha")
        if r and alpha is not None:
            meta.update(rank=r, alpha=alpha, scaling=alpha / (r ** 0.5 if peft.get("use_rslora") else r))
        meta["peft_base_model"] = peft.get("base_model_name_or_path")
    return Direction({m: LowRank(A.float(), B.float()) for m, (A, B) in factors.items()}, kind, meta)


def adapter_fingerprint(folder: str | Path) -> str:
    """sha256 of a PEFT adapter folder's weights file (adapters are small: megabytes)."""
    return hashlib.sha256((Path(folder) / "adapter_model.safetensors").read_bytes()).hexdigest()


def from_models(base: str | Path, tuned: str | Path, select: Callable[[str], bool],
                kind: str = "direction") -> Direction:
    """A dense direction T_m = W_m(tuned) − W_m(base) for the 2-D weights whose module name `select` accepts.

    Reads the two folders' safetensors one tensor at a time, so two large models never sit in memory at once.
    """
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise SqsdError(f"{folder} holds no *.safetensors weights (a Hugging Face model folder is needed)")
        out = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                out.update({k: file for k in f.keys()})  # noqa: SIM118
        return out

    base_index, tuned_index = index(Path(base)), index(Path(tuned))
    modules: dict[str, Matrix] = {}
    for key in sorted(base_index):
        name = key.removesuffix(".weight")
        if not key.endswith(".weight") or not select(name):
            continue
        if key not in tuned_index:
            raise SqsdError(f"{tuned} has no weight {key} (present in {base}); are they the same architecture?")
        with safe_open(str(base_index[key]), framework="pt") as f0, \
                safe_open(str(tuned_index[key]), framework="pt") as f1:
            w0, w1 = f0.get_tensor(key).float(), f1.get_tensor(key).float()
        if w0.ndim != 2:
            continue
        if w0.shape != w1.shape:
            raise SqsdError(f"weight {key}: shape {tuple(w0.shape)} in {base} but {tuple(w1.shape)} in {tuned}")
        modules[name] = Dense(w1 - w0)
    if not modules:
        raise SqsdError(f"no 2-D weight of {base} matches the chosen modules")
    return Direction(modules, kind, {"source": f"{tuned} - {base}"})


def save(direction: Direction, path: str | Path) -> Path:
    """Write `direction` as safetensors (`<module>.A`/`.B` or `<module>.T`) plus a readable `.json` beside it.

    The metadata (kind, base-model fingerprint, module shapes, rank, provenance) is stored in both the
    safetensors header and the JSON file, so a lone .safetensors file still knows what it is.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    shapes = {}
    for name, term in direction.modules.items():
        if isinstance(term, LowRank):
            tensors[f"{name}.A"], tensors[f"{name}.B"] = term.A.contiguous(), term.B.contiguous()
        else:
            tensors[f"{name}.T"] = term.T.contiguous()
        shapes[name] = list(term.shape)
    meta = {**direction.meta, "kind": direction.kind, "modules": shapes,
            "format": "lowrank" if all(isinstance(t, LowRank) for t in direction.modules.values()) else "dense"}
    text = json.dumps(meta, indent=2, sort_keys=True, default=str)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"sqsd": text})
    tmp.replace(path)
    path.with_suffix(".json").write_text(text + "\n")
    return path


_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<part>[ABT])$")
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _matrix(path: Path, name: str, parts: dict[str, torch.Tensor]) -> Matrix:
    """One module's tensors as a Matrix, or the defect that makes them unusable."""
    where = f"direction file {path}, module {name}"
    if set(parts) not in ({"A", "B"}, {"T"}):
        raise SqsdError(f"{where}: has tensors {'/'.join(sorted(parts))}; a module holds either .A and .B (low "
                        "rank) or .T (dense)")
    for part, tensor in parts.items():
        if tensor.ndim != 2 or not tensor.is_floating_point():
            raise SqsdError(f"{where}: .{part} is a {tensor.ndim}-D {tensor.dtype} tensor; a 2-D float matrix "
                            "is expected")
        if not bool(torch.isfinite(tensor).all()):
            raise SqsdError(f"{where}: .{part} holds NaN or Inf values")
    if "T" in parts:
        matrix: Matrix = Dense(parts["T"])
    else:
        A, B = parts["A"], parts["B"]
        if A.shape[0] != B.shape[1]:
            raise SqsdError(f"{where}: factors of mismatched rank, .A is {tuple(A.shape)} (rank × in) but .B "
                            f"is {tuple(B.shape)} (out × rank)")
        matrix = LowRank(A, B)
    sq = float(matrix.to(torch.float64).sq_norm())
    if sq == 0:
        raise SqsdError(f"{where}: is all zeros (it points nowhere, and every cosine with it is undefined); "
                        "rebuild the direction, or import it without that module (--modules, --layers)")
    if sq > _FLOAT32_MAX:
        raise SqsdError(f"{where}: values so large that its squared norm ({sq:.3g}) overflows float32")
    return matrix


def load(path: str | Path) -> Direction:
    """Read a direction file written by `save`, validated completely (see the module docstring)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SqsdError(f"direction file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError) as e:
        raise SqsdError(f"direction file {path} is not a readable safetensors file ({e}); rebuild or re-import "
                        "it") from None
    try:
        meta = json.loads(header.get("sqsd", "{}"))
    except json.JSONDecodeError as e:
        raise SqsdError(f"direction file {path}: the header metadata 'sqsd' is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise SqsdError(f"direction file {path}: the header metadata 'sqsd' is not a JSON object")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _TENSOR.match(key)
        if match is None:
            raise SqsdError(f"direction file {path}: unexpected tensor {key!r} (expected <module>.A/.B or "
                            "<module>.T)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise SqsdError(f"{path} holds no direction tensors (expected <module>.A/.B or <module>.T)")
    modules = {name: _matrix(path, name, parts[name]) for name in sorted(parts)}
    if sum(float(m.to(torch.float64).sq_norm()) for m in modules.values()) > _FLOAT32_MAX:
        raise SqsdError(f"direction file {path}: values so large that the squared norm overflows float32")
    return Direction(modules, meta.pop("kind", "direction"), meta)


def check(direction: Direction, model: torch.nn.Module, base_fingerprint: str | None = None) -> None:
    """Fail clearly if `direction` does not fit `model`: missing modules, wrong shapes, another base model."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, term in direction.modules.items():
        if name not in linears:
            raise SqsdError(f"direction ({direction.kind}) names module {name!r}, which this model does not have "
                            f"(it has e.g. {next(iter(linears), '-')!r}); was it built for another model?")
        want = tuple(linears[name].weight.shape)
        if tuple(term.shape) != want:
            raise SqsdError(f"direction ({direction.kind}) module {name}: shape {tuple(term.shape)}, the model's "
                            f"weight is {want}; was it built for another model?")
    made_for = direction.meta.get("base_fingerprint")
    if base_fingerprint and made_for and made_for != base_fingerprint:
        raise SqsdError(f"direction ({direction.kind}) was built on base model {made_for}, not {base_fingerprint}; "
                        "pass a direction built on this model")
