"""`sqsd report` and its figures, from tiny saved run folders of every kind (`report_runs`): the page holds the
expected sections, numbers and images, fetches nothing, says what a half-written folder lacks, and refuses a
folder with nothing to show; the figures' readers name the file, line and field of a bad line."""

import base64
import json
import re
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import report_runs as runs
from report_runs import steering_rows, trajectory_rows
from sqsd import sections
from sqsd.cli import main
from sqsd.config import ReportConfig
from sqsd.errors import SqsdError
from sqsd.figures import load_steering, load_trajectory, plot_steering, plot_trajectory
from sqsd.report import report
from sqsd.report_experiment import _estimate, roc_points
from sqsd.stats import roc_auc

PNG = b"\x89PNG\r\n\x1a\n"


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


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


def test_an_output_that_is_a_folder_names_the_flag(tmp_path):
    path = write(tmp_path / "steering.jsonl", steering_rows())
    with pytest.raises(SqsdError, match="--output .*: is a folder, not a file"):
        plot_steering(path, tmp_path)


# --- the page ----------------------------------------------------------------------------------------------------

def page(folder, fmt="html"):
    out = report(ReportConfig(run_dir=str(folder), format=fmt))
    assert out == folder / "report" / f"index.{fmt}"
    return out.read_text(encoding="utf-8")


def images(html):
    """The PNGs embedded in the page, decoded (each must be a real PNG)."""
    found = [base64.b64decode(uri) for uri in re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)]
    assert all(png[:8] == PNG for png in found)
    return found


def titles(html):
    return [unescape(t) for t in re.findall(r"<h2>([^<]+)</h2>", html)]


def section(html, title):
    """The HTML of the section titled `title` (up to the next section)."""
    start = html.index(f"<h2>{title}")
    end = html.find("<section", start)
    return html[start:end if end > 0 else None]


def test_a_scores_folder_shows_distributions_extremes_with_text_and_the_whole_sortable_pool(tmp_path):
    data = runs.dataset(tmp_path / "data.jsonl", 30)
    runs.scores_run(tmp_path / "run", str(data), 30, methods=("sqsd", "length"), skipped=(4,))
    html = page(tmp_path / "run")
    assert len(images(html)) == 2  # histograms, score vs length
    assert "30 samples, 29 scored, 1 skipped; methods: sqsd, length" in html
    rows = runs.score_rows(30, ("sqsd", "length"), (4,))
    ranked = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["score"])
    riskiest = section(html, "Scores").split("<h3>")[1]
    assert riskiest.startswith("The 20 riskiest samples")
    # riskiest first, with the sample's prompt (escaped: '|' and all) and its score to 4 decimals
    cells = re.findall(r"<tr><td>(\d+)</td>", riskiest)
    assert [int(c) for c in cells] == [r["index"] for r in ranked[:20]]
    top = ranked[0]
    assert f"question number {top['index']} | about topic {top['index'] % 7}" in riskiest
    assert f"{top['score']:+.4f}" in riskiest
    safest = section(html, "Scores").split("<h3>")[2]
    assert [int(c) for c in re.findall(r"<tr><td>(\d+)</td>", safest)] == [r["index"] for r in ranked[::-1][:20]]
    full = section(html, "Scores").split("<h3>")[3]
    assert full.startswith("Every sample") and 'class="sortable"' in full and full.count("<tr><td>") == 30
    assert "skipped: no response token" in full
    assert "<script>" in html and "table.sortable" in html


def test_the_full_table_is_left_out_of_a_large_pool_and_texts_that_cannot_be_read_are_said(tmp_path, monkeypatch):
    monkeypatch.setattr(sections, "FULL_TABLE_MAX", 10)
    data = runs.dataset(tmp_path / "data.jsonl", 12)
    runs.scores_run(tmp_path / "run", str(data), 12)
    data.unlink()
    html = page(tmp_path / "run")
    assert "the full table is left out above 10 samples" in html and 'class="sortable"' not in html
    assert "texts not shown: the scored data could not be read here" in html
    assert "<th>prompt</th>" not in html  # the tables keep id and scores


def test_each_kind_of_run_gets_its_section_with_its_numbers(tmp_path):
    runs.experiment_run(tmp_path / "exp")
    runs.evaluation_run(tmp_path / "eval")
    (tmp_path / "steer").mkdir()
    write(tmp_path / "steer" / "steering.jsonl", steering_rows())
    (tmp_path / "drift").mkdir()
    write(tmp_path / "drift" / "trajectory.jsonl", trajectory_rows())
    html = page(tmp_path)
    assert titles(html) == ["Experiment (exp)", "Drift during fine-tuning (drift)", "Steering (steer)",
                      "Evaluation (eval)"]
    exp = section(html, "Experiment")
    assert len(images(exp)) == 2  # ASR by subset, ROC
    # the reference first, top / random / bottom in that order, over-refusal per cell, CIs as [lo, hi]
    assert "<th>method</th><th>top</th><th>random</th><th>bottom</th>" in exp
    assert "<td>0.620 [0.520, 0.720] · refuses 0.25</td>" in exp
    assert exp.index("<td>sqsd</td>") < exp.index("<td>length</td>") < exp.index("<td>control</td>")
    assert "<td>0.050 [-0.100, 0.200]</td><td>0.360 [0.100, 0.550]</td>" in exp
    assert "<td>sqsd</td><td>0.917</td><td>0.500</td><td>0.250</td>" in exp
    assert "base model 0.125 [0.000, 0.250]" in exp
    drift = section(html, "Drift")
    assert len(images(drift)) == 2
    assert "<td>5</td><td>1.500</td><td>0.450 [0.400, 0.550]</td><td>+1.5000</td><td>-0.5000</td>" in drift
    steer = section(html, "Steering")
    assert len(images(steer)) == 1 and "<td>safety</td><td>2</td><td>0.100 [0.000, 0.200]</td><td>0.500</td>" in steer
    ev = section(html, "Evaluation")
    assert len(images(ev)) == 1  # per category
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())["judges"]["keyword"]
    assert f"<td>keyword</td><td>{summary['rate']:.3f} [{summary['ci95'][0]:.3f}, {summary['ci95'][1]:.3f}]" in ev
    assert f"{summary['rate']:.3f}" == "0.333" and "over-refusal (benign, keyword)</td><td>0.200" in ev
    assert ev.count("<details>") == 12 and "harmful prompt 5 " in ev  # 6 judged responses: prompt + response


class Tags(HTMLParser):
    """Every start tag of a page with its attributes, as a browser's parser sees them."""

    def __init__(self, html):
        super().__init__()
        self.tags = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_the_page_fetches_nothing(tmp_path):
    runs.demo_run(tmp_path / "demo")
    html = page(tmp_path / "demo")
    tags = Tags(html).tags
    assert len(images(html)) == 2 == sum(tag == "img" for tag, _ in tags)
    links = [(name, value) for _, attrs in tags for name, value in attrs.items()
             if name in ("src", "href", "srcset", "data", "poster", "action", "background")]
    assert links and all(v.startswith("data:image/png;base64,") if n == "src" else n == "href" and v.startswith("#")
                         for n, v in links)
    assert not {tag for tag, _ in tags} & {"link", "iframe", "object", "embed", "base", "audio", "video", "source"}
    style = html[html.index("<style>"):html.index("</style>")]
    assert "url(" not in style and "@import" not in style
    assert [attrs for tag, attrs in tags if tag == "script"] == [{}]  # one inline script, no src


def test_the_demo_folder_reports_its_scores_comparison_and_runs(tmp_path):
    root = runs.demo_run(tmp_path / "demo", n=120)
    html = page(root)
    assert titles(html) == ["Scores (scores)", "Against the paper's ranking (scores-n120)"]
    summary = json.loads((root / "scores-n120" / "summary.json").read_text())
    cmp = summary["comparison_with_paper"]["sqsd_risk"]
    assert (f"<td>sqsd_risk</td><td>{cmp['spearman_vs_paper_danger_safe']:+.3f}</td>"
            f"<td>{cmp['auc_S1_vs_S5']:.3f}</td>") in html
    # the riskiest sample of the page is the demo summary's, with the same text
    riskiest = section(html, "Scores").split("<h3>")[1]
    first = summary["riskiest_20"][0]
    assert f"{first['risk']:+.4f}" in riskiest.split("</tr>")[1]
    runs_table = html[html.index("<h3>Runs in this folder"):html.index("<nav>")]
    assert re.findall(r"<tr><td>([^<]+)</td><td>(yes|no)</td><td>([^<]+)</td>", runs_table) == [
        ("align", "yes", "–"), ("anchor", "yes", "–"), ("directions/danger", "yes", "–"),
        ("directions/safety", "yes", "–"), ("scores-n120/scores", "yes", "scores"),
        ("scores-n120/windows", "yes", "–")]


def test_a_half_written_folder_shows_what_is_done_and_says_what_is_missing(tmp_path):
    root = runs.demo_run(tmp_path / "demo", n=40, summary=False)
    scores = root / "scores-n40" / "scores"
    # the score run was stopped after one of its chunks: no merged file, no result in run.json
    merged = pd.read_parquet(scores / "scores.parquet").drop(columns="risk_z").head(16)
    (scores / "chunks").mkdir()
    write(scores / "chunks" / "00000.jsonl", [json.loads(r.to_json()) for _, r in merged.iterrows()])
    (scores / "scores.parquet").unlink()
    record = json.loads((scores / "run.json").read_text())
    del record["result"]
    (scores / "run.json").write_text(json.dumps(record))
    runs.experiment_run(root / "experiment", finished=False)
    html = page(root)
    sc = section(html, "Scores")
    assert "Missing: scores.parquet: not merged yet; the 16 rows of the 1 finished chunk(s) are shown" in sc
    assert "Missing: run.json has no result: the run has not finished" in sc
    assert sc.split("<h3>")[3].count("<tr><td>") == 16
    exp = section(html, "Experiment")
    assert "Missing: results.json: not written yet; the cells finished so far are listed" in exp
    assert "<td>ends</td><td>sqsd</td><td>top</td><td>0</td><td>harmbench@eval 0.600 [0.400, 0.800]</td><td>0.250</td>" in exp
    assert "Against the paper" not in html  # the demo's summary.json is not written yet
    assert ("<tr><td>scores-n40/scores</td><td>no</td><td>scores</td>" in html
            and "<tr><td>experiment</td><td>no</td><td>experiment</td>" in html)


def test_markdown_has_the_same_tables_without_figures(tmp_path):
    (tmp_path / "drift").mkdir()
    write(tmp_path / "drift" / "trajectory.jsonl", trajectory_rows())
    runs.experiment_run(tmp_path / "exp")
    md = page(tmp_path, "md")
    assert "<img" not in md and "Figure: ASR after fine-tuning on each subset (in the HTML page)." in md
    assert "| 5 | 1.500 | 0.450 [0.400, 0.550] | +1.5000 | -0.5000 |" in md
    assert "| method | top | random | bottom |" in md and "| sqsd | 0.917 | 0.500 | 0.250 | – |" in md
    data = runs.dataset(tmp_path / "data.jsonl", 25)
    runs.scores_run(tmp_path / "sc", str(data), 25)
    md = page(tmp_path / "sc", "md")
    assert "question number 24 \\| about topic 3" in md  # a '|' in a cell is escaped
    assert "Every sample: 25 rows, in the HTML page (sortable, filterable)." in md


def test_a_folder_with_nothing_to_show_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(SqsdError, match=r"empty holds nothing sqsd report can show: no scores file, results\.json"):
        report(ReportConfig(run_dir=str(tmp_path / "empty")))
    assert not (tmp_path / "empty" / "report").exists()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "nope: not a folder" in capsys.readouterr().err


def test_report_cli_writes_where_asked(tmp_path, capsys):
    (tmp_path / "steer").mkdir()
    write(tmp_path / "steer" / "steering.jsonl", steering_rows())
    assert main(["report", str(tmp_path / "steer"), "--output", str(tmp_path / "out" / "page.html")]) == 0
    assert (tmp_path / "out" / "page.html").read_text().startswith("<!DOCTYPE html>")
    assert "steering (.)" in capsys.readouterr().out
    write(tmp_path / "steer" / "steering.jsonl", steering_rows()[:2] + ['{"direction": "x"'])
    assert main(["report", str(tmp_path / "steer")]) == 2
    assert "steering.jsonl:3: not valid JSON" in capsys.readouterr().err


def test_roc_points_step_through_tied_scores_together_and_integrate_to_the_auc():
    scores = np.array([0.9, 0.8, 0.8, 0.5, 0.3, 0.3, 0.1])
    labels = np.array([True, True, False, False, True, False, False])
    fpr, tpr = roc_points(scores, labels)
    assert fpr == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0] and tpr == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(scores, labels))


def test_a_folder_of_saved_results_may_hold_several_kinds(tmp_path):
    write(tmp_path / "trajectory.jsonl", trajectory_rows())
    write(tmp_path / "steering.jsonl", steering_rows())
    html = page(tmp_path)
    assert titles(html) == [f"Drift during fine-tuning ({tmp_path.name})", f"Steering ({tmp_path.name})"]
    assert len(images(html)) == 3


def test_an_experiment_folder_is_its_own_section_and_estimates_read_in_either_form(tmp_path):
    html = page(runs.experiment_run(tmp_path / "exp"))
    assert titles(html) == ["Experiment (exp)"] and html.count("<dt>methods</dt>") == 1  # not repeated in the header
    assert _estimate({"value": 0.5, "ci95": [0.25, 0.75]}) == _estimate({"value": 0.5, "lo": 0.25, "hi": 0.75,
                                                                       "level": 0.95}) == (0.5, 0.25, 0.75)


def test_the_demo_ends_on_the_report_of_its_folder(tmp_path, monkeypatch, capsys):
    """Every model stage replaced by a stand-in that leaves its folder as the real one would; the summary, the
    windows and the report are the real ones."""
    import sqsd.align
    import sqsd.assets
    import sqsd.direction_tools
    import sqsd.experiment
    import sqsd.score
    import sqsd.train
    from sqsd.config import DemoConfig
    from sqsd.pipeline import demo

    def stage(name):
        def run(config):
            folder = tmp_path / "demo" / name if name else Path(config.output_dir)
            runs.run_json(folder, {"model": "smollm2"}, {"steps": 1})
            return folder
        return run

    monkeypatch.setattr(sqsd.assets, "fetch_cli", lambda config: 0)
    monkeypatch.setattr(sqsd.align, "align", stage("align"))
    monkeypatch.setattr(sqsd.direction_tools, "directions_data", stage(None))
    monkeypatch.setattr(sqsd.direction_tools, "build", stage(None))
    monkeypatch.setattr(sqsd.train, "train", stage(None))
    monkeypatch.setattr(sqsd.score, "score", lambda c: runs.scores_run(Path(c.output_dir), c.data, 60) / "scores.parquet")
    experiments = []
    monkeypatch.setattr(sqsd.experiment, "experiment", experiments.append)
    demo(DemoConfig(output_dir=str(tmp_path / "demo"), n_pool=60, n_windows=3, window_size=10))
    (ends,) = experiments  # the last stage ranks the scores of stage 5 (no second scoring): 10% of 60 each
    assert ends.scores == str(tmp_path / "demo" / "scores-n60" / "scores" / "scores.parquet")
    assert (ends.window_size, ends.protocols, ends.methods) == (6, ("ends",), ("sqsd", "random", "length", "gradsim"))
    assert ends.harmful_anchors.endswith("danger-data/data.jsonl") and ends.output_dir.endswith("experiment-n6")
    page = tmp_path / "demo" / "report" / "index.html"
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith(f"wrote {page} (")  # the demo's last line
    assert titles(page.read_text()) == ["Scores (scores)", "Against the paper's ranking (scores-n60)"]


def test_texts_from_the_data_are_escaped_not_run(tmp_path):
    data = runs.jsonl(tmp_path / "data.jsonl", [{"instruction": f"<script>alert({i})</script><img src=x>",
                                                 "output": "</td></table>"} for i in range(5)])
    runs.scores_run(tmp_path / "run", str(data), 5)
    html = page(tmp_path / "run")
    tags = Tags(html).tags
    assert [tag for tag, _ in tags].count("script") == 1 and "&lt;script&gt;alert(4)&lt;/script&gt;" in html
    assert sum(tag == "img" for tag, _ in tags) == len(images(html)) == 2 and "&lt;/td&gt;&lt;/table&gt;" in html
