"""Per-sample induced updates and their projections on directions: the fast batched path.

For a sample x with response-only loss L(x) (mean over its response tokens) and a module m:

- LoRA mode, at an anchor adapter (A, B) with scaling s: g_A = ∂L/∂A, g_B = ∂L/∂B, and one SGD step changes
  the effective weight by δW_m = −(g_B A + B g_A) (docs/design.md §2).
- Dense mode, at the model itself: δW_m = −∂L/∂W_m.

The caller names the mode: `project(..., adapter=NAME)` takes the update at that adapter of a PeftModel,
`adapter=None` at the model's own weights (a PeftModel's adapters are switched off). This module is the only
place that turns that choice into hooks and layers.

For a direction T (per module) every metric is a function of three per-module numbers: ⟨δW_m, T_m⟩,
‖δW_m‖² and ‖T_m‖². `Projections` holds them; `metric()` turns them into cosine-sum (the paper's default),
projection or cosine, each over its own direction's modules only, so a direction's score does not depend on
which other directions share the pass.

Fast path (docs/design.md §5): one forward and one backward per batch with no parameter gradients at all —
gradients flow from the loss to the input embeddings only, and hooks on the LoRA (or dense) linears read each
token's input and output-gradient. Per-sample LoRA gradients g_A (r×in) and g_B (out×r) are formed per sample
from those; every inner product and norm is then an r×r or r×in product, never a dense out×in matrix:

    ⟨g_B A + B g_A, T⟩ = ⟨g_B, T Aᵀ⟩ + ⟨g_A, Bᵀ T⟩
    ‖g_B A + B g_A‖²   = ⟨g_B (A Aᵀ), g_B⟩ + ⟨(Bᵀ B) g_A, g_A⟩ + 2 tr((g_Bᵀ B)(g_A Aᵀ))

In dense mode, with a_t the layer input and δ_t the output gradient of token t of one sample:
⟨G, T⟩ = Σ_t δ_tᵀ T a_t and ‖G‖² = Σ_{t,t'} (a_t·a_t')(δ_t·δ_t'), so no per-sample gradient is stored either.
The LM head is applied only at positions that predict a response token, followed by whatever the model's own
forward does to its logits (Gemma-2's soft-capping, Granite's and Cohere's scaling); `check_logits` refuses a
model whose forward does something else. Everything is accumulated in float32 (or the model's dtype if wider).

The slow reference the tests hold this to is `sqsd.reference`, which shares none of this code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from tqdm.auto import tqdm

from sqsd.directions import Direction, LowRank
from sqsd.errors import SqsdError
from sqsd.options import METRICS
from sqsd.render import IGNORE, Collator, Encoded


@dataclass
class Projections:
    """Per-sample, per-module numbers from which every metric follows. n samples, M modules, D directions."""

    modules: list[str]
    dots: torch.Tensor  # (n, D, M): ⟨δW_m(x), T_m^d⟩
    sq: torch.Tensor  # (n, M): ‖δW_m(x)‖²
    t_sq: torch.Tensor  # (D, M): ‖T_m^d‖²
    on: torch.Tensor  # (D, M) bool: module m belongs to direction d
    loss: torch.Tensor  # (n,): the response-only loss of each sample
    n_tokens: torch.Tensor  # (n,): response tokens the loss averages over

    def metric(self, name: str = "cosine-sum") -> torch.Tensor:
        """(n, D) scores under `name` (see METRICS), each direction over its own modules only. A zero update
        scores 0 (its cosine is undefined)."""
        on = self.on.to(self.dots.dtype)
        dots = self.dots * on[None]  # (n, D, M)
        if name == "cosine-sum":
            denom = self.sq.sqrt()[:, None, :] * self.t_sq.sqrt()[None]
            return torch.where(denom > 1e-30, dots / denom.clamp_min(1e-30), 0.0).sum(-1)
        total = dots.sum(-1)  # (n, D)
        if name == "projection":
            return total / (self.t_sq * on).sum(-1).sqrt()[None]
        if name == "cosine":
            sq = self.sq @ on.T  # (n, D): ‖δθ‖² over each direction's own modules
            denom = (sq * (self.t_sq * on).sum(-1)[None]).sqrt()
            return torch.where(denom > 1e-30, total / denom.clamp_min(1e-30), 0.0)
        raise SqsdError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def lora_layers(model: torch.nn.Module, adapter: str, names: Sequence[str]) -> dict[str, torch.nn.Module]:
    """The PEFT LoRA wrapper module of `adapter` for each base-model module name, or a clear error."""
    found = dict(_base(model).named_modules())
    missing = [n for n in names if n not in found or adapter not in getattr(found[n], "lora_A", {})]
    if missing:
        raise SqsdError(f"the anchor adapter {adapter!r} has no LoRA on {len(missing)} module(s) the direction "
                        f"uses, e.g. {missing[0]}; train the anchor on the same target modules as the directions")
    dora = [n for n in names if found[n].use_dora.get(adapter)]
    if dora:  # DoRA rescales B·A by a learned magnitude: δW is not −(g_B A + B g_A), and the hooks do not apply
        raise SqsdError(f"the anchor adapter {adapter!r} is a DoRA adapter (module {dora[0]}); the scorer takes "
                        "updates at plain LoRA anchors only: train the anchor without --use-dora")
    return {n: found[n] for n in names}


def _linears(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The linear layer of each module name; a PEFT wrapper's own `base_layer` when adapters are attached."""
    found = dict(_base(model).named_modules())
    layers = {n: getattr(found.get(n), "base_layer", found.get(n)) for n in names}
    missing = [n for n, layer in layers.items() if not isinstance(layer, torch.nn.Linear)]
    if missing:
        raise SqsdError(f"the model has no linear layer named {missing[0]} (a dense direction's module)")
    return layers


def _modules(directions: Sequence[Direction]) -> list[str]:
    names = sorted({m for d in directions for m in d.modules})
    if not names:
        raise SqsdError("the directions hold no modules")
    return names


def _t_sq(directions: Sequence[Direction], modules: list[str], dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(directions), len(modules), dtype=dtype)
    for d, direction in enumerate(directions):
        for m, name in enumerate(modules):
            if name in direction.modules:
                out[d, m] = direction.modules[name].to(dtype).sq_norm()
    return out


def _on(directions: Sequence[Direction], modules: list[str]) -> torch.Tensor:
    on = torch.tensor([[name in d.modules for name in modules] for d in directions], dtype=torch.bool)
    return on.reshape(len(directions), len(modules))


class _Capture:
    """Hooks that turn one batched backward into per-sample ⟨δW_m, T_m⟩ and ‖δW_m‖² for every module."""

    def __init__(self, model, directions: Sequence[Direction], modules: list[str], mode: str,
                 adapter: str | None, dtype: torch.dtype):
        self.mode, self.dtype, self.modules = mode, dtype, modules
        self.handles: list = []
        self.dots: dict[int, torch.Tensor] = {}  # module index -> (b, D)
        self.sq: dict[int, torch.Tensor] = {}  # module index -> (b,)
        layers = lora_layers(model, adapter, modules) if mode == "lora" else _linears(model, modules)
        for m, name in enumerate(modules):
            matrices = [d.modules.get(name) for d in directions]
            matrices = [None if t is None else t.to(dtype) for t in matrices]
            if mode == "lora":
                layer = layers[name]
                A = layer.lora_A[adapter].weight.detach().to(dtype)  # (r, in)
                B = layer.lora_B[adapter].weight.detach().to(dtype)  # (out, r)
                # Per module and direction: T Aᵀ (out, r) and Bᵀ T (r, in); Grams AAᵀ, BᵀB (r, r).
                ctx = {"A": A, "B": B, "AAt": A @ A.T, "BtB": B.T @ B,
                       "TAt": [None if t is None else t.times_t(A) for t in matrices],
                       "BtT": [None if t is None else t.t_times(B) for t in matrices], "saved": {}}
                self._hook_lora(layer.lora_A[adapter], layer.lora_B[adapter], m, ctx)
            else:
                self._hook_dense(layers[name], m, matrices)

    def _hook_lora(self, lora_A, lora_B, m: int, ctx: dict) -> None:
        saved = ctx["saved"]

        def on_B(_mod, inputs, output):
            saved["u"] = inputs[0].detach()  # (b, T, r): A x

            def grad_B(grad):  # grad of the lora_B output = s·δ (PEFT scales after lora_B)
                saved["gB"] = torch.einsum("bto,btr->bor", grad.to(self.dtype), saved.pop("u").to(self.dtype))
            output.register_hook(grad_B)

        def on_A(_mod, inputs, output):
            saved["x"] = inputs[0].detach()  # (b, T, in)

            def grad_A(grad):  # grad of the lora_A output = Bᵀ(s·δ); arrives after grad_B
                gA = torch.einsum("btr,bti->bri", grad.to(self.dtype), saved.pop("x").to(self.dtype))
                gB = saved.pop("gB")
                self._lora_update(m, ctx, gA, gB)
            output.register_hook(grad_A)

        self.handles += [lora_B.register_forward_hook(on_B), lora_A.register_forward_hook(on_A)]

    def _lora_update(self, m: int, ctx: dict, gA: torch.Tensor, gB: torch.Tensor) -> None:
        """gA (b, r, in), gB (b, out, r) -> per-sample dots with δW = −(gB A + B gA) and ‖δW‖²."""
        dots = []
        for TAt, BtT in zip(ctx["TAt"], ctx["BtT"]):
            if TAt is None:
                dots.append(torch.zeros(gA.shape[0], dtype=self.dtype, device=gA.device))
            else:
                dots.append(-((gB * TAt).sum((1, 2)) + (gA * BtT).sum((1, 2))))
        cross = torch.einsum("bor,os->brs", gB, ctx["B"])  # gBᵀ B (b, r, r)
        gAAt = torch.einsum("bri,si->brs", gA, ctx["A"])  # gA Aᵀ (b, r, r)
        sq = ((gB @ ctx["AAt"]) * gB).sum((1, 2)) + ((ctx["BtB"] @ gA) * gA).sum((1, 2)) \
            + 2 * torch.einsum("brs,bsr->b", cross, gAAt)
        self._add(m, dots, sq)

    def _hook_dense(self, linear: torch.nn.Linear, m: int, matrices: list) -> None:
        saved: dict = {}

        def on_forward(_mod, inputs, output):
            saved["a"] = inputs[0].detach()  # (b, T, in)

            def grad_out(delta):  # (b, T, out): ∂L/∂y
                a, delta = saved.pop("a").to(self.dtype), delta.to(self.dtype)
                # G = Σ_t δ_t a_tᵀ; ⟨−G, T⟩ = −Σ_t δ_t·(T a_t); ‖G‖² = Σ_{t,t'} (a_t·a_t')(δ_t·δ_t')
                dots = [torch.zeros(a.shape[0], dtype=self.dtype, device=a.device) if t is None
                        else -(delta * t.apply(a)).sum((1, 2)) for t in matrices]
                sq = ((a @ a.transpose(1, 2)) * (delta @ delta.transpose(1, 2))).sum((1, 2))
                self._add(m, dots, sq)
            output.register_hook(grad_out)

        self.handles.append(linear.register_forward_hook(on_forward))

    def _add(self, m: int, dots: list[torch.Tensor], sq: torch.Tensor) -> None:
        """Per direction (b,) dots, stacked to (b, D) (D may be 0: norms only), and (b,) squared norms."""
        stacked = torch.stack(dots, 1) if dots else sq.new_zeros(sq.shape[0], 0)
        self.dots[m], self.sq[m] = stacked.cpu(), sq.cpu()

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, D, M) dots and (b, M) squared norms of the last backward; clears the buffers."""
        if len(self.dots) != len(self.modules):
            raise SqsdError("some hooked modules received no gradient; is the model in a mode that skips them?")
        dots = torch.stack([self.dots[m] for m in range(len(self.modules))], -1)
        sq = torch.stack([self.sq[m] for m in range(len(self.modules))], -1)
        self.dots.clear()
        self.sq.clear()
        return dots, sq

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _batch_loss(model, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean cross-entropy over response tokens, (b,) each, with the LM head only where needed.

    Gradients reach the network through the input embeddings (they require grad; no parameter does).
    """
    base = _base(model)
    embeds = base.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    mask = batch["attention_mask"]
    if bool((mask[:, :-1] >= mask[:, 1:]).all()):
        # Right padding: under causal attention no real token sees a later pad, and pads carry no loss, so their
        # output gradients are exactly zero. Dropping the mask lets attention take its causal fast path (~10%).
        mask = positions = None
    else:
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # real tokens at 0..n-1 whichever side the padding is on
    hidden = base.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
    logits = output_logits(base, hidden[rows, cols], dtype)  # (N, vocab), response positions only
    ce = F.cross_entropy(logits, targets[rows, cols], reduction="none")
    b = batch["input_ids"].shape[0]
    n = torch.zeros(b, dtype=dtype, device=ce.device).index_add_(0, rows, torch.ones_like(ce))
    total = torch.zeros(b, dtype=dtype, device=ce.device).index_add_(0, rows, ce)
    return total / n, n


def output_logits(model: torch.nn.Module, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The LM head on final hidden states (..., hidden) in `dtype`, then what the model's forward does to its
    logits: soft-capping (Gemma-2 and later), division by `logits_scaling` (Granite), multiplication by
    `logit_scale` (Cohere)."""
    base = _base(model)
    config = base.config
    logits = base.get_output_embeddings()(hidden).to(dtype)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None) and config.model_type.startswith("cohere"):
        logits = logits * config.logit_scale
    return logits


@torch.no_grad()
def check_logits(model: torch.nn.Module) -> None:
    """Refuse a model whose own forward turns hidden states into logits differently from `output_logits` (an
    architecture with a logit post-processing step this module does not know): its loss would not be the
    model's. One forward of 8 tokens."""
    base = _base(model)
    ids = torch.arange(min(8, base.config.vocab_size), device=next(model.parameters()).device)[None]
    was_training = model.training
    model.eval()  # no dropout: both computations must see the same network
    try:
        theirs = model(input_ids=ids).logits[0].float()
        ours = output_logits(base, base.get_decoder()(input_ids=ids).last_hidden_state[0], torch.float32)
    finally:
        model.train(was_training)
    if not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-3 * float(theirs.abs().max())):
        raise SqsdError(f"the {base.config.model_type} model post-processes its logits in a way the scorer does "
                        "not reproduce (it knows final_logit_softcapping, logits_scaling and Cohere's "
                        "logit_scale); its scores would not use the model's own loss, so it is refused")


class _ScalingOverride:
    """Temporarily replace the LoRA scaling of every adapted layer (the paper scores safety at s = 1.0)."""

    def __init__(self, model, adapter: str, scaling: float | None):
        self.layers = [m for m in _base(model).modules() if isinstance(getattr(m, "scaling", None), dict)
                       and adapter in m.scaling]
        self.adapter, self.scaling, self.saved = adapter, scaling, []

    def __enter__(self):
        if self.scaling is not None:
            self.saved = [m.scaling[self.adapter] for m in self.layers]
            for m in self.layers:
                m.scaling[self.adapter] = self.scaling

    def __exit__(self, *exc):
        for m, s in zip(self.layers, self.saved):
            m.scaling[self.adapter] = s


def _accum_dtype(model) -> torch.dtype:
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def theta0_batches(model, samples: Sequence[Encoded], pad_token_id: int,
                   batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(input indices, batch on the model's device) for length-bucketed, right-padded batches of `samples`, with
    any adapters switched off and the model in eval mode while it runs (both restored after): the passes of the
    baselines, which read the model at its own weights θ₀."""
    collate = Collator(pad_token_id)
    device = next(model.parameters()).device
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if isinstance(model, PeftModel) else nullcontext():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                yield idx, {k: v.to(device) for k, v in collate(
                    [{"input_ids": samples[i].input_ids, "labels": samples[i].labels} for i in idx]).items()}
    finally:
        model.train(was_training)


@torch.no_grad()
def response_losses(model, samples: Sequence[Encoded], pad_token_id: int, batch_size: int) -> torch.Tensor:
    """(n,) each sample's mean response-token loss at the model's own weights (any adapters switched off), in
    the accumulation dtype and input order: forward only."""
    dtype = _accum_dtype(model)
    out = torch.zeros(len(samples), dtype=dtype)
    for idx, batch in theta0_batches(model, samples, pad_token_id, batch_size):
        out[idx] = _batch_loss(model, batch, dtype)[0].cpu()
    return out


def project(model, samples: Sequence[Encoded], directions: Sequence[Direction], *, pad_token_id: int,
            adapter: str | None = None, scaling: float | None = None, batch_size: int = 8,
            padding_side: str = "right", progress: bool = True,
            modules: Sequence[str] | None = None) -> Projections:
    """Fast path: per-sample projections for `samples` on `directions`.

    `adapter` names the anchor adapter of a PeftModel (LoRA mode; `scaling` overrides its alpha/r while
    scoring); None scores in dense mode at the model's own weights, with any adapters switched off. Samples
    are length-bucketed into batches; results come back in input order. `modules` (default: those of the
    directions) are the modules whose ‖δW_m‖² is measured; with no directions, only these norms (and the loss)
    are computed (`sqsd.baselines`' gradient norm)."""
    modules, dtype = list(modules) if modules else _modules(directions), _accum_dtype(model)
    mode = "dense" if adapter is None else "lora"
    if mode == "lora":
        if not isinstance(model, PeftModel) or adapter not in model.peft_config:
            raise SqsdError(f"the update is to be taken at adapter {adapter!r}, which the model does not hold")
        model.set_adapter(adapter)
    off = model.disable_adapter() if mode == "dense" and isinstance(model, PeftModel) else nullcontext()
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    collate = Collator(pad_token_id, padding_side=padding_side)
    n = len(samples)
    dots = torch.zeros(n, len(directions), len(modules), dtype=dtype)
    sq = torch.zeros(n, len(modules), dtype=dtype)
    loss, n_tokens = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
    capture = _Capture(model, directions, modules, mode, adapter, dtype)  # checks the layers before any hook
    was_training = model.training
    model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    device = next(model.parameters()).device
    try:
        with off, _ScalingOverride(model, adapter, scaling):
            for start in tqdm(range(0, n, batch_size), desc="score", unit="batch", disable=not progress):
                idx = order[start:start + batch_size]
                batch = {k: v.to(device) for k, v in collate(
                    [{"input_ids": samples[i].input_ids, "labels": samples[i].labels} for i in idx]).items()}
                per_sample, count = _batch_loss(model, batch, dtype)
                per_sample.sum().backward()
                d, s = capture.take()
                dots[idx], sq[idx] = d, s
                loss[idx], n_tokens[idx] = per_sample.detach().cpu(), count.cpu()
    finally:
        capture.remove()
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)
    return Projections(modules, dots, sq, _t_sq(directions, modules, dtype), _on(directions, modules), loss,
                       n_tokens)


def lowrank_from_model(model, modules: Sequence[str] | None = None) -> Direction:
    """The anchor adapter's own B·A as a direction (handy for tests and for `directions info`)."""
    adapter = model.active_adapter
    names = modules or [n for n, m in _base(model).named_modules() if adapter in getattr(m, "lora_A", {})]
    layers = lora_layers(model, adapter, names)
    return Direction({n: LowRank(layers[n].lora_A[adapter].weight.detach().clone(),
                                 layers[n].lora_B[adapter].weight.detach().clone()) for n in names})
