"""The hidden-state baselines of `sqsd score --method` (forward passes only): the maths, higher = riskier.

For a sample x at the model's own weights θ₀ (no adapter), with h(x) the final hidden state (after the final
norm) at x's last response token, h_ℓ(x) the output of decoder block ℓ at that token, and h̄_ℓ(x) the output of
block ℓ averaged over x's response tokens:

    repsim      cos(h(x), h̄_harm) − cos(h(x), h̄_safe), h̄_set = mean of h over the set
                (He, Xia, Henderson, COLM 2024: representation features)
    larf        mean over the top-k harmful anchors a of cos(h_ℓ*(x), h_ℓ*(a)) − the same over the safe anchors,
                at the safety-sensitive layer ℓ* (LARF, Li et al. 2025, arXiv 2507.18631)
    datashield  Σ_{ℓ ∈ layers} ⟨h̄_ℓ(x), v_ℓ⟩ / ‖v_ℓ‖, v_ℓ = mean h̄_ℓ of the compliant answers − mean h̄_ℓ of the
                refusals to the same harmful prompts (DataShield, arXiv 2606.00160)

The anchor sets are those of the gradient baselines: harmful prompts with compliant answers (`--harmful-anchors`)
and with refusals (`--safe-anchors`); datashield keeps only the prompts both sets have (it pairs them by
prompt). ℓ* comes from `safety_layer` (the layer scan: the block whose damping most raises the refusal loss on the
safe anchors) or from `--layer`; datashield's layers are `--layer`'s, or ℓ* with `auto`. A cosine with a zero
vector, and a projection on a zero v_ℓ, are 0.

Everything a run needs of the anchors is one flat dict of tensors (`anchor_states`), kept by `sqsd score` in its
output folder next to the anchor gradients, so resumed chunks score against the same features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sqsd.data import Record
from sqsd.errors import SqsdError
from sqsd.projection import _accum_dtype, _base, response_losses, theta0_batches
from sqsd.render import IGNORE, Encoded

HIDDEN_METHODS = ("repsim", "larf", "datashield")
# Every linear weight of a block is multiplied by this in the layer scan (LARF damps one layer at a time).
LAYER_SCALE = 0.5
# The layer scan measures the refusal loss on at most this many safe anchors (the first ones).
SCAN_PROBES = 32


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return _base(model).get_decoder().layers


def check_layers(model: torch.nn.Module, layers: Sequence[int]) -> None:
    """Every index in `layers` names a decoder block of `model`, or a clear error (`--layer`)."""
    n = len(_blocks(model))
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise SqsdError(f"--layer {bad[0]} is out of range: the model has {n} decoder layers (0..{n - 1})")


@torch.no_grad()
def states(model: torch.nn.Module, samples: Sequence[Encoded], pad_token_id: int, batch_size: int,
           layers: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """Per-sample hidden states at θ₀ (any adapters switched off), forward only, in input order, in the
    accumulation dtype (float64 for a float64 model, else float32):

        "final"       (n, d) final hidden state (after the final norm) at the last response token
        "last/{ℓ}"    (n, d) output of decoder block ℓ at the last response token, for ℓ in `layers`
        "mean/{ℓ}"    (n, d) output of decoder block ℓ averaged over the response tokens

    The response tokens are those the loss supervises (labels ≠ IGNORE); batches are length-bucketed and
    right-padded, so every real token keeps its position and never attends to a pad."""
    base = _base(model)
    dtype = _accum_dtype(model)
    d = base.config.hidden_size
    out = {"final": torch.zeros(len(samples), d, dtype=dtype)}
    out |= {f"{kind}/{layer}": torch.zeros(len(samples), d, dtype=dtype)
            for layer in layers for kind in ("last", "mean")}
    captured: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def keep(module, args, output):  # a block returns its hidden states, or a tuple that starts with them
            captured[layer] = output[0] if isinstance(output, tuple) else output
        return keep

    handles = [_blocks(model)[layer].register_forward_hook(hook(layer)) for layer in layers]
    try:
        for idx, batch in theta0_batches(model, samples, pad_token_id, batch_size):
            final = base.get_decoder()(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).last_hidden_state  # (b, T, d)
            response = (batch["labels"] != IGNORE).to(dtype)  # (b, T)
            # the last response position: the largest position whose label is supervised
            last = (response * torch.arange(response.shape[1], device=final.device)).argmax(-1)  # (b,)
            rows = torch.arange(len(idx), device=final.device)
            out["final"][idx] = final[rows, last].to(dtype).cpu()
            for layer in layers:
                h = captured[layer].to(dtype)  # (b, T, d)
                out[f"last/{layer}"][idx] = h[rows, last].cpu()
                mean = (response[..., None] * h).sum(1) / response.sum(1, keepdim=True)  # (b, d)
                out[f"mean/{layer}"][idx] = mean.cpu()
    finally:
        for handle in handles:
            handle.remove()
    return out


def safety_layer(model: torch.nn.Module, probes: Sequence[Encoded], pad_token_id: int,
                 batch_size: int) -> tuple[int, list[float]]:
    """LARF's layer scan: ℓ* = argmax_ℓ [L_refusal(θ₀ with every linear weight of block ℓ × LAYER_SCALE) −
    L_refusal(θ₀)] on the first SCAN_PROBES safe anchors (harmful prompts → refusals): the block whose damping
    most weakens refusal. Returns ℓ* and the loss increase of every block; the weights are restored exactly."""
    probes = probes[:SCAN_PROBES]
    before = float(response_losses(model, probes, pad_token_id, batch_size).mean())
    rises = []
    for block in _blocks(model):
        weights = [m.weight for name, m in block.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".lora_" not in f".{name}"]
        saved = [w.detach().clone() for w in weights]
        with torch.no_grad():
            for w in weights:
                w.mul_(LAYER_SCALE)
        try:
            rises.append(float(response_losses(model, probes, pad_token_id, batch_size).mean()) - before)
        finally:
            with torch.no_grad():
                for w, s in zip(weights, saved):
                    w.copy_(s)
    return max(range(len(rises)), key=lambda i: (rises[i], -i)), rises


def anchor_states(methods: Sequence[str], model: torch.nn.Module, harm: Sequence[tuple[Record, Encoded]],
                  safe: Sequence[tuple[Record, Encoded]], pad_token_id: int, batch_size: int,
                  layer: Sequence[int] | None, top_k: int) -> dict[str, torch.Tensor]:
    """What the hidden-state `methods` need of the anchor sets, as one flat dict of tensors:

        "repsim/harm", "repsim/safe"   (d,) h̄_harm, h̄_safe
        "larf/layer"                   (1,) ℓ*; "larf/harm", "larf/safe" (n_set, d) h_ℓ*(a) of every anchor;
                                       "larf/top_k" (1,) k
        "datashield/layers"            (L,) the layers; "datashield/v/{ℓ}" (d,) v_ℓ
        "scan/rise"                    (n_blocks,) the layer scan's loss increase per block, when it ran

    `layer` None = `auto` (the layer scan on the safe anchors); datashield's pairs are the anchors whose prompt
    both sets have, an error when there is none."""
    out: dict[str, torch.Tensor] = {}
    if layer is None and ("larf" in methods or "datashield" in methods):
        best, rises = safety_layer(model, [e for _, e in safe], pad_token_id, batch_size)
        layer = [best]
        out["scan/rise"] = torch.tensor(rises, dtype=torch.float64)
    layers = sorted(set(layer or ()))
    feats = {name: states(model, [e for _, e in anchors], pad_token_id, batch_size, layers)
             for name, anchors in (("harm", harm), ("safe", safe))}
    if "repsim" in methods:
        out |= {f"repsim/{name}": f["final"].mean(0) for name, f in feats.items()}
    if "larf" in methods:
        out["larf/layer"] = torch.tensor([layer[0]])
        out["larf/top_k"] = torch.tensor([top_k])
        out |= {f"larf/{name}": f[f"last/{layer[0]}"] for name, f in feats.items()}
    if "datashield" in methods:
        shared = {r.prompt_key() for r, _ in harm} & {r.prompt_key() for r, _ in safe}
        if not shared:
            raise SqsdError("--method datashield pairs --harmful-anchors and --safe-anchors by prompt, and no prompt "
                            "is in both (use `sqsd directions data --kind danger` and `--kind safety` with the same "
                            "prompts and seed)")
        keep = {name: torch.tensor([r.prompt_key() in shared for r, _ in anchors])
                for name, anchors in (("harm", harm), ("safe", safe))}
        out["datashield/layers"] = torch.tensor(layers)
        for ell in layers:
            out[f"datashield/v/{ell}"] = (feats["harm"][f"mean/{ell}"][keep["harm"]].mean(0)
                                         - feats["safe"][f"mean/{ell}"][keep["safe"]].mean(0))
    return out


def sample_layers(methods: Sequence[str], anchors: dict[str, torch.Tensor]) -> list[int]:
    """The blocks whose outputs the samples need for `methods`, given their anchor features."""
    layers = set()
    if "larf" in methods:
        layers.add(int(anchors["larf/layer"][0]))
    if "datashield" in methods:
        layers |= {int(ell) for ell in anchors["datashield/layers"]}
    return sorted(layers)


def _cos(h: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """(n, m) cosines between the rows of h (n, d) and of others (m, d); 0 where either is a zero vector."""
    denom = h.norm(dim=-1, keepdim=True) * others.norm(dim=-1)
    return torch.where(denom > 0, h @ others.T / denom.clamp_min(1e-300), 0.0)


def hidden_scores(methods: Sequence[str], sample_states: dict[str, torch.Tensor],
                  anchors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(n,) scores of each hidden-state method in `methods`, from `states` of the samples (with the layers
    `sample_layers` names) and `anchor_states`."""
    dtype = sample_states["final"].dtype
    a = {k: v.to(dtype) if v.is_floating_point() else v for k, v in anchors.items()}
    out = {}
    if "repsim" in methods:
        h = sample_states["final"]
        out["repsim"] = (_cos(h, a["repsim/harm"][None]) - _cos(h, a["repsim/safe"][None]))[:, 0]
    if "larf" in methods:
        h = sample_states[f"last/{int(a['larf/layer'][0])}"]
        k = int(a["larf/top_k"][0])

        def top(name: str) -> torch.Tensor:
            sims = _cos(h, a[f"larf/{name}"])  # (n, n_set)
            return sims.topk(min(k, sims.shape[1]), dim=1).values.mean(1)
        out["larf"] = top("harm") - top("safe")
    if "datashield" in methods:
        total = torch.zeros(len(sample_states["final"]), dtype=dtype)
        for ell in a["datashield/layers"].tolist():
            v = a[f"datashield/v/{ell}"]
            if v.norm() > 0:
                total += sample_states[f"mean/{ell}"] @ v / v.norm()
        out["datashield"] = total
    return out
