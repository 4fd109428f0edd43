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
# Two-sided 95% quantiles of Student's t with 1..10 degrees of freedom (beyond: the normal's 1.96 is close enough).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (one policy's episodes: independent trials)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(cells: np.ndarray, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean over a (seeds, tasks) array and its percentile interval from resampling seeds with replacement."""
    cells = np.asarray(cells, dtype=np.float64)
    if cells.ndim != 2 or cells.shape[0] < 1:
        raise ValueError(f"expected a (seeds, tasks) array, got shape {cells.shape}")
    per_seed = cells.mean(axis=1)
    rng = np.random.default_rng(seed)
    draws = per_seed[rng.integers(0, len(per_seed), size=(RESAMPLES, len(per_seed)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(per_seed.mean()), float(low), float(high)


def paired_difference(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b over matching (seed, task) cells and its seed-bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have the same shape, got {a.shape} and {b.shape}")
    return bootstrap_mean(a - b, confidence)


def resolvable_difference(cells: np.ndarray) -> float:
    """The smallest mean difference a paired comparison over these seeds resolves at 95% (half-width of a
    t interval from the spread of per-seed means), for planning how many seeds an experiment needs."""
    per_seed = np.asarray(cells, dtype=np.float64).mean(axis=1)
    n = len(per_seed)
    if n < 2:
        return float("inf")
    t_quantile = T_975[n - 2] if n - 1 <= len(T_975) else 1.96
    return float(t_quantile * per_seed.std(ddof=1) / np.sqrt(n))
