"""Statistics of the validation experiment: bootstrap confidence intervals and ranking metrics (maths only).

- `bootstrap`: a percentile bootstrap of any statistic of (n_seeds, n_prompts) tables, resampling prompts and,
  with several seeds, seeds — the same indices for every table, so differences between tables are paired;
  `mean_ci`, `gap_ci`, `paired_difference` and `bootstrap_ci` (the tuple form `sqsd evaluate` and drift use)
  are thin calls of it.
- `spearman`, `roc_auc`, `average_precision`, `recall_at`: rank statistics that never depend on the input order
  of tied scores (average ranks; 1/2 per tied pair; tied groups flagged together; a tied group's expected share).

docs/design.md §2 ("Statistics of the experiment") states every estimator exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sqsd.errors import SqsdError


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its percentile-bootstrap confidence interval [lo, hi] at `level`."""

    value: float
    lo: float
    hi: float
    level: float = 0.95

    def to_dict(self) -> dict[str, float | list[float]]:
        """{"value": v, "ci95": [lo, hi]}: the key names the level ("ci90" at 0.90), as in `summary.json`."""
        return {"value": self.value, f"ci{self.level * 100:g}": [self.lo, self.hi]}


def bootstrap(statistic: Callable[[dict[str, np.ndarray]], float], data: dict[str, np.ndarray],
              n_bootstrap: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Percentile bootstrap of `statistic` over the (n_seeds, n_prompts) tables of `data`.

    Each replicate draws n_prompts prompt (column) indices with replacement and, when n_seeds > 1, n_seeds seed
    (row) indices with replacement, independently; every table is resampled with the same indices, so a
    statistic comparing tables (a gap, a difference of gaps) sees paired data — row s and column j must mean
    the same seed and the same prompt in every table. value = statistic(data); the CI is the (1 − level)/2 and
    (1 + level)/2 quantiles (numpy's linear interpolation) of the replicates. All the prompt indices are drawn
    first, as one (n_bootstrap, n_prompts) block, so a one-seed table gets exactly the resamples `sqsd evaluate`
    always used.
    """
    if not data:
        raise SqsdError("bootstrap: no data")
    tables = {name: np.asarray(table, dtype=float) for name, table in data.items()}
    shapes = {name: table.shape for name, table in tables.items()}
    shape = next(iter(shapes.values()))
    if len(shape) != 2 or any(s != shape for s in shapes.values()):
        raise SqsdError(f"bootstrap: every table must have one shape (n_seeds, n_prompts); got {shapes}")
    if 0 in shape:
        raise SqsdError(f"bootstrap: no prompts or no seeds; got {shapes}")
    for name, table in tables.items():
        if np.isnan(table).any():
            row, col = np.argwhere(np.isnan(table))[0]
            raise SqsdError(f"bootstrap: '{name}' is missing (NaN) at seed row {row}, prompt column {col}")
    n_seeds, n_prompts = shape
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, n_prompts, size=(n_bootstrap, n_prompts))
    seeds = (rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds)) if n_seeds > 1
             else np.zeros((n_bootstrap, 1), dtype=int))
    replicates = np.array([statistic({name: table[np.ix_(s, p)] for name, table in tables.items()})
                           for s, p in zip(seeds, prompts)])
    tail = (1 - level) / 2
    return Estimate(float(statistic(tables)), float(np.quantile(replicates, tail)),
                    float(np.quantile(replicates, 1 - tail)), level)


def _table(x: np.ndarray | Sequence[float]) -> np.ndarray:
    """A (n_prompts,) vector as a one-seed (1, n_prompts) table; a table unchanged."""
    x = np.asarray(x, dtype=float)
    return x[None] if x.ndim == 1 else x


def mean_ci(x: np.ndarray | Sequence[float], n_bootstrap: int = 2000, seed: int = 0,
            level: float = 0.95) -> Estimate:
    """The mean over seeds and prompts of one (n_seeds, n_prompts) or (n_prompts,) array, with its CI."""
    return bootstrap(lambda d: d["x"].mean(), {"x": _table(x)}, n_bootstrap, seed, level)


def gap_ci(top: np.ndarray, bottom: np.ndarray, n_bootstrap: int = 2000, seed: int = 0,
           level: float = 0.95) -> Estimate:
    """mean(top) − mean(bottom), paired: both are outcomes on the same prompts under the same seeds."""
    return bootstrap(lambda d: d["top"].mean() - d["bottom"].mean(),
                     {"top": _table(top), "bottom": _table(bottom)}, n_bootstrap, seed, level)


def paired_difference(a_top: np.ndarray, a_bottom: np.ndarray, b_top: np.ndarray, b_bottom: np.ndarray,
                      n_bootstrap: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """gap_a − gap_b (gap = mean(top) − mean(bottom)), all four resampled with the same prompts and seeds.

    Negative when method b separates risky from safe subsets better than method a.
    """
    data = {"a_top": _table(a_top), "a_bottom": _table(a_bottom),
            "b_top": _table(b_top), "b_bottom": _table(b_bottom)}
    return bootstrap(lambda d: (d["a_top"].mean() - d["a_bottom"].mean()) - (d["b_top"].mean() - d["b_bottom"].mean()),
                     data, n_bootstrap, seed, level)


def bootstrap_ci(values: Sequence[float], n_bootstrap: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` over prompts; (nan, nan) for no values."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    estimate = mean_ci(values, n_bootstrap, seed, level)
    return estimate.lo, estimate.hi


def _scores(values: Sequence[float], name: str = "scores") -> np.ndarray:
    """A 1-D float vector with no missing value (None reads as NaN); the error names the first position."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise SqsdError(f"{name} must be a non-empty 1-D sequence; got shape {x.shape}")
    missing = np.flatnonzero(np.isnan(x))
    if len(missing):
        raise SqsdError(f"{name}[{missing[0]}] is missing (None or NaN)")
    return x


def _scored_labels(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels as bool), checked: equal lengths, labels 0/1, at least one positive and one negative."""
    x = _scores(scores)
    y = np.asarray(labels)
    if y.shape != x.shape:
        raise SqsdError(f"scores and labels differ in length: {len(x)} and {len(y)}")
    bad = np.flatnonzero((y != 0) & (y != 1))
    if len(bad):
        raise SqsdError(f"labels[{bad[0]}] is {y[bad[0]].item()!r}, not 0 or 1")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise SqsdError(f"labels need both a positive and a negative; got {int(y.sum())} positive of {len(y)}")
    return x, y


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `x` ascending, tied values sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(x)]  # one past each tied group
    group = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2)[group]
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks; nan when either side is constant."""
    x, y = _scores(x, "x"), _scores(y, "y")
    if len(x) != len(y):
        raise SqsdError(f"spearman: x and y differ in length: {len(x)} and {len(y)}")
    if (x == x[0]).all() or (y == y[0]).all():
        return float("nan")
    dx, dy = _average_ranks(x), _average_ranks(y)
    dx, dy = dx - dx.mean(), dy - dy.mean()
    return float((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum()))


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """P(a positive scores above a negative), a tie counting 1/2: Mann–Whitney U / (n_pos · n_neg)."""
    x, y = _scored_labels(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    u = _average_ranks(x)[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def average_precision(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Σ_k (R_k − R_{k−1}) P_k over the distinct scores, descending (sklearn's `average_precision_score`).

    At threshold k every sample scoring at least the k-th distinct score is flagged, so tied samples enter
    together and their order does not matter; P_k, R_k are the precision and recall of that flag, R_0 = 0.
    """
    x, y = _scored_labels(scores, labels)
    order = np.argsort(-x, kind="stable")
    x, y = x[order], y[order]
    last = np.flatnonzero(np.r_[x[1:] != x[:-1], True])  # the last position of each tied group
    true_positives = np.cumsum(y)[last]
    precision = true_positives / (last + 1)
    recall = true_positives / y.sum()
    return float((np.diff(recall, prepend=0.0) * precision).sum())


def recall_at(scores: Sequence[float], labels: Sequence[int], fraction: float) -> float:
    """Share of the positives among the top k = ceil(fraction · n) scores.

    Samples tied at the cut are taken in their expected share: with m places left for a tied group of g
    holding p positives, it contributes m · p / g (the mean over random orders of the ties). fraction · n is
    rounded to 9 decimals before the ceiling, so 0.07 · 100 gives k = 7, not 8.
    """
    x, y = _scored_labels(scores, labels)
    if not 0 < fraction <= 1:
        raise SqsdError(f"recall_at: fraction must be in (0, 1]; got {fraction}")
    k = math.ceil(round(fraction * len(x), 9))
    cut = np.sort(x)[::-1][k - 1]
    above, tied = x > cut, x == cut
    found = y[above].sum() + (k - above.sum()) * y[tied].sum() / tied.sum()
    return float(found / y.sum())
