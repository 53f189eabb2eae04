"""The slow, obviously correct scorer that the fast path (`sqsd.projection.project`) is tested against.

It shares no code with the fast path, so a mistake in one cannot hide in both: one sample at a time, the
model's own forward (its own logits, post-processing included), plain autograd on the anchor's LoRA factors
(or the dense weights), δW_m built as a dense matrix, the scaling override written into the PEFT layers'
`scaling` dicts, and the three metrics of docs/design.md §2 taken literally on the flattened matrices of each
direction's own modules:

    cosine-sum  Σ_m ⟨δW_m, T_m⟩ / (‖δW_m‖ ‖T_m‖)      (a module with δW_m = 0 counts 0)
    projection  ⟨vec δθ, vec T⟩ / ‖vec T‖
    cosine      ⟨vec δθ, vec T⟩ / (‖vec δθ‖ ‖vec T‖)

Slow (a forward and backward per sample, dense out×in matrices); for tests and benchmarks only.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel

from sqsd.directions import Direction
from sqsd.render import IGNORE, Encoded


@dataclass
class ReferenceScores:
    """Per-sample results: `scores[metric]` is (n, D) for the D directions; loss and n_tokens are (n,)."""

    scores: dict[str, torch.Tensor]
    loss: torch.Tensor
    n_tokens: torch.Tensor


def _metrics(delta: dict[str, torch.Tensor], direction: Direction, dtype: torch.dtype) -> dict[str, float]:
    names = sorted(direction.modules)
    T = {m: direction.modules[m].dense().to(dtype) for m in names}
    cosine_sum = 0.0
    for m in names:
        norm = float(delta[m].norm() * T[m].norm())
        cosine_sum += float((delta[m] * T[m]).sum()) / norm if norm > 0 else 0.0
    v = torch.cat([delta[m].flatten() for m in names])
    t = torch.cat([T[m].flatten() for m in names])
    return {"cosine-sum": cosine_sum, "projection": float(v @ t / t.norm()),
            "cosine": float(v @ t / (v.norm() * t.norm())) if float(v.norm()) > 0 else 0.0}


def reference_scores(model, samples: Sequence[Encoded], directions: Sequence[Direction], *,
                     adapter: str | None = None, scaling: float | None = None) -> ReferenceScores:
    """Scores of `samples` on `directions` at `adapter` of a PeftModel (LoRA mode, its scaling replaced by
    `scaling` when given) or, with `adapter=None`, at the model's own weights (dense mode, adapters off)."""
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    found = dict(base.named_modules())
    names = sorted({m for d in directions for m in d.modules})
    if adapter is not None:
        model.set_adapter(adapter)
        params = {m: (found[m].lora_A[adapter].weight, found[m].lora_B[adapter].weight) for m in names}
    else:
        params = {m: (getattr(found[m], "base_layer", found[m]).weight,) for m in names}
    scaled = [layer for layer in found.values()  # PEFT's LoRA layers keep {adapter: alpha/r} in `scaling`
              if isinstance(getattr(layer, "scaling", None), dict) and adapter in layer.scaling]
    saved = [layer.scaling[adapter] for layer in scaled]
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    for group in params.values():
        for p in group:
            p.requires_grad_(True)
    model.eval()
    device = next(model.parameters()).device
    rows: list[tuple[dict[str, list[float]], float, int]] = []
    try:
        if scaling is not None:
            for layer in scaled:
                layer.scaling[adapter] = scaling
        with model.disable_adapter() if adapter is None and isinstance(model, PeftModel) else nullcontext():
            for sample in samples:
                ids = torch.tensor([sample.input_ids], device=device)
                labels = torch.tensor(sample.labels[1:], device=device)  # position t predicts token t+1
                model.zero_grad(set_to_none=True)
                logits = model(input_ids=ids).logits[0, :-1].to(dtype)
                loss = F.cross_entropy(logits, labels, ignore_index=IGNORE)
                loss.backward()
                delta = {}
                for m, group in params.items():
                    if adapter is not None:
                        A, B = group
                        delta[m] = -(B.grad.to(dtype) @ A.detach().to(dtype) + B.detach().to(dtype) @ A.grad.to(dtype))
                    else:
                        delta[m] = -group[0].grad.to(dtype)
                per_direction = [_metrics(delta, d, dtype) for d in directions]
                scores = {k: [p[k] for p in per_direction] for k in per_direction[0]}
                rows.append((scores, float(loss.detach()), int((labels != IGNORE).sum())))
    finally:
        for layer, s in zip(scaled, saved):
            layer.scaling[adapter] = s
        model.zero_grad(set_to_none=True)
        for p, g in zip(model.parameters(), trainable):
            p.requires_grad_(g)
    return ReferenceScores({k: torch.tensor([r[0][k] for r in rows], dtype=dtype) for k in rows[0][0]},
                           torch.tensor([r[1] for r in rows], dtype=dtype),
                           torch.tensor([r[2] for r in rows], dtype=dtype))
