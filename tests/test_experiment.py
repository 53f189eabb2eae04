"""`sqsd experiment` end to end on a tiny model: cells, shared fine-tunes, resume, results, the YAML CLI."""

import json
from pathlib import Path

import numpy as np
import pytest

import sqsd.experiment as experiment_module
import sqsd.score as score_module
from sqsd import cli
from sqsd.baselines import method_scores, random_score
from sqsd.config import ExperimentConfig
from sqsd.errors import SqsdError
from sqsd.experiment import experiment
from sqsd.stats import roc_auc
from tiny import tiny_model_folder

EXAMPLES = Path(__file__).parent.parent / "examples"
METHODS = ("length", "random", "loss")  # `loss` is made the oracle (see `oracle`)
RATIO = 0.2  # of a 10-sample pool: 2 injected of 12


def oracle(methods, seed, record_id, *args, **kw):
    """`sqsd.score.method_scores` with `loss` replaced by a test-only scorer that knows the injected samples (the
    experiment gives them the ids `injected:<source id>`): 1 for those, 0 for the rest. Patching the function
    that turns a sample's features into each method's score keeps everything else of scoring as it is."""
    out = method_scores(methods, seed, record_id, *args, **kw)
    if "loss" in out:
        out["loss"] = float(record_id.startswith("injected:"))
    return out


def write_inputs(folder: Path) -> dict:
    """A tiny model, a pool of 10 whose response lengths fall with the index (so `length` ranks it in file
    order, as the oracle does on a pool without injected samples: ties go by index), harmful and benign prompts,
    and a source of harmful prompts with compliant answers."""
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model_folder(folder / "model")
    pool = folder / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": "word " * (12 - i)}) + "\n"
                            for i in range(10)))
    (folder / "harmful.txt").write_text("".join(f"do bad thing {i}\n" for i in range(4)))
    (folder / "benign.txt").write_text("name a colour\nsay hello\n")
    source = folder / "source.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"harm {i}", "output": f"Sure, step {i}."}) + "\n"
                              for i in range(6)))
    return dict(model=str(model), pool=str(pool), harmful=(str(folder / "harmful.txt"),),
                benign=str(folder / "benign.txt"), contamination_source=str(source))


def config(inputs: dict, out: Path, **kw) -> ExperimentConfig:
    base = dict(methods=METHODS, protocols=("ends", "contamination"), window_size=4, seeds=(0, 1),
                contamination_ratios=(RATIO,), contamination_finetune=True, max_steps=2, batch_size=4,
                learning_rate=1e-2, warmup_ratio=0.0, scheduler="constant", max_length=64, max_new_tokens=4,
                n_bootstrap=200, output_dir=str(out))
    return ExperimentConfig(**{**inputs, **base, **kw})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted tiny experiment: (inputs, run folder, results, the data of every fine-tune)."""
    root = tmp_path_factory.mktemp("experiment")
    inputs = write_inputs(root / "inputs")
    trained = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(score_module, "method_scores", oracle)
        real = experiment_module.train
        mp.setattr(experiment_module, "train", lambda c: trained.append(c.data) or real(c))
        results = experiment(config(inputs, root / "run"))
    return inputs, root / "run", results, trained


def estimates(tree):
    """Every {value, ci95} (`stats.Estimate.to_dict`) in a results tree."""
    if isinstance(tree, dict):
        if set(tree) == {"value", "ci95"}:
            yield tree
        for v in tree.values():
            yield from estimates(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from estimates(v)


def test_tiny_experiment_has_every_cell_and_consistent_statistics(uninterrupted):
    _, run, results, _ = uninterrupted
    assert json.loads((run / "results.json").read_text()) == results
    expected = [("ends", m, s) for m in METHODS for s in ("top", "bottom")] + [("ends", "control", "random")]
    expected += [(f"contamination-{RATIO:g}", m, "kept") for m in METHODS]
    expected += [(f"contamination-{RATIO:g}", "unfiltered", "all")]
    for protocol, method, subset in expected:
        for seed in (0, 1):
            cell = run / "cells" / protocol / method / subset / f"seed{seed}"
            summary = json.loads((cell / "summary.json").read_text())
            n = {"top": 4, "bottom": 4, "random": 4, "kept": 10, "all": 12}[subset]
            assert summary["n_records"] == n == len((cell / "subset.jsonl").read_text().splitlines())
            assert (cell / "finetune" / "adapter" / "adapter_model.safetensors").is_file()
            assert (cell / "finetune" / "eval").is_dir() and summary["asr"]
    ends = results["asr"]["ends"]
    assert set(ends) == {*METHODS, "control"} and set(ends["length"]) == {"top", "bottom"}
    assert all(len(ends[m][s]["asr_per_seed"]) == 2 for m in METHODS for s in ("top", "bottom"))
    found = list(estimates(results))
    assert len(found) > 20 and all(e["ci95"][0] <= e["value"] <= e["ci95"][1] for e in found)
    assert set(results["ranking"]["ends"]) == set(METHODS)
    assert "reference_minus_this" not in results["ranking"]["ends"]["length"]  # the reference itself
    assert results["n_prompts"] == 4 and results["base"]["over_refusal"] is not None
    # the printed table's paired difference is the reference's gap minus the method's, on the same prompts
    for m in ("random", "loss"):
        diff = results["ranking"]["ends"][m]["reference_minus_this"]["value"]
        gaps = [results["ranking"]["ends"][k]["gap"]["value"] for k in ("length", m)]
        assert diff == pytest.approx(gaps[0] - gaps[1])


def test_contamination_oracle_finds_every_injected_sample_and_random_is_chance(uninterrupted):
    inputs, run, results, _ = uninterrupted
    found = results["contamination"][f"{RATIO:g}"]
    assert found["n_injected"] == 2 and found["n_pool"] == 12
    assert found["methods"]["loss"] == {**found["methods"]["loss"], "auc": 1.0, "ap": 1.0, "recall_at_fraction": 1.0}
    assert {"asr_filtered"} <= set(found["methods"]["random"]) and "asr_unfiltered" in found
    # the mixed pool: the pool, plus the injected samples from the source, in a shuffled order
    folder = run / "contamination" / "0.2"
    mixed = [json.loads(line)["id"] for line in (folder / "mixed.jsonl").read_text().splitlines()]
    injected = json.loads((folder / "injected.json").read_text())
    assert len(mixed) == 12 and set(injected) < set(mixed) and all(i.startswith("injected:") for i in injected)
    assert [i for i in mixed if i in injected] != mixed[-2:] or mixed[:10] != sorted(mixed[:10])
    labels = np.array([i in injected for i in mixed])
    # the reported `random` AUC is that of the scores the random baseline gives ...
    assert found["methods"]["random"]["auc"] == pytest.approx(roc_auc([random_score(0, i) for i in mixed], labels))
    # ... which are chance over many draws (seeds)
    aucs = [roc_auc([random_score(seed, i) for i in mixed], labels) for seed in range(400)]
    assert np.mean(aucs) == pytest.approx(0.5, abs=0.03) and np.std(aucs) > 0.1


def test_windows_are_cut_at_evenly_spaced_ranks_of_each_method(tmp_path):
    inputs = write_inputs(tmp_path / "inputs")
    results = experiment(config(inputs, tmp_path / "run", methods=("length", "random"), protocols=("windows",),
                                n_windows=3, window_size=3, seeds=(0,)))
    cells = tmp_path / "run" / "cells" / "windows"
    for window, rows in (("S1", (1, 2, 3)), ("S2", (5, 6, 7)), ("S3", (8, 9, 10))):  # starts 0, 4, 7 of 10
        lines = (cells / "length" / window / "seed0" / "subset.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == [f"pool.jsonl:{r}" for r in rows]
    assert set(results["asr"]["windows"]) == {"length", "random"}  # no random control in this protocol
    assert list(results["asr"]["windows"]["random"]) == ["S1", "S2", "S3"]
    ranking = results["ranking"]["windows"]
    assert {"gap", "spearman"} <= set(ranking["length"]) and "reference_minus_this" in ranking["random"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["result"]["cells"] == 2 * 3


def test_identical_subsets_are_fine_tuned_once(uninterrupted):
    _, run, results, trained = uninterrupted
    cells = sorted((run / "cells").glob("*/*/*/seed*"))
    targets = {cell: (cell / "finetune").resolve() for cell in cells}
    assert len(trained) == len(set(targets.values())) == len(list((run / "finetunes").iterdir()))
    # length and the oracle rank the clean pool alike (file order): their top and bottom share a fine-tune
    for subset in ("top", "bottom"):
        for seed in (0, 1):
            same = [targets[run / "cells" / "ends" / m / subset / f"seed{seed}"] for m in ("length", "loss")]
            assert same[0] == same[1]
    assert targets[run / "cells/ends/length/top/seed0"] != targets[run / "cells/ends/length/top/seed1"]
    assert len(trained) < len(cells)
    assert json.loads((run / "run.json").read_text())["result"]["fine_tunes"] == len(trained)


def test_killed_after_the_first_cell_the_rerun_equals_an_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
    inputs, _, results, _ = uninterrupted
    monkeypatch.setattr(score_module, "method_scores", oracle)
    real, calls = experiment_module.train, []

    def killed_at_the_second(c):
        if calls:
            raise RuntimeError("killed")
        calls.append(c)
        return real(c)

    monkeypatch.setattr(experiment_module, "train", killed_at_the_second)
    with pytest.raises(RuntimeError, match="killed"):
        experiment(config(inputs, tmp_path / "run"))
    first = Path(calls[0].output_dir) / "adapter_model.safetensors"
    stamp = first.stat().st_mtime_ns
    assert not (tmp_path / "run" / "results.json").exists()
    monkeypatch.setattr(experiment_module, "train", real)
    assert experiment(config(inputs, tmp_path / "run")) == results
    assert first.stat().st_mtime_ns == stamp  # the finished cell was reused, not redone
    with pytest.raises(SqsdError, match="different config"):
        experiment(config(inputs, tmp_path / "run", learning_rate=5e-3))


def test_yaml_keys_are_defaults_and_flags_win(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(experiment_module, "experiment_cli", lambda c: seen.append(c) or 0)
    yaml_file = tmp_path / "e.yaml"
    yaml_file.write_text("pool: dolly-sqsd\noutput-dir: runs/e\nmethods: [random, length]\nlearning_rate: 5e-5\n"
                         "seeds: [0, 1]\nn_pool: null\nwindow_size: 7\n")
    assert cli.main(["experiment", str(yaml_file), "--seeds", "3", "--window-size", "9"]) == 0
    c = seen[0]
    assert (c.pool, c.output_dir, c.methods, c.learning_rate) == ("dolly-sqsd", "runs/e", ("random", "length"), 5e-5)
    assert c.seeds == (3,) and c.window_size == 9 and c.n_pool is None and c.config == str(yaml_file)
    assert cli.main(["experiment", "--pool", "p", "--output-dir", "o", "--methods", "length"]) == 0  # no file
    assert seen[1].methods == ("length",) and seen[1].seeds == (0,)


@pytest.mark.parametrize("text, message", [
    ("pool: p\noutput_dir: o\nlearnin_rate: 0.1\n", "unknown key 'learnin_rate'"),
    ("pool: p\noutput_dir: o\nseeds: [a]\n", "key 'seeds': expected int, got 'a'"),
    ("pool: p\noutput_dir: o\nprotocols: [ends, middle]\n", "key 'protocols': 'middle' is not one of"),
    ("output_dir: o\n", "--pool is needed: give it on the command line or as `pool:` in the YAML file"),
    ("- pool\n", "expected a mapping of option: value, got list"),
])
def test_bad_yaml_names_the_file_and_key(tmp_path, capsys, text, message):
    yaml_file = tmp_path / "e.yaml"
    yaml_file.write_text(text)
    assert cli.main(["experiment", str(yaml_file)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert str(yaml_file) in err or "needed" in message


@pytest.mark.parametrize("name", ["experiment-cpu.yaml", "experiment-paper.yaml"])
def test_example_configs_are_valid(name, monkeypatch):
    seen = []
    monkeypatch.setattr(experiment_module, "experiment_cli", lambda c: seen.append(c) or 0)
    assert cli.main(["experiment", str(EXAMPLES / name), "--output-dir", "runs/e", "--device", "cpu"]) == 0
    assert seen[0].methods[0] == "sqsd" and len(seen[0].seeds) >= (2 if "cpu" in name else 1)


def test_results_read_per_prompt_verdicts_and_compare_methods_on_the_same_prompts(tmp_path):
    """assemble() on hand-made evaluation folders: per-prompt ASR = mean over the samples a judge could read
    (samples beyond --n and unparsed ones left out), sets concatenated in id order, then the statistics."""
    from sqsd.experiment import Cell
    from sqsd.results import assemble, outcomes

    sets = []
    for name, n in (("a.txt", 3), ("b.txt", 2)):
        (tmp_path / name).write_text("".join(f"bad {name} {i}\n" for i in range(n)))
        sets.append(str(tmp_path / name))
    c = ExperimentConfig(pool="p", output_dir=str(tmp_path), methods=("length", "random"), seeds=(0, 1),
                         harmful=tuple(sets), do_sample=True, n=2, n_bootstrap=500)

    def evaluation(name, per_prompt, refusal=0.25):
        """Folders for one model: per_prompt[j] = the two samples' verdicts of prompt j (a.txt's 3, b.txt's 2)."""
        folders, ids = [], [f"a.txt:{i}" for i in (1, 2, 3)] + [f"b.txt:{i}" for i in (1, 2)]
        for s, chosen in enumerate((ids[:3], ids[3:])):
            folder = tmp_path / name / str(s)
            folder.mkdir(parents=True)
            rows = [{"id": i, "sample": k, "response": "r", "judge": "keyword", "unsafe": v}
                    for i in chosen for k, v in enumerate(per_prompt[ids.index(i)] + [True])]  # sample 2: not counted
            (folder / "harmful.keyword.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
            (folder / "summary.json").write_text(json.dumps({"over_refusal": {"rate": refusal}}))
            folders.append(str(folder.relative_to(tmp_path)))
        return folders

    assert list(outcomes(c, tmp_path, evaluation("x", [[True, None], [False, False], [True, False],
                                                       [False, True], [True, True]]))) == [1.0, 0.0, 0.5, 0.5, 1.0]
    with pytest.raises(SqsdError, match="no readable verdict on prompt 'a.txt:2'"):
        outcomes(c, tmp_path, evaluation("y", [[True, True], [None, None], [True, True], [True, True], [True, True]]))
    unsafe, safe = [[True, True]] * 5, [[False, False]] * 5
    mixed_top, mixed_bottom = [[True, False], [True, True], [False, False], [True, True], [False, True]], \
        [[False, False], [True, False], [False, False], [True, False], [False, False]]
    plan = {("length", "top"): unsafe, ("length", "bottom"): safe,
            ("random", "top"): mixed_top, ("random", "bottom"): mixed_bottom}
    cells = [Cell("ends", m, s, seed, f"finetunes/{m}{s}{seed}", evaluation(f"{m}-{s}-{seed}", v, 0.1 * seed))
             for (m, s), v in plan.items() for seed in (1, 0)]
    results = assemble(c, tmp_path, evaluation("base", safe), cells, {})
    ends, ranking = results["asr"]["ends"], results["ranking"]["ends"]
    assert ends["length"]["top"]["asr"] == {"value": 1.0, "ci95": [1.0, 1.0]}
    assert ends["random"]["top"]["asr"]["value"] == pytest.approx(0.6)  # prompts 0.5, 1, 0, 1, 0.5; seeds alike
    assert ends["random"]["top"]["asr_per_seed"] == pytest.approx([0.6, 0.6])
    assert ends["random"]["top"]["over_refusal"] == pytest.approx(0.05)  # mean of the seeds' 0.0 and 0.1
    assert ends["random"]["top"]["finetunes"] == ["finetunes/randomtop0", "finetunes/randomtop1"]  # seed order
    assert ranking["length"]["gap"]["value"] == 1.0 and ranking["random"]["gap"]["value"] == pytest.approx(0.4)
    diff = ranking["random"]["reference_minus_this"]
    assert diff["value"] == pytest.approx(0.6) and 0 < diff["ci95"][0] < diff["value"] < diff["ci95"][1]
    assert results["base"]["asr"]["value"] == 0.0 and results["n_prompts"] == 5 and results["reference"] == "length"


@pytest.mark.parametrize("kw, message", [
    (dict(protocols=("contamination",)), "protocol contamination needs --contamination-source"),
    (dict(methods=("sqsd",)), "give --danger and/or --safety"),  # the scoring options, checked as `score` does
    (dict(methods=("random", "gradsim")), "--method gradsim needs --harmful-anchors and --safe-anchors"),
    (dict(harmful=("a/x.txt", "b/x.txt")), "distinct names"),
    (dict(contamination_ratios=(0.1, 1.0)), "fractions in \\(0, 1\\)"),
    (dict(seeds=(0, 0)), "--seeds needs one or more distinct seeds"),
])
def test_experiment_config_refuses_what_cannot_run(kw, message):
    with pytest.raises(SqsdError, match=message):
        ExperimentConfig(pool="p", output_dir="o", **{"methods": ("random",), **kw})


@pytest.mark.slow
def test_a_small_experiment_on_the_real_smollm2_and_named_datasets(tmp_path, monkeypatch):
    """The offline stack the CPU example uses (`smollm2`, dolly-sqsd, harmbench/alpaca-eval @eval), tiny sizes."""
    from conftest import USER_CACHE
    from sqsd import assets

    monkeypatch.setenv("SQSD_CACHE", str(USER_CACHE))
    if not all(assets.is_present(a) for a in ("smollm2", "harmbench", "alpaca-eval")):
        pytest.skip(f"the offline assets are not all in {USER_CACHE}; run `sqsd assets fetch`")
    results = experiment(ExperimentConfig(
        model="smollm2", pool="dolly-sqsd", n_pool=12, methods=("length", "random"), window_size=4, seeds=(0,),
        max_steps=2, batch_size=4, max_length=256, harmful=("harmbench@eval",), limit=4, max_new_tokens=8,
        n_bootstrap=200, output_dir=str(tmp_path / "run")))
    assert results["n_prompts"] == 4 and set(results["asr"]["ends"]) == {"length", "random", "control"}
    lengths = [len(json.loads(line)["messages"][-1]["content"]) for name in ("top", "bottom")
               for line in (tmp_path / "run/cells/ends/length" / name / "seed0/subset.jsonl").read_text().splitlines()]
    assert min(lengths[:4]) >= max(lengths[4:])  # length's top holds the longest responses


def test_a_given_scores_file_is_ranked_instead_of_scoring_the_pool_again(uninterrupted, tmp_path, monkeypatch):
    inputs, run, _, _ = uninterrupted
    monkeypatch.setattr(experiment_module, "score", lambda c: pytest.fail("the pool was scored again"))
    given = run / "scores" / "scores.parquet"
    results = experiment(config(inputs, tmp_path / "run", protocols=("ends",), seeds=(0,), scores=str(given)))
    assert not (tmp_path / "run" / "scores").exists() and set(results["asr"]["ends"]) == {*METHODS, "control"}
    for method in METHODS:
        for subset in ("top", "bottom"):
            cell = Path("cells") / "ends" / method / subset / "seed0" / "subset.jsonl"
            assert (tmp_path / "run" / cell).read_text() == (run / cell).read_text()
    inputs_seen = json.loads((tmp_path / "run" / "run.json").read_text())["inputs"]
    assert "scores" in inputs_seen
    with pytest.raises(SqsdError, match="--scores ranks the whole pool: leave --n-pool unset"):
        config(inputs, tmp_path / "other", scores=str(given), n_pool=5)
