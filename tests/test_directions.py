import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from sqsd import directions
from sqsd.cli import main
from sqsd.errors import SqsdError
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def adapter_dir(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model(tok), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", peft_model


def test_from_adapter_gives_b_times_a_without_scaling(adapter_dir):
    folder, peft_model = adapter_dir
    d = directions.from_adapter(folder, kind="danger")
    layer = peft_model.get_base_model().model.layers[1].mlp.down_proj
    term = d.modules["model.layers.1.mlp.down_proj"]
    torch.testing.assert_close(term.dense(), layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    assert len(d.modules) == 2 * 7 and d.kind == "danger"


def test_lowrank_algebra_matches_dense():
    g = torch.Generator().manual_seed(0)
    t = directions.LowRank(torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g,
                                                                                    dtype=torch.float64))
    A, B, x = (torch.randn(2, 7, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64),
               torch.randn(4, 7, generator=g, dtype=torch.float64))
    dense = directions.Dense(t.dense())
    for a, b in ((t, dense),):
        torch.testing.assert_close(a.sq_norm(), b.sq_norm())
        torch.testing.assert_close(a.times_t(A), b.times_t(A))
        torch.testing.assert_close(a.t_times(B), b.t_times(B))
        torch.testing.assert_close(a.apply(x), b.apply(x))


def test_round_trip_keeps_tensors_and_metadata(tmp_path, adapter_dir):
    d = directions.from_adapter(adapter_dir[0], kind="safety")
    d = directions.Direction(d.modules, d.kind, {**d.meta, "base_fingerprint": "abc", "step": 40})
    path = directions.save(d, tmp_path / "dirs" / "safety.safetensors")
    back = directions.load(path)
    assert back.kind == "safety" and back.meta["step"] == 40 and back.meta["base_fingerprint"] == "abc"
    assert set(back.modules) == set(d.modules)
    for name, term in d.modules.items():
        torch.testing.assert_close(back.modules[name].dense(), term.dense())
    assert (tmp_path / "dirs" / "safety.json").exists()
    dense = directions.Direction({"model.layers.0.mlp.up_proj": directions.Dense(torch.ones(64, 32))}, "danger")
    assert isinstance(directions.load(directions.save(dense, tmp_path / "dense.safetensors")).modules["model.layers.0.mlp.up_proj"],
                      directions.Dense)


def test_check_rejects_mismatches(adapter_dir):
    d = directions.from_adapter(adapter_dir[0])
    model = tiny_model(tiny_tokenizer())
    directions.check(d, model)  # fits
    other = tiny_model(tiny_tokenizer(), hidden=48)
    with pytest.raises(SqsdError, match="shape"):
        directions.check(d, other)
    renamed = directions.Direction({"model.layers.9.mlp.up_proj": next(iter(d.modules.values()))})
    with pytest.raises(SqsdError, match="does not have"):
        directions.check(renamed, model)
    tagged = directions.Direction(d.modules, "danger", {"base_fingerprint": "model-a"})
    with pytest.raises(SqsdError, match="built on base model model-a"):
        directions.check(tagged, model, base_fingerprint="model-b")


Q = "model.layers.0.self_attn.q_proj"
GOOD = {f"{Q}.A": torch.ones(2, 4), f"{Q}.B": torch.ones(3, 2)}
META = {"sqsd": json.dumps({"kind": "danger"})}


def _write(path, tensors=GOOD, metadata=META):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _truncated(path):
    data = _write(path).read_bytes()
    path.write_bytes(data[: len(data) - 7])


def _random(path):
    path.write_bytes(os.urandom(256))


def _empty(path):
    path.write_bytes(b"")


# (how the file is made, fragment of the one-line error); every error names the file
BAD_FILES = {
    "truncated": (_truncated, "is not a readable safetensors file"),
    "random": (_random, "is not a readable safetensors file"),
    "empty": (_empty, "is not a readable safetensors file"),
    "metadata not JSON": (lambda p: _write(p, metadata={"sqsd": "{kind: danger"}),
                          "the header metadata 'sqsd' is not JSON"),
    "metadata not an object": (lambda p: _write(p, metadata={"sqsd": "[1, 2]"}), "is not a JSON object"),
    "A without B": (lambda p: _write(p, {f"{Q}.A": torch.ones(2, 4)}),
                    f"module {Q}: has tensors A; a module holds either .A and .B"),
    "A, B and T": (lambda p: _write(p, {**GOOD, f"{Q}.T": torch.ones(3, 4)}), f"module {Q}: has tensors A/B/T"),
    "mismatched rank": (lambda p: _write(p, {f"{Q}.A": torch.ones(2, 4), f"{Q}.B": torch.ones(3, 5)}),
                        rf"module {Q}: factors of mismatched rank, .A is \(2, 4\) \(rank × in\) but .B is "
                        r"\(3, 5\)"),
    "unexpected name": (lambda p: _write(p, {**GOOD, "lora_A.weight": torch.ones(2, 2)}),
                        "unexpected tensor 'lora_A.weight'"),
    "no tensors": (lambda p: _write(p, {}), "holds no direction tensors"),
    "1-D tensor": (lambda p: _write(p, {f"{Q}.T": torch.ones(4)}), rf"module {Q}: .T is a 1-D"),
    "integer tensor": (lambda p: _write(p, {f"{Q}.T": torch.ones(3, 4, dtype=torch.int64)}),
                       r"\.T is a 2-D torch.int64 tensor"),
    "NaN": (lambda p: _write(p, {**GOOD, f"{Q}.B": torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.0, 1.0]])}),
            rf"module {Q}: .B holds NaN or Inf values"),
    "Inf": (lambda p: _write(p, {"m.T": torch.full((2, 2), float("inf"))}), "module m: .T holds NaN or Inf"),
    "all zeros": (lambda p: _write(p, {f"{Q}.A": torch.zeros(2, 4), f"{Q}.B": torch.ones(3, 2)}),
                  f"module {Q}: is all zeros"),
    "one module zero": (lambda p: _write(p, {**GOOD, "m.T": torch.zeros(3, 4)}), "module m: is all zeros"),
    "norm overflows float32": (lambda p: _write(p, {"m.T": torch.full((2, 2), 3e19)}),
                               r"module m: values so large that its squared norm \(3.6e\+39\) overflows float32"),
    "total norm overflows": (lambda p: _write(p, {f"m{i}.T": torch.full((1, 1), 1.5e19) for i in range(2)}),
                             "values so large that the squared norm overflows float32"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_direction_file_is_one_clear_error_naming_file_and_module(tmp_path, case, capsys):
    make, fragment = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(SqsdError, match=f"{path}.*{fragment}" if "module" not in fragment else fragment) as info:
        directions.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    # `sqsd directions info`: exit 2 with the same line, never a nan norm
    assert main(["directions", "info", str(path)]) == 2
    captured = capsys.readouterr()
    assert str(path) in captured.err and "nan" not in captured.out and "Traceback" not in captured.err


def test_a_good_file_loads(tmp_path):
    d = directions.load(_write(tmp_path / "good.safetensors"))
    assert d.kind == "danger" and float(d.sq_norm()) == pytest.approx(4 * 3 * 4.0)
