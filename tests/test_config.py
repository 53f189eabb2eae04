import dataclasses
import inspect
import typing

import pytest

from sqsd import config, figures, options, projection
from sqsd.cli import COMMANDS, build_parser
from sqsd.errors import SqsdError

# Names that two classes declare as *different* flags (another type or role), each for a reason; every other flag
# is declared once, and a command that needs another default re-sets only the default.
DIFFERENT_FLAGS_SAME_NAME = {
    "model": "model info takes it as positional; data inspect (a tokenizer) and directions import (a fingerprint) "
             "take an optional one",
    "kind": "directions import also accepts the generic kind `direction`",
    "output": "generate and directions import write a file; report an optional page",
    "format": "a dataset's record format; report's page format (html or md)",
    "harmful": "align trains on several harmful sources; evaluation uses one held-out set",
    "benign": "align trains on benign pairs (always); evaluation may skip them ('')",
    "data": "filter re-reads the scored dataset, by default the one its scores record",
    "scores": "filter's scores file is positional; experiment's is optional (ranked instead of scoring the pool)",
    "method": "train/align choose LoRA or full fine-tuning; score chooses its scorers (SQSD and the baselines)",
}


def _classes():
    return [cls for module in (options, config) for _, cls in inspect.getmembers(module, inspect.isclass)
            if dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__]


def test_every_flag_is_declared_once_and_overrides_only_change_the_default():
    declared: dict[str, list[type]] = {}
    for cls in _classes():
        for name, annotation in inspect.get_annotations(cls).items():
            own = cls.__dataclass_fields__[name]
            if own.metadata:  # declared with `arg`: a type and a help text
                declared.setdefault(name, []).append(cls)
                continue
            # a plain `name: type = value` may only re-set the default of a flag the class inherits
            parent = next(b for b in cls.__mro__[1:] if name in inspect.get_annotations(b)
                          and b.__dataclass_fields__[name].metadata)
            assert inspect.get_annotations(parent)[name] == annotation, (cls.__name__, name)
            assert own.default != parent.__dataclass_fields__[name].default, (cls.__name__, name, "same default")
    twice = {name: [c.__name__ for c in classes] for name, classes in declared.items() if len(classes) > 1}
    assert set(twice) == set(DIFFERENT_FLAGS_SAME_NAME), twice


def test_validation_lives_in_validate_and_runs_for_every_group():
    """Only the base defines __post_init__, so no class can forget to chain to its groups' checks."""
    assert [c.__name__ for c in _classes() if "__post_init__" in vars(c)] == ["Config"]


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (config.ScoreConfig, dict(data="d", output_dir="o", danger="d.safetensors", max_length=1), "--max-length"),
    (config.DataInspectConfig, dict(data="d", max_length=1), "--max-length"),
    (config.AlignConfig, dict(output_dir="o", max_length=1), "--max-length"),
    (config.DemoConfig, dict(max_length=1), "--max-length"),
    (config.DirectionsBuildConfig, dict(data="d", output_dir="o", kind="danger", logging_steps=0),
     "--logging-steps"),
    (config.AlignConfig, dict(output_dir="o", lora_r=0), "--lora-r"),
    (config.DirectionsBuildConfig, dict(data="d", output_dir="o", kind="danger", limit=0), "--limit"),
    (config.SteerConfig, dict(directions=("d",), output_dir="o", limit=0), "--limit"),
    (config.SteerConfig, dict(directions=("d",), output_dir="o", n=2), "--do-sample"),
    (config.SteerConfig, dict(directions=("d",), output_dir="o", judge="harmbench"), "--judge-model"),
    (config.DirectionsDataConfig, dict(kind="danger", output_dir="o", max_new_tokens=0), "--max-new-tokens"),
    (config.ModelInfoConfig, dict(model="m", device="banana"), "--device"),
    (config.FilterConfig, dict(scores="s", output_dir="o", windows=2, window_size=0), "--window-size"),
    (config.TrainConfig, dict(data="d", output_dir="o", target_modules=("all-linear", "q_proj")),
     "--target-modules"),
])
def test_a_group_check_fires_through_every_command_made_of_it(cls, kwargs, message):
    with pytest.raises(SqsdError, match=message):
        cls(**kwargs)


def _defaults(cls):
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def test_evaluate_steer_and_track_eval_defaults_agree():
    evaluate, steer = _defaults(config.EvaluateConfig), _defaults(config.SteerConfig)
    shared = set(evaluate) & set(steer)
    assert {"max_new_tokens", "harmful", "benign", "limit", "judge", "batch_size", "n_bootstrap",
            "system_prompt", "seed", "do_sample"} <= shared
    assert {k: evaluate[k] for k in shared} == {k: steer[k] for k in shared}
    # the README's figures: greedy, keyword judge, 48 new tokens on harmbench@eval
    assert (evaluate["max_new_tokens"], evaluate["judge"], evaluate["do_sample"]) == (48, "keyword", False)
    train = _defaults(config.TrainConfig)
    assert train["track_eval_max_new_tokens"] == evaluate["max_new_tokens"]
    assert train["track_eval_harmful"] == evaluate["harmful"]


def test_one_list_of_metric_names_and_of_formats():
    assert options.METRICS == typing.get_args(options.Metric) == ("cosine-sum", "projection", "cosine")
    assert projection.METRICS is options.METRICS  # the maths uses the one list
    assert typing.get_args(options.Format) == options.DATA_FORMATS
    assert typing.get_type_hints(config.ScoreConfig)["metric"] == options.Metric
    assert tuple(figures.METRIC_LABELS) == options.METRICS  # the drift figure labels every metric


def test_directions_build_shows_only_the_flags_that_apply(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["directions", "build", "--help"])
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  --")}
    assert not listed & {"--track", "--track-eval-steps", "--track-eval-harmful", "--merge", "--method"}
    assert {"--kind", "--step", "--lora-r", "--target-modules", "--save-at", "--learning-rate"} <= listed


def test_directions_build_trains_with_the_train_config_of_its_fields():
    build = config.DirectionsBuildConfig(data="d", output_dir="o", kind="safety", lora_r=4, save_at=(2,), step=2)
    train = build.train_config()
    assert (train.method, train.lora_r, train.save_at, train.track, train.merge) == ("lora", 4, (2,), (), False)


def test_overridden_default_keeps_the_group_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "prompt tokens are dropped from the left first (default: 512)" in text


def test_every_command_config_is_a_config():
    assert all(issubclass(cls, options.Config) for cls, _, _ in COMMANDS.values())
