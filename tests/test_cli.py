import dataclasses
import typing
from typing import Literal

import pytest

from sqsd import config
from sqsd.cli import COMMANDS, build_parser, main
from sqsd.errors import SqsdError
from tiny import tiny_model_folder


@pytest.mark.parametrize("key", list(COMMANDS))
def test_every_option_default_is_the_dataclass_default(key):
    """The CLI adds no defaults of its own: parsing only the required options gives the dataclass defaults."""
    cls = COMMANDS[key][0]
    hints = typing.get_type_hints(cls)
    # a required option gets "x", or its first choice when it has choices
    required = {f.name: (typing.get_args(hints[f.name]) or ("x",))[0] if typing.get_origin(hints[f.name]) is Literal
                else "x" for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    argv = list(key)
    for f in dataclasses.fields(cls):
        if f.name in required:
            value = required[f.name]
            argv += [value] if f.metadata.get("positional") else ["--" + f.name.replace("_", "-"), value]
    args = vars(build_parser().parse_args(argv))
    from_file = "config" in hints  # an option not given is left out: the YAML file's value or the default applies
    for f in dataclasses.fields(cls):
        if f.name not in required:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert f.name not in args if from_file and f.name != "config" else args[f.name] == default, f.name


def test_lists_and_bools_parse_into_the_config():
    args = vars(build_parser().parse_args(
        ["train", "d.jsonl", "--output-dir", "o", "--save-at", "5", "10", "--merge", "--layers", "0", "1"]))
    assert args["save_at"] == [5, 10] and args["merge"] is True and args["layers"] == [0, 1]


def test_invalid_value_is_a_clean_error(capsys):
    assert main(["train", "d.jsonl", "--output-dir", "o", "--learning-rate", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--learning-rate must be positive" in err and "Traceback" not in err


def test_config_validation_runs_on_construction():
    with pytest.raises(SqsdError, match="--n > 1 needs --do-sample"):
        config.GenerateConfig(data="p.txt", output="o.jsonl", n=3)


# Flags a library would reject with a traceback are refused by us first, naming the flag (exit 2).

def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_logging_steps_zero_is_refused(capsys):
    err = _error(capsys, ["train", "d.jsonl", "--output-dir", "o", "--logging-steps", "0"])
    assert "--logging-steps must be positive" in err


@pytest.mark.parametrize("device", ["banana", "cuda:x", ""])
def test_a_device_that_is_not_a_device_name_is_refused(capsys, device):
    err = _error(capsys, ["evaluate", "--output-dir", "o", "--device", device])
    assert f"--device {device!r} is not a device name" in err


def test_an_unavailable_device_is_refused(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    err = _error(capsys, ["model", "info", "smollm2", "--device", "cuda"])
    assert "--device cuda: not available on this machine (0 cuda device(s) visible)" in err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = _error(capsys, ["train", "d.jsonl", "--output-dir", "o", "--device", "cuda:1"])
    assert "--device cuda:1: not available" in err
    assert config.ModelInfoConfig(model="m", device="cuda:0").device == "cuda:0"


@pytest.fixture
def model_and_data(tmp_path):
    """`--model FOLDER DATA --max-steps 1` for a tiny model folder and a one-record dataset."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Question?", "output": "Answer."}\n')
    return ["--model", str(tiny_model_folder(tmp_path / "model")), str(data), "--max-steps", "1"]


@pytest.mark.parametrize("command", [["train"], ["directions", "build", "--kind", "danger"]])
def test_target_modules_the_model_lacks_are_refused(capsys, tmp_path, model_and_data, command):
    err = _error(capsys, [*command, *model_and_data, "--output-dir", str(tmp_path / "o"),
                          "--target-modules", "q_proj", "qkv_proj"])
    assert "--target-modules qkv_proj: no such module" in err and "q_proj, up_proj" in err


def test_target_modules_without_a_weight_matrix_are_refused(capsys, tmp_path, model_and_data):
    err = _error(capsys, ["train", *model_and_data, "--output-dir", str(tmp_path / "o"),
                          "--target-modules", "mlp"])
    assert "--target-modules mlp: no such module with a weight matrix" in err


def test_layers_the_model_lacks_are_refused(capsys, tmp_path, model_and_data):
    err = _error(capsys, ["train", *model_and_data, "--output-dir", str(tmp_path / "o"), "--layers", "1", "7"])
    assert "--layers 7: LlamaForCausalLM has 2 layers (0..1)" in err
    err = _error(capsys, ["train", *model_and_data, "--output-dir", str(tmp_path / "o2"), "--layers", "-1"])
    assert "--layers indices must be >= 0" in err


def test_a_refused_target_leaves_no_run_folder_behind(capsys, tmp_path, model_and_data):
    """The check runs on the model's skeleton before the run folder is made, so the corrected rerun is fresh."""
    out = tmp_path / "o"
    _error(capsys, ["train", *model_and_data, "--output-dir", str(out), "--layers", "9"])
    assert not out.exists()
    assert main(["train", *model_and_data, "--output-dir", str(out), "--layers", "1"]) == 0


def test_align_refuses_a_target_before_making_anything(capsys, tmp_path, model_and_data):
    out = tmp_path / "a"
    err = _error(capsys, ["align", "--model", model_and_data[1], "--method", "lora", "--target-modules", "wq",
                          "--output-dir", str(out)])
    assert "--target-modules wq: no such module" in err and not out.exists()
