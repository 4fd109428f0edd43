"""The report's numbers that are not read straight from a file: the success band over seeds and the metric curves."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capvector.bench.experiment.layout import RunLayout
from capvector.bench.experiment.protocol import METHODS
from capvector.bench.experiment.report import (
    Evaluations,
    band,
    findings,
    headroom_line,
    metric_curve,
    plot_success,
    resolved_line,
)
from capvector.bench.statistics import bootstrap_mean

TASKS = ["door-lock-v3", "faucet-close-v3"]
SUCCESSES = [[3, 5], [1, 2], [4, 4]]  # (seeds, tasks) of 5 episodes each


def test_the_band_is_the_seed_bootstrap_of_the_per_seed_and_task_success_rates(tmp_path):
    layout = RunLayout(tmp_path)
    layout.evaluations.parent.mkdir(parents=True)
    records = {
        f"downstream/sft/seed{seed}/step10@default": {
            "tasks": {task: {"successes": wins, "episodes": 5} for task, wins in zip(TASKS, row)}
        }
        for seed, row in enumerate(SUCCESSES)
    }
    layout.evaluations.write_text(json.dumps(records))
    folders = [layout.downstream("sft", seed) for seed in range(3)]
    cells = Evaluations(layout, ("default", "new_env")).cells(folders, 10, "default", TASKS)
    assert np.array_equal(cells, np.array(SUCCESSES) / 5)
    numbers = band(cells)
    assert (numbers["mean"], numbers["low"], numbers["high"]) == bootstrap_mean(np.array(SUCCESSES) / 5)
    assert numbers["low"] < numbers["mean"] < numbers["high"]  # three seeds that disagree: a band of some width
    assert numbers["mean"] == pytest.approx(
        Evaluations(layout, ("default", "new_env")).pooled(folders, 10, "default")["rate"]
    )  # equal episodes per cell

    results = {
        "config": {"budgets": [10, 20], "variant": "default"},
        "methods": {"sft": "(a) SFT from theta_pt"},
        "success_band": {"sft": {v: {"10": numbers, "20": numbers} for v in ("default", "new_env")}},
    }
    plot_success(results, tmp_path / "success.png")
    assert Image.open(tmp_path / "success.png").format == "PNG"


def test_metric_curves_average_over_seeds_at_the_steps_all_of_them_logged(tmp_path):
    for seed, values in enumerate(([1.0, 2.0, 3.0], [3.0, 4.0])):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        lines = [{"step": 10 * (i + 1), "loss/orth": v} for i, v in enumerate(values)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    folders = [tmp_path / "seed0", tmp_path / "seed1"]
    assert metric_curve(folders, "loss/orth", scale=0.5) == {"steps": [10, 20], "mean": [1.0, 1.5]}
    assert metric_curve(folders, "loss/action") is None


def comparisons(seeds):
    """A results block with one method against SFT and the transfer ceiling, at two budgets."""
    return {
        "config": {"seeds": list(range(seeds))},
        "methods": {m: METHODS[m].label for m in ("sft", "capvector", "ft_sft", "ao_sft")},
        "versus_sft": {
            "default": {
                "sft": {"steps_to_sft_final": [100, 100, 100]},
                "capvector": {"difference": {"100": [4.0, -1.0, 9.0], "200": [-6.0, -9.0, -2.0]}},
                "ft_sft": {"difference": {"100": [0.0, -5.0, 5.0], "200": [1.0, -3.0, 4.0]}},
                "ao_sft": {"difference": {"100": [2.0, -2.0, 6.0], "200": [3.0, -1.0, 7.0]}},
            }
        },
        "transfer": {"default": {"difference": {"100": [2.0, 0.5, 4.0], "200": [2.0, -1.0, 5.0]}}},
    }


def test_the_report_names_the_differences_whose_interval_excludes_zero_and_counts_the_rest():
    line = resolved_line(comparisons(5), "default", "in-domain")
    assert "(d) vs (a) at 200 steps -6.0 [-9.0, -2.0]" in line and "(g) vs (f) at 100 steps 2.0 [0.5, 4.0]" in line
    assert "(d) vs (a) at 100 steps" not in line and "6 of the 8 paired differences are not resolved" in line


def test_with_fewer_than_five_seeds_the_report_claims_no_significance():
    line = resolved_line(comparisons(3), "default", "in-domain")
    assert "none can be claimed with 3 seed(s)" in line and "-6.0" not in line


@pytest.mark.parametrize(
    ("seeds", "difference", "verdict"),
    [
        (5, {"100": [3.0, -2.0, 8.0], "200": [12.0, 4.0, 20.0]}, "Ahead at 200 steps"),
        (5, {"100": [3.0, -2.0, 8.0], "200": [-6.0, -9.0, -2.0]}, "Not ahead at any budget"),
        (3, {"100": [3.0, -2.0, 8.0], "200": [12.0, 4.0, 20.0]}, "With 3 seed(s) it cannot be resolved"),
    ],
)
def test_the_headroom_line_reads_the_oracles_lead_over_sft(seeds, difference, verdict):
    results = {
        "config": {"seeds": list(range(seeds))},
        "versus_sft": {"default": {"oracle": {"difference": difference}}},
    }
    line = headroom_line(results, "default")
    assert verdict in line and "200 steps " in line and "decoy" not in line
    assert headroom_line({**results, "versus_sft": {"default": {}}}, "default") is None


@pytest.mark.parametrize(
    ("drop", "verdict"), [([20.0, 8.0, 31.0], "it uses the positions"), ([3.0, -4.0, 9.0], "not resolved")]
)
def test_the_headroom_line_reads_the_decoy_test(drop, verdict):
    results = {
        "config": {"seeds": list(range(5))},
        "versus_sft": {"default": {"oracle": {"difference": {"200": [12.0, 4.0, 20.0]}}}},
        "oracle_decoy": {"steps": 200, "oracle": [40.0, 30.0, 50.0], "decoy": [20.0, 12.0, 30.0], "drop": drop},
    }
    line = headroom_line(results, "default")
    assert "from 40% to 20%" in line and verdict in line


def test_the_cost_line_gives_capvectors_step_against_sft_and_against_c_which_differs_only_by_l_orth():
    """Read from the committed full run's results, with (c)'s step time changed, so that a line that gave one ratio
    for both, or none, fails."""
    results = json.loads((Path(__file__).parents[2] / "docs/results/full-10-demos/results.json").read_text())
    capvector_ms = results["timing"]["capvector"]["step_ms"]
    results["timing"]["meta_sft"]["step_ms"] = capvector_ms / 1.25
    results["timing"]["sft"]["step_ms"] = capvector_ms / 2
    (line,) = [line for line in findings(results) if line.startswith("Cost per training step")]
    assert "CapVector 2.00x, and 1.25x (c)" in line
