"""The demo pipeline's own pieces: the pool sample and the comparison with the paper's ranking."""

import itertools
import json

import pandas as pd
import pytest

from sqsd.config import DemoConfig
from sqsd.errors import SqsdError
from sqsd.pipeline import auc, compare_with_paper, spearman, write_pool


def test_auc_equals_the_pairwise_definition():
    scores = pd.Series([0.3, 0.9, 0.1, 0.5, 0.5, 0.7, 0.2])
    positive = pd.Series([True, True, False, False, True, False, False])
    pos, neg = scores[positive].tolist(), scores[~positive].tolist()
    literal = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))
    assert auc(scores, positive) == pytest.approx(literal)
    assert auc(-scores, positive) == pytest.approx(1 - literal)


def test_spearman_is_rank_based_and_handles_ties():
    a = pd.Series([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(a, -a) == pytest.approx(-1.0)
    ties = pd.Series([1.0, 1.0, 2.0, 3.0, 3.0])
    # Average ranks (1.5, 1.5, 3, 4.5, 4.5) against (1..5): Pearson of the ranks.
    ranks = pd.Series([1.5, 1.5, 3.0, 4.5, 4.5])
    assert spearman(ties, a) == pytest.approx(float(ranks.corr(a)))


def test_compare_with_paper_uses_ok_rows_and_the_end_windows():
    pool = pd.DataFrame({"window": ["S1", "S1", "S3", "S5", "S5", "S1"],
                         "Danger-safe": [3.0, 2.0, 0.0, -1.0, -2.0, 9.0]})
    scores = pd.DataFrame({"risk": [0.9, 0.8, 0.5, 0.1, 0.2, None], "risk_z": [1.0, 0.5, 0.0, -0.5, -1.0, None],
                           "danger": [0.1, 0.2, 0.3, 0.4, 0.5, None], "safety": [0.0, 0.0, 0.0, 0.0, 1.0, None],
                           "n_response_tokens": [10, 50, 30, 20, 40, 0],
                           "status": ["ok"] * 5 + ["skipped: no response token left"]})
    out = compare_with_paper(scores, pool)
    assert out["n"] == 5 and out["n_S1"] == 2 and out["n_S5"] == 2
    assert out["sqsd_risk"]["auc_S1_vs_S5"] == pytest.approx(1.0)
    assert out["sqsd_risk"]["spearman_vs_paper_danger_safe"] == pytest.approx(0.9)
    assert out["response_length"]["auc_S1_vs_S5"] == pytest.approx(0.5)  # 10, 50 vs 20, 40
    assert out["danger_term"]["auc_S1_vs_S5"] == pytest.approx(0.0)  # 0.1, 0.2 vs 0.4, 0.5
    assert out["minus_safety_term"]["auc_S1_vs_S5"] == pytest.approx(0.75)  # 0, 0 vs 0, -1
    assert out["sqsd_risk_z"]["spearman_vs_paper_danger_safe"] == pytest.approx(1.0)


def test_pool_sample_is_seeded_sorted_and_keeps_the_paper_columns(tmp_path):
    a = write_pool(tmp_path / "a", 30, seed=0)
    b = write_pool(tmp_path / "b", 30, seed=0)
    c = write_pool(tmp_path / "c", 30, seed=1)
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert a.read_text() == b.read_text() != c.read_text()
    assert len(rows) == 30 and {"instruction", "response", "Danger-safe", "window"} <= set(rows[0])
    assert {r["window"] for r in rows} <= {"S1", "S3", "S5"}
    windows = [r["window"] for r in rows]
    assert windows == sorted(windows)  # pool order kept: S1 rows first


def test_demo_config_checks_windows_fit():
    with pytest.raises(SqsdError, match="must not exceed"):
        DemoConfig(n_pool=100, n_windows=5, window_size=30)
    with pytest.raises(SqsdError, match="--experiment-methods must start with sqsd"):
        DemoConfig(experiment_methods=("random", "sqsd"))
    with pytest.raises(SqsdError, match="--ends-fraction must be in"):
        DemoConfig(n_pool=10, window_size=2, ends_fraction=0.01)
