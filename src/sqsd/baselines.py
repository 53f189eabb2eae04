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

The gradient norm is exact and never materialised: the dense-mode pass of `projection.project` with no
directions gives per module ‖G_m‖² = Σ_{t,t'} (a_t·a_t')(δ_t·δ_t') (`Projections.sq`), and ‖∇L‖² is their sum.
The modules are every linear layer of the model but its LM head (`block_linears`: for a decoder-only
transformer, q/k/v/o/gate/up/down of every block). `loss`, `grad-norm` and `self-inf-n` requested together
share that one pass (`theta0`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from sqsd.projection import Projections, _base, project
from sqsd.render import Encoded

# The methods that need the pass at θ₀ (a forward and a backward per batch).
AT_THETA0 = ("loss", "grad-norm", "self-inf-n")


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


def theta0(model: torch.nn.Module, samples: Sequence[Encoded], modules: Sequence[str], pad_token_id: int,
           batch_size: int) -> Projections:
    """The dense pass at θ₀ (any adapters switched off) with no directions: per-sample loss and per-module
    ‖∇_{W_m} L‖² over `modules`."""
    return project(model, samples, [], modules=modules, adapter=None, pad_token_id=pad_token_id,
                   batch_size=batch_size, progress=False)


def method_scores(methods: Sequence[str], seed: int, record_id: str, n_tokens: int,
                  at_theta0: tuple[float, float] | None) -> dict[str, float]:
    """The score of one sample under each baseline in `methods` (`sqsd` is the scorer's own); `at_theta0` =
    (loss, ‖∇L‖²) from `theta0` when any method needs it."""
    out: dict[str, float] = {}
    for method in methods:
        if method == "random":
            out[method] = random_score(seed, record_id)
        elif method == "length":
            out[method] = float(n_tokens)
        elif method == "loss":
            out[method] = at_theta0[0]
        elif method == "grad-norm":
            out[method] = math.sqrt(at_theta0[1])
        elif method == "self-inf-n":
            out[method] = self_inf_n(at_theta0[1], n_tokens)
    return out
