"""Figures from saved files: PNGs are written from hand-made trajectory/steering files; bad lines are errors
naming the file, line and field."""

import json

import pytest

from sqsd.cli import main
from sqsd.errors import SqsdError
from sqsd.report import load_steering, load_trajectory, plot_steering, plot_trajectory

PNG = b"\x89PNG\r\n\x1a\n"


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trajectory_rows():
    rows = []
    for step in range(0, 11):
        row = {"step": step, "epoch": step / 10}
        if step:
            row["loss"] = 2.0 - step / 10
        row["danger"] = {"cosine-sum": 0.3 * step, "projection": 0.01 * step, "cosine": 0.02 * step,
                         "norm_delta": 0.1 * step}
        row["safety"] = {"cosine-sum": -0.1 * step, "projection": -0.002 * step, "cosine": -0.01 * step,
                         "norm_delta": 0.1 * step}
        if step in (0, 5, 10):
            row.update(asr=0.1 + 0.07 * step, asr_ci=[0.05 + 0.07 * step, 0.2 + 0.07 * step], asr_n=32)
        rows.append(row)
    return rows


def steering_rows():
    return [{"direction": d, "kind": d, "alpha": a, "scaling": 2.0, "asr": 0.5 + sign * 0.2 * a,
             "ci_low": 0.4 + sign * 0.2 * a, "ci_high": 0.6 + sign * 0.2 * a,
             "over_refusal": None if d == "danger" else 0.3 - sign * 0.1 * a, "n": 50}
            for d, sign in (("danger", 1), ("safety", -1)) for a in (-1, -0.5, 0, 0.5, 1, 2)]


def test_trajectory_plot_from_a_hand_made_file(tmp_path):
    path = write(tmp_path / "trajectory.jsonl", trajectory_rows())
    data = load_trajectory(path, "projection")
    assert set(data["series"]) == {"danger", "safety"} and len(data["series"]["danger"]) == 11
    assert [a[0] for a in data["asr"]] == [0, 5, 10]
    for metric in ("cosine-sum", "projection", "cosine"):
        out = plot_trajectory(path, tmp_path / f"t-{metric}.png", metric)
        assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5000


def test_steering_plot_from_a_hand_made_file(tmp_path):
    path = write(tmp_path / "steering.jsonl", steering_rows())
    data = load_steering(path)
    assert [r["alpha"] for r in data["safety"]] == [-1, -0.5, 0, 0.5, 1, 2]
    out = plot_steering(path, tmp_path / "s.png")
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5000


@pytest.mark.parametrize("kind,line,bad,match", [
    ("trajectory", 3, "{not json", r"trajectory\.jsonl:3: not valid JSON"),
    ("trajectory", 2, {"step": 1, "danger": {"projection": 0.1}}, r"trajectory\.jsonl:2: field 'cosine-sum': missing"),
    ("trajectory", 4, {"epoch": 0.1, "danger": {"cosine-sum": 0.1}}, r"trajectory\.jsonl:4: field 'step': missing"),
    ("trajectory", 5, {"step": 4, "danger": {"cosine-sum": 0.1}, "asr": 0.5, "asr_ci": [0.1]},
     r"trajectory\.jsonl:5: field 'asr_ci'"),
    ("steering", 3, {"direction": "danger", "alpha": 1}, r"steering\.jsonl:3: field 'asr': missing"),
    ("steering", 2, {"direction": "danger", "alpha": "one", "asr": 0.1},
     r"steering\.jsonl:2: field 'alpha': not a number"),
    ("steering", 6, [1, 2], r"steering\.jsonl:6: expected a JSON object"),
])
def test_a_bad_line_names_the_file_line_and_field(tmp_path, kind, line, bad, match):
    rows = trajectory_rows() if kind == "trajectory" else steering_rows()
    rows[line - 1] = bad
    path = write(tmp_path / f"{kind}.jsonl", rows)
    plot = plot_trajectory if kind == "trajectory" else plot_steering
    with pytest.raises(SqsdError, match=match):
        plot(path, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_empty_missing_or_direction_less_files_are_errors(tmp_path):
    with pytest.raises(SqsdError, match="does not exist"):
        plot_steering(tmp_path / "nope.jsonl", tmp_path / "x.png")
    with pytest.raises(SqsdError, match="is empty"):
        plot_trajectory(write(tmp_path / "empty.jsonl", []), tmp_path / "x.png")
    with pytest.raises(SqsdError, match="no tracked direction"):
        plot_trajectory(write(tmp_path / "t.jsonl", [{"step": 0, "loss": 1.0}]), tmp_path / "x.png")


def test_report_cli(tmp_path, capsys):
    traj = write(tmp_path / "trajectory.jsonl", trajectory_rows())
    assert main(["report", "trajectory", str(traj)]) == 0  # default output: FILE with .png
    assert (tmp_path / "trajectory.png").read_bytes()[:8] == PNG
    steering = write(tmp_path / "steering.jsonl", steering_rows())
    assert main(["report", "steering", str(steering), "--output", str(tmp_path / "fig" / "s.png")]) == 0
    assert (tmp_path / "fig" / "s.png").read_bytes()[:8] == PNG
    write(steering, steering_rows()[:2] + ['{"direction": "x"'])
    assert main(["report", "steering", str(steering)]) == 2
    assert "steering.jsonl:3: not valid JSON" in capsys.readouterr().err


def test_an_output_that_is_a_folder_names_the_flag(tmp_path):
    path = write(tmp_path / "steering.jsonl", steering_rows())
    with pytest.raises(SqsdError, match="--output .*: is a folder, not a file"):
        plot_steering(path, tmp_path)
