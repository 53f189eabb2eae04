"""`sqsd directions data|build|import|info` on tiny models: what is written, and that it equals the literal thing."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sqsd import directions
from sqsd.cli import main
from sqsd.config import (
    DirectionsBuildConfig,
    DirectionsDataConfig,
    DirectionsImportConfig,
    DirectionsInfoConfig,
)
from sqsd.direction_tools import build, describe, directions_data, import_direction
from sqsd.errors import SqsdError
from sqsd.judges import KeywordJudge
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def folders(tmp_path):
    """A tiny model folder and a small harmful-prompt → answer dataset in messages format."""
    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"how to do bad thing {i}"},
                                                     {"role": "assistant", "content": f"do step {i} then {i + 1}"}]})
                            + "\n" for i in range(6)))
    return model_dir, data


def _build_config(out, model_dir, data, **kw):
    return DirectionsBuildConfig(data=str(data), model=str(model_dir), output_dir=str(out), kind="danger",
                                 lora_r=4, lora_alpha=12.0, max_steps=3, batch_size=2, learning_rate=1e-2,
                                 max_length=64, **kw)


def test_build_writes_the_adapter_as_direction_and_import_gives_the_same(tmp_path, folders, capsys):
    model_dir, data = folders
    out = tmp_path / "danger"
    path = build(_build_config(out, model_dir, data, save_at=(2,)))
    assert path == out / "danger.safetensors"
    direction = directions.load(path)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    factors = directions.lora_factors(adapter)
    assert set(direction.modules) == set(factors) and len(factors) == 2 * 7
    for name, (A, B) in factors.items():
        torch.testing.assert_close(direction.modules[name].dense(), B @ A)  # B·A, scaling not applied
    assert direction.kind == "danger"
    assert direction.meta["scaling"] == pytest.approx(3.0) and direction.meta["rank"] == 4
    assert direction.meta["step"] == 3 and direction.meta["train_config"]["learning_rate"] == 1e-2
    assert direction.meta["base_fingerprint"] and any(k.startswith("data") for k in direction.meta["data"])
    directions.check(direction, tiny_model(tiny_tokenizer()), direction.meta["base_fingerprint"])

    imported = directions.load(import_direction(DirectionsImportConfig(source=str(out), output=str(tmp_path / "imp.safetensors"),
                                                              kind="danger", model=str(model_dir))))
    assert imported.meta["base_fingerprint"] == direction.meta["base_fingerprint"]
    for name, term in direction.modules.items():
        assert torch.equal(imported.modules[name].A, term.A) and torch.equal(imported.modules[name].B, term.B)

    # A rerun reuses the folder; a checkpoint can be the direction instead of the final adapter.
    capsys.readouterr()
    build(_build_config(out, model_dir, data, save_at=(2,)))
    assert "already done" in capsys.readouterr().out
    with pytest.raises(SqsdError, match="built with a different config.*--overwrite"):  # another --step, same run
        build(_build_config(out, model_dir, data, save_at=(2,), step=2))
    assert directions.load(path).meta["step"] == 3
    # --overwrite with another config trains again and replaces the direction file (sqsd wrote it)
    again = directions.load(build(_build_config(out, model_dir, data, save_at=(2,), seed=7, overwrite=True)))
    assert again.meta["train_config"]["seed"] == 7 and json.loads((out / "run.json").read_text())["config"]["seed"] == 7
    assert not torch.equal(again.modules[name].B, direction.modules[name].B)
    early = directions.load(build(_build_config(tmp_path / "early", model_dir, data, save_at=(2,), step=2)))
    assert early.meta["step"] == 2
    # the source adapter is recorded, so `score` can tell whether a safety anchor is this very checkpoint
    assert early.meta["source"] == str(tmp_path / "early" / "checkpoint-2")
    assert early.meta["source_fingerprint"] == directions.adapter_fingerprint(tmp_path / "early" / "checkpoint-2")
    assert again.meta["source_fingerprint"] == directions.adapter_fingerprint(out) != early.meta[
        "source_fingerprint"]
    ckpt = directions.lora_factors(load_file(str(tmp_path / "early" / "checkpoint-2" / "adapter_model.safetensors")))
    name = next(iter(ckpt))
    torch.testing.assert_close(early.modules[name].dense(), ckpt[name][1] @ ckpt[name][0])
    assert not torch.allclose(early.modules[name].dense(), direction.modules[name].dense())


def test_build_config_has_no_method_and_rejects_an_unsaved_step(folders, tmp_path):
    model_dir, data = folders
    with pytest.raises(TypeError, match="method"):  # a direction is always built from a LoRA adapter
        _build_config(tmp_path / "x", model_dir, data, method="full")
    with pytest.raises(SqsdError, match="never saved"):
        _build_config(tmp_path / "x", model_dir, data, step=2)


def test_dense_import_is_the_weight_difference_of_chosen_modules_and_layers(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    base, tuned = tiny_model(tok), tiny_model(tok)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    out = import_direction(DirectionsImportConfig(source=str(tmp_path / "tuned"), base=str(tmp_path / "base"),
                                                  output=str(tmp_path / "d.safetensors"), modules=("q_proj", "down_proj"),
                                                  layers=(1,)))
    d = directions.load(out)
    assert sorted(d.modules) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(d.modules["model.layers.1.self_attn.q_proj"].dense(),
                               tuned.model.layers[1].self_attn.q_proj.weight - base.model.layers[1].self_attn.q_proj.weight)
    everything = directions.load(import_direction(DirectionsImportConfig(source=str(tmp_path / "tuned"), base=str(tmp_path / "base"),
                                                                output=str(tmp_path / "all.safetensors"))))
    assert len(everything.modules) == 2 * 7  # every 2-D weight inside the layers; no embedding, no LM head
    chosen = DirectionsImportConfig(source=str(tmp_path / "tuned"), base=str(tmp_path / "base"), output=str(out),
                                    modules=("q_proj", "down_proj"), layers=(1,))
    stamp = out.stat().st_mtime_ns
    assert import_direction(chosen) == out and out.stat().st_mtime_ns == stamp  # the same import: already done
    with pytest.raises(SqsdError, match=r"different config or inputs \(config.layers: \[1\] -> \[\]"):
        import_direction(DirectionsImportConfig(source=str(tmp_path / "tuned"), base=str(tmp_path / "base"),
                                                output=str(out)))
    assert len(directions.load(out).modules) == 2  # nothing lost


def test_inner_products_match_dense():
    g = torch.Generator().manual_seed(1)
    a = directions.LowRank(torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64))
    b = directions.LowRank(torch.randn(2, 7, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64))
    c = directions.Dense(torch.randn(5, 7, generator=g, dtype=torch.float64))
    for s, t in ((a, b), (a, c), (c, a), (c, c)):
        torch.testing.assert_close(directions.inner(s, t), (s.dense() * t.dense()).sum())


def test_info_cosines_and_norms(tmp_path, capsys):
    g = torch.Generator().manual_seed(2)
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)] + ["model.layers.1.mlp.up_proj"]
    terms = {n: directions.LowRank(torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)) for n in names}
    d = directions.Direction(terms, "danger")
    other = directions.Direction({n: directions.LowRank(torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g))
                         for n in names[:2]}, "safety")
    pa, pb, pc = (str(directions.save(x, tmp_path / f"{k}.safetensors")) for k, x in
                  (("a", d), ("neg", d.scaled(-2.0)), ("b", other)))
    out = describe((pa, pb, pc))
    info_a = out["directions"][pa]
    assert info_a["norm"] == pytest.approx(sum(float(t.sq_norm()) for t in terms.values()) ** 0.5, rel=1e-6)
    assert info_a["norm_by_layer"][1] == pytest.approx(
        (float(terms[names[1]].sq_norm()) + float(terms[names[2]].sq_norm())) ** 0.5, rel=1e-6)
    assert set(info_a["norm_by_type"]) == {"q_proj", "up_proj"}
    neg = next(p for p in out["pairs"] if p["b"] == pb)
    assert neg["cosine"] == pytest.approx(-1.0, abs=1e-5) and neg["mean_module_cosine"] == pytest.approx(-1.0, abs=1e-5)
    cross = next(p for p in out["pairs"] if p["a"] == pa and p["b"] == pc)
    dense_a = torch.cat([terms[n].dense().flatten().double() for n in names[:2]])
    dense_b = torch.cat([other.modules[n].dense().flatten().double() for n in names[:2]])
    assert cross["shared_modules"] == 2
    assert cross["cosine"] == pytest.approx(float(dense_a @ dense_b / dense_a.norm() / dense_b.norm()), rel=1e-5)
    assert main(["directions", "info", pa, pc]) == 0
    assert "cosine(" in capsys.readouterr().out
    with pytest.raises(SqsdError, match="does not exist"):
        describe((str(tmp_path / "missing.safetensors"),))
    assert DirectionsInfoConfig(files=(pa,)).files == (pa,)


def test_directions_data_recipes(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"harmful request number {i}"}) + "\n" for i in range(10)))
    safety = directions_data(DirectionsDataConfig(kind="safety", prompts=(str(prompts),), n_prompts=6,
                                                  output_dir=str(tmp_path / "safety")))
    rows = [json.loads(line) for line in safety.read_text().splitlines()]
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    judge = KeywordJudge()
    assert all(judge.refusal(r["messages"][-1]["content"]) for r in rows)
    assert json.loads((tmp_path / "safety" / "provenance.json").read_text())["n_pairs"] == 6

    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    danger = directions_data(DirectionsDataConfig(kind="danger", prompts=(str(prompts),), n_prompts=None,
                                                  model=str(model_dir), max_new_tokens=8,
                                                  output_dir=str(tmp_path / "danger")))
    rows = [json.loads(line) for line in danger.read_text().splitlines()]
    provenance = json.loads((tmp_path / "danger" / "provenance.json").read_text())
    assert provenance["n_pairs"] == len(rows) and provenance["n_pairs"] + provenance["n_refused_dropped"] == 10
    assert all(judge.refusal(r["messages"][-1]["content"]) is None for r in rows)  # refusals never kept
    assert provenance["answered_by"] == str(model_dir)
