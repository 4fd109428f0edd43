"""Intervals for success rates: over one policy's episodes (Wilson), and over training seeds and tasks (bootstrap).

Outcomes are a (seeds, tasks) array of per-cell success rates (each cell: one trained policy on one task's
evaluation episodes). Seeds are the random unit: a bad seed tends to be bad on every task, so cells of one seed
are not independent. The bootstrap therefore resamples whole seeds (clusters) with replacement and keeps the task
set fixed (the tasks are the population the experiment is about). Paired comparisons take the difference per cell
first (both methods trained with the same seed, evaluated on the same placements), which removes what a seed and
a placement share.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 10_000
# Two-sided 95% quantiles of Student's t with 1..30 degrees of freedom (beyond: t_975's expansion).
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
Z_975 = 1.959964
# Below this many seeds no interval from resampling seeds can cover 95%: it never reaches past the lowest and highest
# seed, and all n seeds fall on one side of the truth with probability 2 / 2^n (4 seeds: 12.5%).
MIN_SEEDS = 5


def t_975(degrees: int) -> float:
    """The 97.5% quantile of Student's t (Cornish-Fisher's first terms beyond the table: within 1e-4 there)."""
    if degrees <= len(T_975):
        return T_975[degrees - 1]
    z = Z_975
    return z + (z**3 + z) / (4 * degrees) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * degrees**2)


def expanded_tail(n: int) -> float:
    """The tail probability at which to read a seed bootstrap over n seeds for 95% coverage. The percentile
    bootstrap is too narrow for few units (5 seeds: 86.5% coverage in the tests); its tails are widened to where a
    normal bootstrap distribution would give the t interval's width, with the sqrt(n / (n - 1)) factor that the
    plug-in variance lacks (Hesterberg's expanded percentile interval, "What teachers should know about the
    bootstrap", 2015)."""
    if n < 2:
        return 0.025
    return 0.5 * math.erfc(math.sqrt(n / (n - 1)) * t_975(n - 1) / math.sqrt(2))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (one policy's episodes: independent trials)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(cells: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean over a (seeds, tasks) array and its 95% interval from resampling seeds with replacement (expanded
    percentile: expanded_tail)."""
    cells = np.asarray(cells, dtype=np.float64)
    if cells.ndim != 2 or cells.shape[0] < 1:
        raise ValueError(f"expected a (seeds, tasks) array, got shape {cells.shape}")
    per_seed = cells.mean(axis=1)
    rng = np.random.default_rng(seed)
    draws = per_seed[rng.integers(0, len(per_seed), size=(RESAMPLES, len(per_seed)))].mean(axis=1)
    tail = expanded_tail(len(per_seed))
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(per_seed.mean()), float(low), float(high)


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Mean of a - b over matching (seed, task) cells and its 95% seed-bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have the same shape, got {a.shape} and {b.shape}")
    return bootstrap_mean(a - b)


def points(triple: tuple[float, float, float]) -> list[float]:
    """A (mean, low, high) of success rates (or their difference) in rounded percentage points (no -0.0)."""
    return [round(100 * v, 1) + 0.0 for v in triple]


def resolvable_difference(cells: np.ndarray) -> float:
    """The smallest mean difference a paired comparison over these seeds resolves at 95% (half-width of a
    t interval from the spread of per-seed means), for planning how many seeds an experiment needs."""
    per_seed = np.asarray(cells, dtype=np.float64).mean(axis=1)
    n = len(per_seed)
    if n < 2:
        return float("inf")
    return float(t_975(n - 1) * per_seed.std(ddof=1) / np.sqrt(n))


def area_under_curve(curve: np.ndarray, steps: list[int]) -> np.ndarray:
    """Per (seed, task) cell, the mean success over training steps: the trapezoid area under success-against-steps
    (`curve`: (budgets, seeds, tasks), measured at `steps`) divided by the steps spanned, so it stays a rate (0-1)
    that rewards learning sooner. Feed it to bootstrap_mean or paired_difference like any cells."""
    curve = np.asarray(curve, dtype=np.float64)
    if curve.ndim != 3 or curve.shape[0] != len(steps) or len(steps) < 2:
        raise ValueError(f"expected (budgets, seeds, tasks) at {len(steps)} >= 2 budgets, got shape {curve.shape}")
    x = np.asarray(steps, dtype=np.float64)
    widths = np.diff(x)[:, None, None]
    return ((curve[1:] + curve[:-1]) / 2 * widths).sum(axis=0) / (x[-1] - x[0])


def steps_to_reach(curve: np.ndarray, steps: list[int], target: float) -> float:
    """The training steps at which the mean success (over seeds and tasks) of `curve` ((budgets, seeds, tasks) at
    `steps`) first reaches `target`, interpolated linearly between budgets; inf if it never does."""
    means = np.asarray(curve, dtype=np.float64).mean(axis=(1, 2))
    for i, mean in enumerate(means):
        if mean >= target:
            if i == 0:
                return float(steps[0])
            before = means[i - 1]
            return float(steps[i - 1] + (target - before) / (mean - before) * (steps[i] - steps[i - 1]))
    return math.inf


def bootstrap_steps_to_reach(
    curve: np.ndarray, steps: list[int], reference: np.ndarray, seed: int = 0
) -> tuple[float, float, float]:
    """How many steps `curve` needs to reach the final mean success of `reference` (both (budgets, seeds, tasks),
    trained with the same seeds): the estimate and its interval from resampling seeds for both together, as the
    paper's "converges faster" reads. inf where a resample never gets there."""
    curve, reference = np.asarray(curve, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if curve.shape != reference.shape:
        raise ValueError(f"paired curves must have the same shape, got {curve.shape} and {reference.shape}")
    estimate = steps_to_reach(curve, steps, reference[-1].mean())
    rng = np.random.default_rng(seed)
    seeds = curve.shape[1]
    draws = [
        steps_to_reach(curve[:, pick], steps, reference[-1, pick].mean())
        for pick in rng.integers(0, seeds, size=(RESAMPLES, seeds))
    ]
    tail = expanded_tail(seeds)
    low, high = np.quantile(np.array(draws), [tail, 1 - tail], method="inverted_cdf")
    return estimate, float(low), float(high)
