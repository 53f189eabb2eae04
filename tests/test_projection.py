"""The fast path (`projection.project`) against the independent reference (`reference.reference_scores`) and
against torch.func per-sample gradients; invariances; models whose forward post-processes logits; bad anchors."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.func import functional_call, grad, vmap

from sqsd.data import Record
from sqsd.directions import Dense, Direction, LowRank
from sqsd.errors import SqsdError
from sqsd.projection import METRICS, check_logits, lowrank_from_model, project
from sqsd.reference import reference_scores
from sqsd.render import IGNORE, Collator, encode_record
from tiny import tiny_model, tiny_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_anchor(model, seed=1, r=4, alpha=8, **kw):
    """A LoRA anchor with random, non-zero A and B (B = 0 would make every gradient w.r.t. A vanish)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                                                  init_lora_weights=False, **kw))
    return peft_model.to(torch.float64).eval()


def random_direction(anchor, seed, kind="lowrank", rank=3, every=1):
    """A direction over the anchor's modules (every `every`-th) with random factors (or dense matrices)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, term in list(lowrank_from_model(anchor).modules.items())[::every]:
        out, inp = term.shape
        if kind == "lowrank":
            modules[name] = LowRank(torch.randn(rank, inp, generator=g, dtype=torch.float64),
                                    torch.randn(out, rank, generator=g, dtype=torch.float64))
        else:
            modules[name] = Dense(torch.randn(out, inp, generator=g, dtype=torch.float64))
    return Direction(modules)


def samples(tokenizer, n=6):
    texts = [("hi", "hello there"), ("what is two plus two, please?", "four"), ("name a colour", "red, or blue"),
             ("x" * 30, "a fairly long answer that goes on for a while"), ("short", "ok"), ("tell me", "no idea")]
    out = []
    for i, (p, r) in enumerate(texts[:n]):
        rec = Record(id=str(i), source="t", row=i, prompt=({"role": "user", "content": p},), response=r, meta={})
        out.append(encode_record(rec, tokenizer))
    return out


@pytest.fixture
def setup():
    tok = tiny_tokenizer()
    model = tiny_model(tok, dtype=torch.float64)
    anchor = lora_anchor(model)
    return tok, anchor, samples(tok)



def assert_metrics_equal(fast, ref, rtol=1e-9, atol=1e-12):
    for metric in METRICS:
        torch.testing.assert_close(fast.metric(metric), ref.scores[metric], rtol=rtol, atol=atol, msg=metric)
    torch.testing.assert_close(fast.loss, ref.loss, rtol=rtol / 10, atol=atol)
    torch.testing.assert_close(fast.n_tokens, ref.n_tokens)


@pytest.mark.parametrize("kind", ["lowrank", "dense"])
@pytest.mark.parametrize("scaling", [None, 1.0])
def test_fast_equals_reference_lora_mode(setup, kind, scaling):
    tok, anchor, data = setup
    # the second direction covers every third module only: its cosine must run over those alone
    directions = [random_direction(anchor, 10, kind), random_direction(anchor, 11, kind, every=3)]
    fast = project(anchor, data, directions, pad_token_id=tok.pad_token_id, adapter="default", batch_size=4,
                   scaling=scaling, progress=False)
    ref = reference_scores(anchor, data, directions, adapter="default", scaling=scaling)
    assert_metrics_equal(fast, ref)
    assert (fast.sq > 0).all()  # non-trivial: every module moved
    assert len({round(float(v), 6) for v in ref.scores["cosine"][:, 1]}) == len(data)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over SDPA on CPU: slow, still exact
def test_fast_equals_torch_func_per_sample_gradients(setup):
    """A third, independent computation: vmap(grad) of the model's own loss over the LoRA factors."""
    tok, anchor, data = setup
    directions = [random_direction(anchor, 10), random_direction(anchor, 11, "dense", every=2)]
    fast = project(anchor, data, directions, pad_token_id=tok.pad_token_id, adapter="default", batch_size=3,
                   progress=False)
    params = {n: p.detach() for n, p in anchor.named_parameters() if "lora_" in n}
    batch = Collator(tok.pad_token_id)([{"input_ids": s.input_ids, "labels": s.labels} for s in data])

    def loss(p, ids, labels):  # one right-padded sample: pads come after every real token and carry no loss
        logits = functional_call(anchor, p, args=(ids[None],)).logits[0, :-1]
        return F.cross_entropy(logits, labels[1:], ignore_index=IGNORE)

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, batch["input_ids"], batch["labels"])
    for i in range(len(data)):
        delta = {}
        for name in lowrank_from_model(anchor).modules:
            key = f"base_model.model.{name}.lora_%s.default.weight"
            A, B = params[key % "A"], params[key % "B"]
            delta[name] = -(grads[key % "B"][i] @ A + B @ grads[key % "A"][i])
        for d, direction in enumerate(directions):
            names = sorted(direction.modules)
            v = torch.cat([delta[m].flatten() for m in names])
            t = torch.cat([direction.modules[m].dense().flatten() for m in names])
            expected = {"cosine-sum": sum(float((delta[m] * direction.modules[m].dense()).sum()
                                                / (delta[m].norm() * direction.modules[m].dense().norm()))
                                          for m in names),
                        "projection": float(v @ t / t.norm()), "cosine": float(v @ t / (v.norm() * t.norm()))}
            for metric, value in expected.items():
                assert float(fast.metric(metric)[i, d]) == pytest.approx(value, rel=1e-9, abs=1e-12), metric


def test_every_metric_is_the_same_alone_or_next_to_another_direction(setup):
    tok, anchor, data = setup
    d1, d2 = random_direction(anchor, 10), random_direction(anchor, 11, "dense", every=3)
    for adapter in ("default", None):
        kw = {"pad_token_id": tok.pad_token_id, "adapter": adapter, "progress": False}
        together = project(anchor, data, [d1, d2], **kw)
        alone = [project(anchor, data, [d], **kw) for d in (d1, d2)]
        for metric in METRICS:
            for d in range(2):
                torch.testing.assert_close(together.metric(metric)[:, d], alone[d].metric(metric)[:, 0],
                                           rtol=1e-12, atol=1e-14, msg=f"{metric} {adapter}")


def test_scaling_override_gives_what_an_adapter_with_that_scaling_gives(setup):
    tok, anchor, data = setup
    d = [random_direction(anchor, 10)]
    kw = {"pad_token_id": tok.pad_token_id, "adapter": "default", "progress": False}
    before = project(anchor, data, d, **kw)
    overridden = project(anchor, data, d, scaling=0.5, **kw)
    # the same weights under a config whose own alpha/r is 0.5 (alpha 2, r 4)
    other = lora_anchor(tiny_model(tok, dtype=torch.float64), alpha=2)
    other.load_state_dict(anchor.state_dict())
    assert {float(s) for m in other.modules() if isinstance(getattr(m, "scaling", None), dict)
            for s in m.scaling.values()} == {0.5}
    natural = project(other, data, d, **kw)
    for metric in METRICS:
        torch.testing.assert_close(overridden.metric(metric), natural.metric(metric), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(overridden.loss, natural.loss, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(overridden.metric(), before.metric())
    # and the override is undone afterwards
    torch.testing.assert_close(project(anchor, data, d, **kw).metric(), before.metric(), rtol=0, atol=0)


def test_fast_equals_reference_dense_mode():
    tok = tiny_tokenizer()
    model = tiny_model(tok, dtype=torch.float64)
    data = samples(tok)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    g = torch.Generator().manual_seed(3)
    mods = dict(model.named_modules())
    directions = [Direction({n: Dense(torch.randn(mods[n].weight.shape, generator=g, dtype=torch.float64))
                             for n in names}),
                  Direction({n: LowRank(torch.randn(2, mods[n].in_features, generator=g, dtype=torch.float64),
                                        torch.randn(mods[n].out_features, 2, generator=g, dtype=torch.float64))
                             for n in names[:5]})]  # a direction on a subset of modules
    fast = project(model, data, directions, pad_token_id=tok.pad_token_id, batch_size=3, progress=False)
    assert_metrics_equal(fast, reference_scores(model, data, directions))
    assert all(p.grad is None for p in model.parameters())  # the fast path computes no parameter gradient
    # dense mode on a model with an adapter attached: the adapter is switched off, the base weights scored
    anchor = lora_anchor(model)
    on_anchor = project(anchor, data, directions, pad_token_id=tok.pad_token_id, batch_size=3, progress=False)
    for metric in METRICS:
        torch.testing.assert_close(on_anchor.metric(metric), fast.metric(metric), rtol=1e-10, atol=1e-12)
    assert_metrics_equal(on_anchor, reference_scores(anchor, data, directions))


def test_invariant_to_batch_size_padding_and_order(setup):
    tok, anchor, data = setup
    d = [random_direction(anchor, 10), random_direction(anchor, 11, every=2)]
    kw = {"pad_token_id": tok.pad_token_id, "adapter": "default", "progress": False}
    base = project(anchor, data, d, batch_size=1, **kw)

    def same(other, perm=None):
        perm = list(range(len(data))) if perm is None else perm
        for field in ("dots", "sq", "loss", "n_tokens"):
            torch.testing.assert_close(getattr(other, field), getattr(base, field)[perm], rtol=1e-9, atol=1e-12,
                                       msg=field)
        torch.testing.assert_close(other.t_sq, base.t_sq, rtol=0, atol=0)
        assert torch.equal(other.on, base.on)

    for batch_size in (2, 6):
        same(project(anchor, data, d, batch_size=batch_size, **kw))
    same(project(anchor, data, d, batch_size=6, padding_side="left", **kw))
    perm = [3, 0, 5, 1, 4, 2]
    same(project(anchor, [data[i] for i in perm], d, batch_size=4, **kw), perm)


def test_negating_a_direction_flips_the_sign_and_projection_is_linear(setup):
    tok, anchor, data = setup
    kw = {"pad_token_id": tok.pad_token_id, "adapter": "default", "progress": False}
    d1, d2 = random_direction(anchor, 10, "dense"), random_direction(anchor, 11, "dense")
    combo = Direction({m: Dense(2.0 * d1.modules[m].T - 3.0 * d2.modules[m].T) for m in d1.modules})
    p = project(anchor, data, [d1, d1.scaled(-1.0), d2, combo], **kw)
    s = p.metric("cosine-sum")
    torch.testing.assert_close(s[:, 1], -s[:, 0], rtol=1e-10, atol=1e-12)
    # the raw inner product <δθ, d> is linear in d (projection divides by ‖d‖, so compare the dots)
    torch.testing.assert_close(p.dots[:, 3].sum(-1), 2 * p.dots[:, 0].sum(-1) - 3 * p.dots[:, 2].sum(-1),
                               rtol=1e-9, atol=1e-12)
    # projection and cosine are scale-free in the direction's length
    q = project(anchor, data, [d1, d1.scaled(5.0)], **kw)
    torch.testing.assert_close(q.metric("projection")[:, 1], q.metric("projection")[:, 0])
    torch.testing.assert_close(q.metric("cosine")[:, 1], q.metric("cosine")[:, 0])


def test_float32_model_accumulates_in_float32_and_matches_float64():
    tok = tiny_tokenizer()
    model64 = lora_anchor(tiny_model(tok, dtype=torch.float64))
    model32 = lora_anchor(tiny_model(tok, dtype=torch.float64)).to(torch.float32)
    data = samples(tok)
    d = [random_direction(model64, 10)]
    kw = {"pad_token_id": tok.pad_token_id, "adapter": "default", "progress": False}
    a = project(model64, data, d, **kw).metric()
    b = project(model32, data, [x.to(torch.float32) for x in d], **kw).metric()
    assert b.dtype == torch.float32
    torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-5)


def _gemma2(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5,
                          attn_implementation="eager", pad_token_id=tok.pad_token_id)
    return Gemma2ForCausalLM(config).to(torch.float64).eval()


def _granite(tok):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=0.1,
                           embedding_multiplier=3.0, pad_token_id=tok.pad_token_id)
    return GraniteForCausalLM(config).to(torch.float64).eval()


@pytest.mark.parametrize("build, rtol", [(_gemma2, 1e-6), (_granite, 1e-9)])
def test_loss_is_the_models_own_on_architectures_that_post_process_logits(build, rtol):
    """Gemma-2 soft-caps its logits and Granite divides them: the scorer's loss must be the model's own.
    (Gemma-2's eager attention takes its softmax in float32, so batches agree with single samples to ~1e-8.)"""
    tok = tiny_tokenizer()
    model = build(tok)
    data = samples(tok)
    check_logits(model)
    for anchor, adapter in ((model, None), (lora_anchor(model), "default")):
        directions = [random_direction(lora_anchor(build(tok)), 10)]
        fast = project(anchor, data, directions, pad_token_id=tok.pad_token_id, adapter=adapter, batch_size=4,
                       progress=False)
        with torch.no_grad():
            own = [float(anchor(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels])).loss)
                   for s in data]
        # HF's loss upcasts the logits to float32 only, hence the tolerance
        torch.testing.assert_close(fast.loss, torch.tensor(own, dtype=torch.float64), rtol=1e-6, atol=1e-7)
        assert_metrics_equal(fast, reference_scores(anchor, data, directions, adapter=adapter), rtol, rtol * 1e-3)
    # without the post-processing the loss would differ: the test can fail
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=torch.tensor([data[0].input_ids])).last_hidden_state
        raw = F.cross_entropy(model.get_output_embeddings()(hidden)[0, :-1], torch.tensor(data[0].labels[1:]),
                              ignore_index=IGNORE)
    assert abs(float(raw) - float(fast.loss[0])) > 1e-3


def test_unknown_logit_post_processing_is_refused():
    tok = tiny_tokenizer()
    model = tiny_model(tok, dtype=torch.float64)
    check_logits(model)  # a plain Llama passes
    forward = model.forward

    def doubled(*args, **kw):  # an architecture that does something to its logits we do not know of
        out = forward(*args, **kw)
        out.logits = 2 * out.logits
        return out

    model.forward = doubled
    with pytest.raises(SqsdError, match="llama model post-processes its logits in a way the scorer does not"):
        check_logits(model)


def test_dora_anchor_is_a_clear_error():
    tok = tiny_tokenizer()
    anchor = lora_anchor(tiny_model(tok, dtype=torch.float64), use_dora=True).train()
    trainable = [p.requires_grad for p in anchor.parameters()]
    with pytest.raises(SqsdError, match="anchor adapter 'default' is a DoRA adapter .*train the anchor without"):
        project(anchor, samples(tok), [random_direction(anchor, 10)], pad_token_id=tok.pad_token_id,
                adapter="default", progress=False)
    assert anchor.training and [p.requires_grad for p in anchor.parameters()] == trainable  # left as it was


def test_an_adapter_the_model_does_not_hold_is_a_clear_error(setup):
    tok, anchor, data = setup
    with pytest.raises(SqsdError, match="adapter 'safety', which the model does not hold"):
        project(anchor, data, [random_direction(anchor, 10)], pad_token_id=tok.pad_token_id, adapter="safety")
