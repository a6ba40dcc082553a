"""Uncertainty of comparisons over test cases and seeds, computed by scipy.stats (docs/methods.md §6).

A row of a leaderboard or an ablation table is one method (or variant) trained with several seeds and
tested on the same test cases. Per metric:

- ``<metric>``: the mean over cases of the per-case value averaged over seeds (the test cases are the
  sampling unit: a new study draws new cases);
- ``<metric>_ci_low`` / ``_ci_high``: its 95% bootstrap confidence interval over the cases
  (``scipy.stats.bootstrap``, percentile method, 9999 resamples, seeded: the same runs give the same table);
- ``<metric>_sd_seeds``: the standard deviation (ddof 1) over seeds of the per-seed mean over cases
  (how much the number moves when only the training seed changes);
- against the reference row, paired over the cases both rows scored: ``<metric>_diff`` (mean of the
  per-case differences row - reference), ``<metric>_diff_ci_low`` / ``_diff_ci_high`` (bootstrap CI of that
  mean) and ``<metric>_p`` (two-sided Wilcoxon signed-rank p-value, ``scipy.stats.wilcoxon``).

Per-case values come from each run's ``test_cases.csv`` (rows of the ``final`` output, or of another
output such as ``samples/1``). Metrics pooled over the whole test set (``ece``, ``iou_pooled``) have no per-case
value: their row gets the mean and sd over seeds of the runs' metrics.json values, and no CI or p-value
(``pooled_columns``).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from diffseg.utils.errors import ConfigError

CONFIDENCE = 0.95
N_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
#: column suffixes written per metric, in this order
SUFFIXES = ("", "_ci_low", "_ci_high", "_sd_seeds", "_diff", "_diff_ci_low", "_diff_ci_high", "_p")


def read_case_values(run_dir: Path, metric: str, output: str = "final") -> dict[str, float]:
    """{case_id: value} of ``metric`` (a test_cases.csv column, e.g. ``dice/wt``) for one output of a run."""
    path = Path(run_dir) / "test_cases.csv"
    if not path.is_file():
        raise ConfigError(f"{path}: missing (the run has not finished its test): cannot compute case statistics")
    with open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("output", "final") == output]
    if not rows:
        raise ConfigError(f"{path}: no rows of output {output!r}")
    if metric not in rows[0]:
        raise ConfigError(f"{path}: no column {metric!r}; columns: {sorted(rows[0])}")
    return {r["case_id"]: float(r[metric]) if r[metric] != "" else math.nan for r in rows}


def has_case_values(run_dir: Path, metric: str) -> bool:
    """Whether ``metric`` is a per-case column of the run's test_cases.csv (pooled metrics are not)."""
    path = Path(run_dir) / "test_cases.csv"
    if not path.is_file():
        return False
    with open(path, newline="") as handle:
        return metric in (csv.DictReader(handle).fieldnames or [])


def bootstrap_ci(values: Sequence[float]) -> tuple[float, float]:
    """95% percentile-bootstrap CI of the mean (scipy.stats.bootstrap); a single value or identical values
    give the degenerate interval (value, value)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    if values.size == 1 or np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    res = stats.bootstrap((values,), np.mean, confidence_level=CONFIDENCE, n_resamples=N_RESAMPLES,
                          method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (1.0 when every difference is 0)."""
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return math.nan
    if np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(d).pvalue)


def case_means(per_seed: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per case, the mean over seeds; only cases that every seed scored with a finite value."""
    if not per_seed:
        return {}
    cases = set.intersection(*(set(s) for s in per_seed))
    finite = [c for c in sorted(cases) if all(math.isfinite(s[c]) for s in per_seed)]
    return {c: float(np.mean([s[c] for s in per_seed])) for c in finite}


def row_statistics(per_seed: Sequence[Mapping[str, float]],
                   reference: Sequence[Mapping[str, float]] | None = None) -> dict[str, float]:
    """The columns of one row and metric (suffixes of SUFFIXES) from per-seed {case: value} maps; the
    paired columns only when ``reference`` (the reference row's per-seed maps) is given."""
    means = case_means(per_seed)
    values = list(means.values())
    out = {"": float(np.mean(values)) if values else math.nan}
    out["_ci_low"], out["_ci_high"] = bootstrap_ci(values)
    seed_means = [float(np.mean([s[c] for c in means])) for s in per_seed] if means else []
    out["_sd_seeds"] = float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else math.nan
    if reference is not None:
        ref = case_means(reference)
        common = sorted(set(means) & set(ref))
        diffs = [means[c] - ref[c] for c in common]
        out["_diff"] = float(np.mean(diffs)) if diffs else math.nan
        out["_diff_ci_low"], out["_diff_ci_high"] = bootstrap_ci(diffs)
        out["_p"] = wilcoxon_p(diffs)
    return out


def metric_columns(metric: str, per_seed: Sequence[Mapping[str, float]],
                   reference: Sequence[Mapping[str, float]] | None = None) -> dict[str, float]:
    """``{<metric>: mean, <metric>_ci_low: .., ..., <metric>_p: ..}`` for one row."""
    return {f"{metric}{suffix}": value for suffix, value in row_statistics(per_seed, reference).items()}


def pooled_columns(metric: str, per_seed: Sequence[float]) -> dict[str, float]:
    """A metric pooled over the test set (no per-case values): mean and sd over seeds of the runs' values;
    the CI, difference and p columns stay empty (NaN)."""
    values = [v for v in per_seed if math.isfinite(v)]
    out = {suffix: math.nan for suffix in SUFFIXES}
    out[""] = float(np.mean(values)) if values else math.nan
    out["_sd_seeds"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return {f"{metric}{suffix}": value for suffix, value in out.items()}


def verdict(expect: str | None, low: float, high: float, tolerance: float) -> str:
    """agrees / disagrees / inconclusive: does the CI [low, high] of (variant - reference) support the paper's
    direction? "similar" needs the whole CI inside ±tolerance; "not_higher" is contradicted only by a CI
    above +tolerance, "not_lower" by one below -tolerance."""
    if expect is None or math.isnan(low) or math.isnan(high):
        return "—"
    rules = {  # (agrees, disagrees)
        "higher": (low > 0, high < 0),
        "lower": (high < 0, low > 0),
        "similar": (-tolerance <= low and high <= tolerance, low > tolerance or high < -tolerance),
        "not_higher": (high <= tolerance, low > tolerance),
        "not_lower": (low >= -tolerance, high < -tolerance),
    }
    if expect not in rules:
        raise ConfigError(f"expect: expected one of {sorted(rules)}, got {expect!r}")
    agrees, disagrees = rules[expect]
    return "agrees" if agrees else "disagrees" if disagrees else "inconclusive"


def format_cell(columns: Mapping[str, float], metric: str) -> str:
    """``mean [ci_low, ci_high] ± sd_seeds`` for a markdown table."""
    mean = columns.get(metric, math.nan)
    if math.isnan(mean):
        return "n/a"
    sd = columns.get(f"{metric}_sd_seeds", math.nan)
    low, high = columns.get(f"{metric}_ci_low", math.nan), columns.get(f"{metric}_ci_high", math.nan)
    text = f"{mean:.4f}" + ("" if math.isnan(low) else f" [{low:.4f}, {high:.4f}]")
    return text + ("" if math.isnan(sd) else f" ± {sd:.4f}")


def format_difference(columns: Mapping[str, float], metric: str) -> str:
    """``+diff [low, high], p=..`` for a markdown table (empty for the reference row)."""
    diff = columns.get(f"{metric}_diff")
    if diff is None or math.isnan(diff):
        return ""
    return (f"{diff:+.4f} [{columns[f'{metric}_diff_ci_low']:+.4f}, {columns[f'{metric}_diff_ci_high']:+.4f}], "
            f"p={columns[f'{metric}_p']:.3g}")
