"""The two terms of a score (danger, safety): a direction and the anchor adapter its update is taken at, loaded
and checked against each other and against the model (docs/design.md §2: anchor state).

`check_files` runs before any model is loaded: every direction file is opened and validated
(`directions.load`), every anchor must be a PEFT adapter folder whose B is not zero everywhere (B = 0 leaves
only the gradient squeezed through a random subspace, which carries no signal; `allow_zero_anchor` overrides),
and it warns about what it cannot check:
- a direction that records no base model (imported without --model) cannot be matched to the model;
- a safety anchor that is not the adapter the safety direction was built from (the paper takes the safety
  term at the safety adapter itself, at the same checkpoint as the direction).
`load_terms` then checks the directions and each anchor's LoRA shapes against the loaded model, and loads the
anchors into a PeftModel.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sqsd import directions
from sqsd.config import ScoreConfig
from sqsd.directions import Direction
from sqsd.errors import SqsdError

TERMS = ("danger", "safety")


@dataclass(frozen=True)
class Term:
    """One side of the score: a direction and where the induced update is taken. `adapter` names an adapter
    loaded in the PeftModel given to `score_records` (None = dense mode at the model itself); `scaling`
    overrides that adapter's LoRA scaling (None = its own alpha/r; ignored in dense mode)."""

    direction: Direction
    adapter: str | None = None
    scaling: float | None = None

    @property
    def key(self) -> tuple[str | None, float | None]:
        """Terms with equal keys share one forward/backward pass."""
        return (self.adapter, self.scaling if self.adapter else None)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _anchor_factors(anchor: str, flag: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    folder = Path(anchor)
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise SqsdError(f"{flag}: {anchor} is not a PEFT adapter folder (no adapter_config.json and "
                        "adapter_model.safetensors)")
    try:
        factors = directions.lora_factors(load_file(str(folder / "adapter_model.safetensors")))
    except (SafetensorError, SqsdError) as e:
        raise SqsdError(f"{flag}: {folder / 'adapter_model.safetensors'}: {e}") from None
    if not factors:
        raise SqsdError(f"{flag}: {folder / 'adapter_model.safetensors'} holds no LoRA weights")
    return factors


def _from_another_adapter(direction: Direction, anchor: str) -> bool:
    """Whether `direction` was built from a PEFT adapter other than `anchor` (compared by the fingerprint of
    its weights; files written before fingerprints were recorded, by the adapter folder)."""
    if "source_fingerprint" in direction.meta:
        return direction.meta["source_fingerprint"] != directions.adapter_fingerprint(anchor)
    source = Path(direction.meta.get("source", ""))
    return (source / "adapter_model.safetensors").is_file() and source.resolve() != Path(anchor).resolve()


def check_files(config: ScoreConfig) -> dict[str, Direction]:
    """Validate the direction files and anchors of `config` without a model (see the module docstring);
    returns the loaded directions."""
    loaded = {}
    for term in TERMS:
        path, anchor = getattr(config, term), getattr(config, f"{term}_anchor")
        if not path:
            continue
        try:
            direction = loaded[term] = directions.load(path)
        except SqsdError as e:
            raise SqsdError(f"--{term}: {e}") from None
        if "base_fingerprint" not in direction.meta:
            _warn(f"--{term} {path} records no base model (imported without --model?), so it cannot be checked "
                  f"against {config.model}; make sure it was made for this model")
        if not anchor:
            continue
        factors = _anchor_factors(anchor, f"--{term}-anchor")
        if all(not bool(B.any()) for _, B in factors.values()) and not config.allow_zero_anchor:
            raise SqsdError(f"--{term}-anchor {anchor}: every lora_B is zero (a freshly initialised adapter), so "
                            "the induced update is only the gradient squeezed through a random subspace and "
                            "carries no signal; train the anchor first, or pass --allow-zero-anchor to score "
                            "there anyway")
        if term == "safety" and _from_another_adapter(direction, anchor):
            _warn(f"--safety-anchor {anchor} is not the adapter the safety direction was built from "
                  f"({direction.meta['source']}, step {direction.meta.get('step', '?')}); the paper takes both "
                  "at the same checkpoint")
    return loaded


def _check_anchor_shapes(model: Any, anchor: str, flag: str) -> None:
    """Each LoRA factor of `anchor` must fit the model's layer it adapts (else PEFT fails with a raw
    size-mismatch error)."""
    layers = ((n, getattr(m, "base_layer", m)) for n, m in model.named_modules())  # under an earlier adapter
    linears = {n: m for n, m in layers if isinstance(m, torch.nn.Linear)}
    for name, (A, B) in _anchor_factors(anchor, flag).items():
        layer = linears.get(name)
        if layer is None:
            raise SqsdError(f"{flag} {anchor}: adapts module {name}, which this model does not have; was it "
                            "trained on another model?")
        if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
            raise SqsdError(f"{flag} {anchor}: module {name}: LoRA factors A {tuple(A.shape)} and B "
                            f"{tuple(B.shape)} do not fit the model's layer ({layer.out_features} out × "
                            f"{layer.in_features} in); was it trained on another model?")


def load_terms(config: ScoreConfig, model: Any, base_fp: str | None = None) -> tuple[Any, dict[str, Term]]:
    """Check the directions and anchors against `model`, load the anchors into it (a PeftModel when any is
    given), and return (model to score at, {term: Term}). `base_fp`: the model's fingerprint, when the caller
    already has it."""
    from peft import PeftModel

    from sqsd.fingerprints import model_fingerprint

    base_fp = base_fp or model_fingerprint(config.model)
    loaded = {term: directions.load(getattr(config, term)) for term in TERMS if getattr(config, term)}
    for direction in loaded.values():
        directions.check(direction, model, base_fp)  # before any adapter wraps the linears
    terms: dict[str, Term] = {}
    adapters: dict[Path, str] = {}  # anchor folder -> adapter name
    for term, direction in loaded.items():
        anchor = getattr(config, f"{term}_anchor")
        if not anchor:
            terms[term] = Term(direction)
            continue
        folder = Path(anchor).resolve()
        if folder not in adapters:
            _check_anchor_shapes(model.get_base_model() if isinstance(model, PeftModel) else model, anchor,
                                 f"--{term}-anchor")
            if isinstance(model, PeftModel):
                model.load_adapter(anchor, adapter_name=term)
            else:
                model = PeftModel.from_pretrained(model, anchor, adapter_name=term)
            adapters[folder] = term
        terms[term] = Term(direction, adapters[folder], getattr(config, f"{term}_scaling"))
    return model.eval(), terms
