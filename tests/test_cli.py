import dataclasses
import typing
from typing import Literal

import pytest

from sqsd import config as C
from sqsd.cli import COMMANDS, build_parser, main


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
    for f in dataclasses.fields(cls):
        if f.name not in required:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert args[f.name] == default, f.name


def test_lists_and_bools_parse_into_the_config():
    args = vars(build_parser().parse_args(
        ["train", "d.jsonl", "--output-dir", "o", "--save-at", "5", "10", "--merge", "--layers", "0", "1"]))
    assert args["save_at"] == [5, 10] and args["merge"] is True and args["layers"] == [0, 1]


def test_invalid_value_is_a_clean_error(capsys):
    assert main(["train", "d.jsonl", "--output-dir", "o", "--learning-rate", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--learning-rate must be positive" in err and "Traceback" not in err


def test_config_validation_runs_on_construction():
    with pytest.raises(C.SqsdError, match="--n > 1 needs --do-sample"):
        C.GenerateConfig(data="p.txt", output="o.jsonl", n=3)
