import math

import numpy as np
import pytest

from sqsd.errors import SqsdError
from sqsd.stats import (
    Estimate,
    average_precision,
    bootstrap,
    bootstrap_ci,
    gap_ci,
    mean_ci,
    paired_difference,
    recall_at,
    roc_auc,
    spearman,
)


def test_bootstrap_ci_on_known_cases():
    assert bootstrap_ci([1.0] * 20) == (1.0, 1.0)
    assert bootstrap_ci([0.0] * 20) == (0.0, 0.0)
    # 50 of 100: the normal approximation gives 0.5 +- 1.96 * sqrt(0.25 / 100) = [0.402, 0.598]
    lo, hi = bootstrap_ci([0.0] * 50 + [1.0] * 50, n_bootstrap=4000)
    assert lo == pytest.approx(0.402, abs=0.015) and hi == pytest.approx(0.598, abs=0.015)
    assert bootstrap_ci([0.0] * 50 + [1.0] * 50, seed=3) == bootstrap_ci([0.0] * 50 + [1.0] * 50, seed=3)
    # a smaller sample gives a wider interval
    lo_small, hi_small = bootstrap_ci([0.0] * 5 + [1.0] * 5, n_bootstrap=4000)
    assert hi_small - lo_small > hi - lo
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_bootstrap_ci_gives_the_numbers_of_its_former_one_block_resample():
    # the formula `sqsd evaluate` used before the bootstrap moved here: figures already reported stay the same
    rng = np.random.default_rng(5)
    for n, n_bootstrap, seed in [(1, 200, 0), (37, 1000, 4), (300, 2000, 11)]:
        x = (rng.random(n) < 0.3).astype(float)
        means = x[np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))].mean(axis=1)
        tail = (1 - 0.95) / 2
        assert bootstrap_ci(x, n_bootstrap, seed) == (np.quantile(means, tail), np.quantile(means, 1 - tail))


def test_the_95_percent_interval_covers_a_known_binomial_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = [e.lo <= 0.3 <= e.hi for e in
               (mean_ci((rng.random(100) < 0.3).astype(float), n_bootstrap=1000, seed=i) for i in range(200))]
    assert 0.90 <= np.mean(covered) <= 0.99


def test_an_estimate_holds_its_statistic_contains_it_and_is_deterministic_for_a_seed():
    rng = np.random.default_rng(1)
    x = rng.random((2, 60))
    e = mean_ci(x, seed=7)
    assert e.value == x.mean() and e.lo <= e.value <= e.hi and e.lo < e.hi
    assert mean_ci(x, seed=7) == e and mean_ci(x, seed=8) != e
    assert e.to_dict() == {"value": e.value, "ci95": [e.lo, e.hi]}
    assert mean_ci(x, level=0.9).to_dict().keys() == {"value", "ci90"}
    narrower = mean_ci(x, seed=7, level=0.8)
    assert e.lo <= narrower.lo <= narrower.hi <= e.hi
    # any statistic: the median of per-prompt means, on the original data for the value
    m = bootstrap(lambda d: float(np.median(d["x"].mean(axis=0))), {"x": x})
    assert m.value == np.median(x.mean(axis=0)) and m.lo <= m.hi


def test_shared_indices_make_the_difference_of_identical_arrays_exactly_zero():
    rng = np.random.default_rng(2)
    top, bottom = rng.random((3, 40)), rng.random((3, 40))
    assert gap_ci(top, top) == Estimate(0.0, 0.0, 0.0)
    assert paired_difference(top, bottom, top, bottom) == Estimate(0.0, 0.0, 0.0)
    # a constant per-prompt shift survives every resample exactly: unpaired resampling would blur it
    shifted = paired_difference(top, bottom, top + 0.05, bottom)
    assert shifted.value == pytest.approx(-0.05) and shifted.lo == pytest.approx(-0.05)
    assert shifted.hi == pytest.approx(-0.05)


def test_the_paired_difference_is_negative_when_b_separates_better():
    rng = np.random.default_rng(3)
    def rate(p):
        return (rng.random((2, 80)) < p).astype(float)
    a_top, a_bottom, b_top, b_bottom = rate(0.5), rate(0.45), rate(0.8), rate(0.1)
    d = paired_difference(a_top, a_bottom, b_top, b_bottom)
    assert d.value == pytest.approx((a_top.mean() - a_bottom.mean()) - (b_top.mean() - b_bottom.mean()))
    assert d.lo <= d.value <= d.hi < 0
    reverse = paired_difference(b_top, b_bottom, a_top, a_bottom)
    assert reverse.value == pytest.approx(-d.value) and reverse.lo > 0
    gap = gap_ci(b_top, b_bottom)
    assert gap.value == pytest.approx(b_top.mean() - b_bottom.mean()) and 0 < gap.lo <= gap.value <= gap.hi


def test_resampling_seeds_widens_the_interval_when_seeds_disagree():
    rng = np.random.default_rng(4)
    seed_rates = np.array([0.1, 0.3, 0.5, 0.7])[:, None]
    x = (rng.random((4, 200)) < seed_rates).astype(float)
    two_way, prompts_only = mean_ci(x), mean_ci(x.mean(axis=0))
    assert two_way.value == pytest.approx(prompts_only.value)
    assert two_way.hi - two_way.lo > 2 * (prompts_only.hi - prompts_only.lo)
    # seeds that agree add nothing: the prompt indices are drawn first, so the interval is the one-seed one
    same = mean_ci(np.repeat(x[:1], 4, axis=0))
    one = mean_ci(x[0])
    assert same.lo == pytest.approx(one.lo) and same.hi == pytest.approx(one.hi)


def test_bootstrap_refuses_tables_it_cannot_pair():
    with pytest.raises(SqsdError, match=r"one shape \(n_seeds, n_prompts\); got \{'top': \(2, 5\), 'bottom': \(2, 4\)"):
        gap_ci(np.zeros((2, 5)), np.zeros((2, 4)))
    with pytest.raises(SqsdError, match="one shape"):
        bootstrap(lambda d: 0.0, {"x": np.zeros(5)})
    with pytest.raises(SqsdError, match="no prompts"):
        mean_ci(np.zeros((2, 0)))
    x = np.zeros((2, 5))
    x[1, 3] = np.nan
    with pytest.raises(SqsdError, match="'x' is missing \\(NaN\\) at seed row 1, prompt column 3"):
        mean_ci(x)
    with pytest.raises(SqsdError, match="no data"):
        bootstrap(lambda d: 0.0, {})


def test_spearman_on_known_orders():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4, 5], [0.9, 0.5, 0.4, 0.2, -3]) == pytest.approx(-1.0)
    # ranks of x: 1, 2.5, 2.5, 4; of y: 1..4 -> 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    # window rank against a falling ASR with one swap: 1 - 6 * 2 / (5 * 24) = 0.9
    assert spearman([1, 2, 3, 4, 5], [0.8, 0.5, 0.6, 0.2, 0.1]) == pytest.approx(-0.9)
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    with pytest.raises(SqsdError, match="differ in length: 3 and 2"):
        spearman([1, 2, 3], [1, 2])


def test_roc_auc_on_known_cases():
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([3.0] * 6, [1, 0, 1, 0, 0, 0]) == 0.5
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of 4 pairs ordered (sklearn's documented example)
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # the positive ties one negative (1/2) and beats the other (1)
    assert roc_auc([1, 1, 0], [1, 0, 0]) == pytest.approx(0.75)
    assert roc_auc([1, 0], [True, False]) == 1.0


def test_random_scores_rank_at_chance_over_many_draws():
    rng = np.random.default_rng(6)
    labels = np.r_[np.ones(10), np.zeros(90)]
    aucs = [roc_auc(rng.random(100), labels) for _ in range(300)]
    aps = [average_precision(rng.random(100), labels) for _ in range(300)]
    assert np.mean(aucs) == pytest.approx(0.5, abs=0.02)
    # and spread as Mann-Whitney's null: sd = sqrt((10 + 90 + 1) / (12 * 10 * 90)) = 0.097
    assert np.std(aucs) == pytest.approx(0.097, abs=0.015)
    assert 0.1 < np.mean(aps) < 0.2  # chance AP is about the positive rate, 0.1, a little above for small n


def test_average_precision_hand_computed_and_ties_grouped():
    # ranking 1, 0, 1, 0: 0.5 * 1 + 0.5 * 2/3 (sklearn's documented example)
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(5 / 6)
    assert average_precision([5, 4, 3, 2, 1], [1, 1, 0, 0, 0]) == 1.0
    # a tie of one positive and one negative at the top enters at once: 0.5 * 1/2 + 0.5 * 2/3, in either order
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(7 / 12)
    assert average_precision([0.5, 0.5, 0.2], [0, 1, 1]) == pytest.approx(7 / 12)
    # all tied: one threshold, precision = the positive rate
    assert average_precision([1.0] * 4, [1, 0, 0, 0]) == pytest.approx(0.25)


def test_recall_at_a_fraction_hand_computed():
    # top 2 of 5 = 0.9 (positive), 0.8 (negative): one of two positives
    assert recall_at([0.9, 0.1, 0.8, 0.3, 0.2], [1, 0, 0, 1, 0], 0.4) == 0.5
    assert recall_at([0.9, 0.1, 0.8, 0.3, 0.2], [1, 0, 0, 1, 0], 1.0) == 1.0
    # top 2: the 3, then one place for three tied 2s holding one positive -> 1/3 of a positive, of 2
    assert recall_at([3, 2, 2, 2, 1], [0, 1, 0, 0, 1], 0.4) == pytest.approx(1 / 6)
    # 0.07 * 100 is 7.000000000000001 in floating point: still the top 7, not 8
    scores, labels = np.arange(100, 0, -1), np.r_[np.ones(8), np.zeros(92)]
    assert recall_at(scores, labels, 0.07) == pytest.approx(7 / 8)
    assert recall_at(scores, labels, 0.071) == 1.0  # ceil(7.1) = 8


def test_ranking_metrics_name_the_bad_input():
    with pytest.raises(SqsdError, match=r"scores\[2\] is missing \(None or NaN\)"):
        roc_auc([0.1, 0.2, None, 0.4], [0, 1, 0, 1])
    with pytest.raises(SqsdError, match=r"scores\[0\] is missing"):
        average_precision([float("nan"), 0.2], [0, 1])
    with pytest.raises(SqsdError, match=r"labels\[1\] is 2, not 0 or 1"):
        recall_at([0.1, 0.2, 0.3], [0, 2, 1], 0.5)
    with pytest.raises(SqsdError, match="differ in length: 3 and 2"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(SqsdError, match="both a positive and a negative; got 0 positive of 3"):
        roc_auc([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(SqsdError, match=r"fraction must be in \(0, 1\]; got 0"):
        recall_at([0.1, 0.2], [0, 1], 0)
    with pytest.raises(SqsdError, match="non-empty 1-D"):
        average_precision([], [])
