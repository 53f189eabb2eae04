"""The `sqsd` command: one thin subcommand per stage, each building its config and calling one library function.

Options are generated from the config dataclass fields (`config.py`), so a flag's name, type, default and help
exist in exactly one place. A command whose config declares a positional `config` field (`sqsd experiment`) also
reads its options from that YAML file: every key is an option name (`learning_rate` or `learning-rate`), an
option given on the command line wins over the file, and an unknown key is an error naming it and the file.
Library modules are imported only when their command runs, which keeps `sqsd --help` fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from sqsd import config, threads
from sqsd.errors import SqsdError

# (command,) or (group, command) -> (config class, "module:function", one-line description)
COMMANDS: dict[tuple[str, ...], tuple[type, str, str]] = {
    ("assets", "fetch"): (config.AssetsFetchConfig, "sqsd.assets:fetch_cli", "download the pinned offline assets"),
    ("assets", "list"): (config.AssetsListConfig, "sqsd.assets:list_cli", "show cached assets and named datasets"),
    ("data", "inspect"): (config.DataInspectConfig, "sqsd.inspect:inspect_data", "format, counts, bad records, "
                                                                                  "token lengths of a dataset"),
    ("model", "info"): (config.ModelInfoConfig, "sqsd.model:info_cli", "parameters, layers, template, a reply"),
    ("train",): (config.TrainConfig, "sqsd.train:train", "supervised fine-tuning (LoRA or full) on the HF Trainer"),
    ("generate",): (config.GenerateConfig, "sqsd.generate:generate", "batched generation over prompts, resumable"),
    ("align",): (config.AlignConfig, "sqsd.align:align", "make an unaligned chat model refuse harmful requests"),
    ("demo",): (config.DemoConfig, "sqsd.pipeline:demo", "the whole offline pipeline: align, directions, anchor, "
                                                          "score dolly-sqsd, riskiest/safest samples and windows"),
    ("directions", "data"): (config.DirectionsDataConfig, "sqsd.direction_tools:directions_data",
                             "offline recipe data for a danger or safety direction"),
    ("directions", "build"): (config.DirectionsBuildConfig, "sqsd.direction_tools:build",
                              "train a LoRA adapter and write it as a direction file"),
    ("directions", "import"): (config.DirectionsImportConfig, "sqsd.direction_tools:import_direction",
                               "a direction from a PEFT adapter or a dense difference of two models"),
    ("directions", "info"): (config.DirectionsInfoConfig, "sqsd.direction_tools:info",
                             "norms per layer/module and cosines between directions"),
    ("evaluate",): (config.EvaluateConfig, "sqsd.evaluate:evaluate_cli",
                    "ASR with CIs on harmful prompts, over-refusal on benign ones"),
    ("score",): (config.ScoreConfig, "sqsd.score:score",
                 "per-sample SQSD risk scores: danger and safety projections, resumable, distributed"),
    ("filter",): (config.FilterConfig, "sqsd.filter:filter_scores", "subsets of a scored dataset in its own "
                  "format: drop the riskiest, keep the safest, or windows S1..SK"),
    ("experiment",): (config.ExperimentConfig, "sqsd.experiment:experiment_cli",
                      "does a ranking predict safety loss? fine-tune on subsets of each method's ranking, evaluate, "
                      "compare (YAML config)"),
    ("steer",): (config.SteerConfig, "sqsd.steer:steer_cli", "ASR of base + alpha * direction for a grid of alpha"),
    ("report",): (config.ReportConfig, "sqsd.report:report_cli", "one self-contained HTML page (or Markdown) of "
                  "a run folder: scores, experiment, drift, steering, evaluation"),
}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _declaring_class(cls: type, name: str) -> type:
    """The class that declares field `name` of `cls` with its type and help (`options.arg`); a command that
    re-sets only a group's default (a plain `name: type = value`) keeps that group's help."""
    return next(base for base in cls.__mro__
                if name in inspect.get_annotations(base) and base.__dataclass_fields__[name].metadata)


def _add_field(parser: Any, f: dataclasses.Field, hint: Any, metadata: Any, from_file: bool = False) -> None:
    """Add one dataclass field as an option (or positional), derived from its type hint and default. With
    `from_file` (a command with a YAML `config`) an option not given is left out of the parsed arguments, so
    that the file's value or the field's default applies (`_with_file`)."""
    kwargs: dict[str, Any] = {"help": metadata.get("help", "")}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None -> X
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        kwargs["choices"] = list(args)
    elif origin in (tuple, list):
        kwargs["nargs"] = "*"
        kwargs["type"] = args[0] if args and args[0] is not Ellipsis else str
    elif hint is bool:
        kwargs["type"], kwargs["nargs"], kwargs["const"] = _parse_bool, "?", True
    else:
        kwargs["type"] = hint
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    if not required:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs["default"] = default
        if kwargs["help"] and default not in (None, (), []):
            kwargs["help"] += f" (default: {default})"
    if from_file and f.name != "config":
        kwargs["default"], required = argparse.SUPPRESS, False
    kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse %-formats help ("95% CI" crashed --help)
    if metadata.get("positional"):
        if not required:
            kwargs["nargs"] = "?"
        parser.add_argument(f.name, **kwargs)
    else:
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, required=required, **kwargs)


def _add_command(parent: Any, name: str, cls: type, description: str) -> None:
    """One subcommand; the command's own options come first, then those of its groups in inheritance order."""
    sub = parent.add_parser(name, help=description, description=cls.__doc__)
    hints = typing.get_type_hints(cls)
    declared = {f.name: _declaring_class(cls, f.name) for f in dataclasses.fields(cls)}
    from_file = "config" in declared
    for f in sorted(dataclasses.fields(cls), key=lambda f: cls.__mro__.index(declared[f.name])):
        _add_field(sub, f, hints[f.name], declared[f.name].__dataclass_fields__[f.name].metadata, from_file)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """A YAML value as the field type `hint` wants it (lists become tuples), or an error naming `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value in args:
            return value
        raise SqsdError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        return tuple(_coerce(v, args[0], where) for v in (value if isinstance(value, list) else [value]))
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, hint) and not (isinstance(value, bool) and hint is not bool):
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise SqsdError(f"{where}: expected {'true/false' if hint is bool else hint.__name__}, got {value!r}")


def _with_file(cls: type, args: dict[str, Any]) -> dict[str, Any]:
    """The options of a command with a YAML `config`: the file's keys, overridden by the options given."""
    values: dict[str, Any] = {}
    if args["config"] is not None:
        path = Path(args["config"])
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise SqsdError(f"{path}: cannot read it ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise SqsdError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict | None):
            raise SqsdError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        for key, value in (data or {}).items():
            name = str(key).replace("-", "_")
            if name not in hints or name == "config":
                raise SqsdError(f"{path}: unknown key {key!r} (`--help` lists the options)")
            values[name] = _coerce(value, hints[name], f"{path}: key {key!r}")
    values.update(args)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SqsdError(f"--{missing[0].replace('_', '-')} is needed: give it on the command line or as "
                        f"`{missing[0]}:` in the YAML file")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqsd", description="Sample-level quantification of safety "
                                     "degradation: find the fine-tuning samples that erode a model's safety.")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}
    for key, (cls, _, description) in COMMANDS.items():
        if len(key) == 1:
            _add_command(top, key[0], cls, description)
            continue
        if key[0] not in groups:
            groups[key[0]] = top.add_parser(key[0], help=f"{key[0]} commands").add_subparsers(
                dest="subcommand", required=True, metavar="SUBCOMMAND")
        _add_command(groups[key[0]], key[1], cls, description)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    key = (args.pop("command"),) + ((args.pop("subcommand"),) if "subcommand" in args else ())
    cls, target, _ = COMMANDS[key]
    for name, value in args.items():
        if isinstance(value, list):
            args[name] = tuple(value)
    module, function = target.split(":")
    threads.configure()  # before the command's module imports torch
    try:
        if "config" in args:
            args = _with_file(cls, args)
        result = getattr(importlib.import_module(module), function)(cls(**args))
    except SqsdError as e:
        print(f"sqsd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sqsd: interrupted; rerun the same command to resume where possible", file=sys.stderr)
        return 130
    _close_process_group()
    return result if isinstance(result, int) else 0


def _close_process_group() -> None:
    """Under a launcher, wait for every rank and shut the process group down before exiting: a rank that exits
    while another still tears down its last collective can kill it (gloo: "terminate called without an active
    exception"). Only after success: a rank that failed exits at once and the launcher stops the others."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
