import numpy as np
import pytest

from capvector.bench.statistics import (
    area_under_curve,
    bootstrap_mean,
    bootstrap_steps_to_reach,
    expanded_tail,
    paired_difference,
    resolvable_difference,
    steps_to_reach,
    t_975,
)


def synthetic_cells(rng, seeds, tasks, rate, seed_sd=0.1, episodes=20):
    """Per-(seed, task) success rates: a seed effect shared by the seed's tasks, then binomial episodes."""
    p = np.clip(rate + rng.normal(0, seed_sd, size=(seeds, 1)) + np.zeros((1, tasks)), 0.02, 0.98)
    return rng.binomial(episodes, p) / episodes


@pytest.mark.parametrize("seeds", [5, 12])
def test_the_seed_bootstrap_covers_a_known_difference_at_about_the_nominal_rate(seeds):
    # 5 seeds, what the experiments run: the plain percentile interval covered 86.5% here (too narrow for few
    # seeds); the expanded one covers what any interval within the seeds' range can (at most 1 - 2 / 2^5)
    rng = np.random.default_rng(0)
    trials, covered = 1000, 0
    for _ in range(trials):
        base = synthetic_cells(rng, seeds, 4, 0.5)
        shifted = synthetic_cells(rng, seeds, 4, 0.6)
        _, low, high = paired_difference(shifted, base)
        # the truth: 0.1 up to the clipping at the edges, which the seed spread reaches rarely
        covered += low <= 0.1 <= high
    assert 0.92 <= covered / trials <= 0.99


def test_fewer_seeds_widen_the_bootstrap_tails_by_the_t_quantile():
    assert expanded_tail(1) == 0.025
    assert expanded_tail(5) < expanded_tail(12) < expanded_tail(100) < 0.025
    # beyond the table the expansion matches Student's t: 2.0395 (31), 2.0003 (60), 1.9799 (120)
    for degrees, quantile in ((30, 2.042), (31, 2.0395), (60, 2.0003), (120, 1.9799)):
        assert t_975(degrees) == pytest.approx(quantile, abs=2e-4)


def test_intervals_contain_the_mean_and_shrink_with_more_seeds():
    rng = np.random.default_rng(1)
    few, many = synthetic_cells(rng, 4, 4, 0.5), synthetic_cells(rng, 40, 4, 0.5)
    for cells in (few, many):
        mean, low, high = bootstrap_mean(cells)
        assert low <= mean <= high and mean == pytest.approx(cells.mean())

    def width(cells):
        return np.subtract(*bootstrap_mean(cells)[2:0:-1])

    assert width(many) < width(few)
    assert resolvable_difference(many) < resolvable_difference(few)


def test_paired_outcomes_must_match():
    with pytest.raises(ValueError, match="same shape"):
        paired_difference(np.zeros((3, 2)), np.zeros((3, 3)))


def test_the_area_under_the_curve_is_the_mean_success_over_the_steps_spanned():
    steps = [0, 100, 300]
    curve = np.stack([np.full((2, 3), 0.0), np.full((2, 3), 0.5), np.full((2, 3), 1.0)])
    # trapezoids: 100 * 0.25 + 200 * 0.75 = 175 over 300 steps
    assert np.allclose(area_under_curve(curve, steps), 175 / 300)
    sooner = np.stack([np.full((2, 3), 0.0), np.full((2, 3), 1.0), np.full((2, 3), 1.0)])
    assert (area_under_curve(sooner, steps) > area_under_curve(curve, steps)).all()
    with pytest.raises(ValueError, match="budgets"):
        area_under_curve(curve[:1], steps[:1])


def test_steps_to_reach_interpolates_between_budgets_and_is_inf_when_never_reached():
    steps = [100, 200, 400]
    curve = np.stack([np.full((3, 2), 0.2), np.full((3, 2), 0.4), np.full((3, 2), 0.8)])
    assert steps_to_reach(curve, steps, 0.6) == pytest.approx(300)
    assert steps_to_reach(curve, steps, 0.1) == 100
    assert steps_to_reach(curve, steps, 0.9) == float("inf")
    # a method that reaches the reference's final success at the second budget, in every resample
    reference = curve.copy()
    faster = np.stack([np.full((3, 2), 0.5), np.full((3, 2), 0.8), np.full((3, 2), 0.9)])
    estimate, low, high = bootstrap_steps_to_reach(faster, steps, reference)
    assert estimate == pytest.approx(200) and low == pytest.approx(200) and high == pytest.approx(200)
    assert bootstrap_steps_to_reach(reference, steps, reference)[0] == pytest.approx(400)
