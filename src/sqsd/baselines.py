"""The baselines `sqsd score --method` puts next to SQSD: the maths, one function per method (higher = riskier).

For a sample x with response-only loss L(x) (mean cross-entropy over its n response tokens, after rendering and
truncation) at the model's own weights θ₀ (no adapter):

    random      u(seed, id) ∈ [0, 1): a seeded hash of the record id, independent of batch and order (a control)
    length      n                                       (length bias; SQSD paper, appendix on response length)
    loss        L(x) at θ₀                              (SQSD paper, loss-by-length analysis)
    grad-norm   ‖∇_θ L(x)‖ over the chosen modules at θ₀ (Bach et al., ACL 2026 Findings: drop high-gradient
                samples)
    self-inf-n  log(‖∇_θ L(x)‖² + 1) + log(n + 1)        (Self-Inf-N, Guan et al., ICML 2025, "Benign samples
                matter")
    gradsim     cos(∇L(x), ḡ_harm) − cos(∇L(x), ḡ_safe)  (He, Xia, Henderson, COLM 2024: bidirectional
                anchoring, gradient features)
    safety-influence  ⟨−∇L(x), ḡ_safe⟩ / ‖ḡ_safe‖      (GradShield-style first-order influence on a safety
                proxy, arXiv 2605.14194): to first order, how much one SGD step on x raises the refusal loss

The hidden-state baselines (repsim, larf, datashield) are in `sqsd.representations`.

ḡ_set = (1/|set|) Σ_{a ∈ set} ∇_θ L(a) at θ₀ over the same modules: the mean over the anchors of each anchor's
own mean-token loss gradient (every anchor weighs the same, whatever its length). The harmful anchors are harmful
prompts with compliant responses, the safe anchors the same kind of prompts with refusals; for safety-influence
L_refusal = (1/|safe|) Σ_a L(a), so ∇L_refusal = ḡ_safe exactly. A cosine with a zero gradient is 0.

The gradient norm is exact and never materialised: the dense-mode pass of `projection.project` with no
directions gives per module ‖G_m‖² = Σ_{t,t'} (a_t·a_t')(δ_t·δ_t') (`Projections.sq`), and ‖∇L‖² is their sum.
The modules are every linear layer of the model but its LM head (`block_linears`: for a decoder-only
transformer, q/k/v/o/gate/up/down of every block). `loss`, `grad-norm` and `self-inf-n` requested together
share that one pass (`theta0`; `loss` without a gradient method is a forward only, `projection.response_losses`). A mean anchor gradient is a dense direction (`anchor_gradient`, computed once
per run), so gradsim's and safety-influence's ⟨δW(x), ḡ⟩ (δW = −∇L) come out of that same pass too.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sqsd.data import Record
from sqsd.directions import Dense, Direction
from sqsd.errors import SqsdError
from sqsd.projection import Projections, _accum_dtype, _base, _batch_loss, project, theta0_batches
from sqsd.render import Encoded, Skip, encode_record
from sqsd.representations import HIDDEN_METHODS, anchor_states, check_layers

# The methods that need the dense pass at θ₀ (a forward and a backward per batch); `loss` alone is forward only.
GRADIENT_METHODS = ("grad-norm", "self-inf-n", "gradsim", "safety-influence")
# Where `anchor_features` keeps a run's anchor gradients and hidden-state features, in its output folder.
ANCHOR_FILE = "anchors.safetensors"
# The anchor gradients (ḡ) each gradient method needs.
ANCHORS = {"gradsim": ("harm", "safe"), "safety-influence": ("safe",)}


def random_score(seed: int, record_id: str) -> float:
    """u ∈ [0, 1) from the first 8 bytes of sha256(seed, id): the same for a record in any batch or order."""
    digest = hashlib.sha256(f"{seed}\0{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def self_inf_n(grad_sq: float, n_tokens: int) -> float:
    """Self-Inf-N (Guan et al., ICML 2025): log(‖∇L‖² + 1) + log(n_response_tokens + 1)."""
    return math.log(grad_sq + 1.0) + math.log(n_tokens + 1.0)


def block_linears(model: torch.nn.Module) -> list[str]:
    """Every linear layer of the (base) model but the LM head, by module name; a LoRA-wrapped layer by the name
    of its wrapper (its own weights are the base layer's)."""
    base = _base(model)
    head = base.get_output_embeddings()
    return [name.removesuffix(".base_layer") for name, m in base.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and ".lora_" not in name]


def anchor_gradient(model: torch.nn.Module, anchors: Sequence[Encoded], modules: Sequence[str], pad_token_id: int,
                    batch_size: int, kind: str) -> Direction:
    """ḡ = (1/|anchors|) Σ_a ∇_W L(a) at θ₀ (any adapters switched off) for each weight W of `modules`, as a
    Direction of Dense (out, in) matrices in the accumulation dtype (float64 for a float64 model, else float32).

    Batched: the backward of Σ_a L(a) / |anchors| per batch, summed over batches in that dtype; every other
    parameter is frozen, and the model's grad flags, .grad and mode are restored."""
    if not anchors:
        raise SqsdError(f"no anchors to take the {kind} gradient of")
    base = _base(model)
    weights = {name: base.get_submodule(name).weight for name in modules}
    dtype = _accum_dtype(model)
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    model.requires_grad_(False)
    for w in weights.values():
        w.grad = None
        w.requires_grad_(True)
    total = {name: torch.zeros(w.shape, dtype=dtype, device=w.device) for name, w in weights.items()}
    try:
        for _, batch in theta0_batches(model, anchors, pad_token_id, batch_size):
            per_sample, _ = _batch_loss(model, batch, dtype)
            (per_sample.sum() / len(anchors)).backward()
            for name, w in weights.items():  # summed in `dtype`, not in the weights' own (maybe bf16)
                total[name] += w.grad.to(dtype)
                w.grad = None
        return Direction({name: Dense(t.cpu()) for name, t in total.items()}, kind=kind)
    finally:
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad


def theta0(model: torch.nn.Module, samples: Sequence[Encoded], modules: Sequence[str], pad_token_id: int,
           batch_size: int, anchors: Sequence[Direction] = ()) -> Projections:
    """The dense pass at θ₀ (any adapters switched off) on the anchor gradients `anchors`: per-sample loss,
    per-module ‖∇_{W_m} L‖² over `modules` and ⟨−∇_{W_m} L, ḡ_m⟩."""
    return project(model, samples, list(anchors), modules=modules, adapter=None, pad_token_id=pad_token_id,
                   batch_size=batch_size, progress=False)


def _cos(dot: float, anchor_norm: float, norm: float) -> float:
    """cos(∇L, ḡ) from ⟨δW, ḡ⟩ = −⟨∇L, ḡ⟩; 0 where either vector is zero."""
    return -dot / (norm * anchor_norm) if norm * anchor_norm > 0 else 0.0


def method_scores(methods: Sequence[str], seed: int, record_id: str, n_tokens: int, loss: float | None,
                  grad_sq: float | None, anchored: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """The score of one sample under each baseline of this module in `methods` (others are left out): `loss`
    = L(x) at θ₀ when `loss` is asked for, `grad_sq` = ‖∇L‖² from `theta0` when a gradient method is; `anchored`
    = {anchor name: (⟨−∇L, ḡ⟩, ‖ḡ‖)} over the same modules, for the anchored methods."""
    out: dict[str, float] = {}
    norm = math.sqrt(grad_sq) if grad_sq is not None else 0.0
    for method in methods:
        if method == "random":
            out[method] = random_score(seed, record_id)
        elif method == "length":
            out[method] = float(n_tokens)
        elif method == "loss":
            out[method] = loss
        elif method == "grad-norm":
            out[method] = norm
        elif method == "self-inf-n":
            out[method] = self_inf_n(grad_sq, n_tokens)
        elif method == "gradsim":
            out[method] = _cos(*anchored["harm"], norm) - _cos(*anchored["safe"], norm)
        elif method == "safety-influence":
            dot, anchor_norm = anchored["safe"]
            out[method] = dot / anchor_norm if anchor_norm > 0 else 0.0
    return out


def encode_anchors(path: str, flag: str, tokenizer: Any, system_prompt: str | None,
                   max_length: int) -> list[tuple[Record, Encoded]]:
    """The records of an anchors file (any format the data layer reads) with their encodings, rendered and
    truncated as the pool is; records with no response token left are left out. An anchors file with no usable
    record is an error."""
    from sqsd.data import load_records

    records = load_records(path).records
    encoded = [encode_record(r, tokenizer, system_prompt, max_length) for r in records]
    kept = [(r, e) for r, e in zip(records, encoded) if not isinstance(e, Skip)]
    if not kept:
        raise SqsdError(f"{flag} {path}: no usable record (every one was skipped: {encoded[0].reason})")
    return kept


def check_disjoint(pool: Sequence[Record], anchors: Sequence[Record], flag: str, path: str) -> None:
    """Anchors must not share a prompt with the scored data: a sample whose prompt is an anchor's would be
    scored against itself. A clear error naming both records and how many overlap."""
    prompts = {r.prompt_key(): r for r in pool}
    clash = [(a, prompts[a.prompt_key()]) for a in anchors if a.prompt_key() in prompts]
    if clash:
        anchor, record = clash[0]
        raise SqsdError(f"{flag} {path}: record {anchor.id} has the same prompt as the scored record {record.id} "
                        f"({len(clash)} anchor(s) overlap the data); anchors must be disjoint from what is scored "
                        "(e.g. a held-out split such as @directions)")


def anchor_features(config: Any, model: torch.nn.Module, tokenizer: Any, folder: Path, main: bool,
                    modules: Sequence[str], pool: Sequence[Record]
                    ) -> tuple[dict[str, Direction], dict[str, torch.Tensor]]:
    """What `config.method` needs of the anchor sets: ({"harm"/"safe": ḡ}, the hidden-state features of
    `representations.anchor_states`), computed once per run and kept in `folder`/ANCHOR_FILE, so that resumed
    chunks use the same ones. Every process that finds no file computes them (deterministically, from the same
    inputs); rank 0 writes the file (atomically). The anchors must be disjoint from `pool` (`check_disjoint`)."""
    from safetensors.torch import load_file, save_file

    grads = sorted({n for m in config.method for n in ANCHORS.get(m, ())})
    hidden_methods = [m for m in config.method if m in HIDDEN_METHODS]
    path = folder / ANCHOR_FILE
    if path.is_file():
        stored = load_file(str(path))
        return ({n: Direction({m: Dense(stored[f"grad/{n}/{m}"]) for m in modules}, kind=n) for n in grads},
                {k.removeprefix("hidden/"): v for k, v in stored.items() if k.startswith("hidden/")})
    layer = None if config.layer == ("auto",) else [int(x) for x in config.layer]
    if hidden_methods and layer is not None:
        check_layers(model, layer)
    files = {"harm": (config.harmful_anchors, "--harmful-anchors"), "safe": (config.safe_anchors, "--safe-anchors")}
    encoded = {}
    for n in sorted(set(grads) | ({"harm", "safe"} if hidden_methods else set())):
        encoded[n] = encode_anchors(*files[n], tokenizer, config.system_prompt, config.max_length)
        check_disjoint(pool, [r for r, _ in encoded[n]], files[n][1], files[n][0])
    out_grads = {n: anchor_gradient(model, [e for _, e in encoded[n]], modules, tokenizer.pad_token_id,
                                    config.batch_size, n) for n in grads}
    out_hidden = anchor_states(hidden_methods, model, encoded.get("harm", []), encoded.get("safe", []),
                               tokenizer.pad_token_id, config.batch_size, layer, config.top_k) \
        if hidden_methods else {}
    if main:
        tmp = path.with_name(path.name + ".tmp")
        save_file({**{f"grad/{n}/{m}": t.T.contiguous() for n, d in out_grads.items() for m, t in d.modules.items()},
                   **{f"hidden/{k}": v.contiguous() for k, v in out_hidden.items()}}, str(tmp))
        os.replace(tmp, path)
    return out_grads, out_hidden
