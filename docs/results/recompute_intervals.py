"""Recompute the seed-bootstrap intervals of committed reproduce reports with the current statistics, from their
results.json alone, and write results.json and report.md (and the success plot) again.

Stop 24 widened the intervals (capvector.bench.statistics.expanded_tail): the plain percentile bootstrap over 5 seeds
covered a known difference 86.5% of the time in the tests' simulation, not 95%. The per-seed success rates
(`per_run`, each the mean over the held-out tasks' equal numbers of episodes) are all a seed bootstrap reads, so the
numbers below are those a run of the current code would report.

    .venv/bin/python docs/results/recompute_intervals.py docs/results/views-long docs/results/views-teacher \
        docs/results/headroom/{views-scan,views-picked,views-confirm}

A `capvector headroom` folder (one with the probe: older ones predate the report format) is summarized again from its
evaluations.json and probe.json by headroom.summarize.
"""

import json
import sys
from pathlib import Path

import numpy as np

from capvector.bench.experiment.headroom import HeadroomConfig, report_markdown, summarize
from capvector.bench.experiment.protocol import ReproduceConfig
from capvector.bench.experiment.report import (
    band,
    markdown,
    plot_success,
    summary,
    transfer_ceiling,
    versus_sft,
)
from capvector.bench.statistics import paired_difference, points
from capvector.files import write_json, write_text


def per_seed(cell: dict) -> np.ndarray:
    """A pooled cell's per-seed rates as (seeds, 1) cells: a seed bootstrap reads only their means over tasks."""
    return np.array(cell["per_run"], dtype=np.float64)[:, None]


def recompute(folder: Path) -> None:
    results = json.loads((folder / "results.json").read_text())
    config = ReproduceConfig(**results["config"])
    budgets, success = [str(b) for b in config.budgets], results["success"]
    variants = list(next(iter(success.values())))
    curves = {v: {m: np.stack([per_seed(success[m][v][b]) for b in budgets]) for m in success} for v in variants}
    results["success_band"] = {
        m: {v: {b: band(curves[v][m][i]) for i, b in enumerate(budgets)} for v in variants} for m in success
    }
    results["versus_sft"] = versus_sft(config, curves)
    results["transfer"] = transfer_ceiling(config, curves)
    ablations, last = results["ablations"], budgets[-1]
    seeds = len(ablations["seeds"])
    for kind in ("alpha", "lambda", "head"):
        for row in ablations[kind]:
            row["versus_sft"] = {
                v: points(paired_difference(per_seed(row[v]), per_seed(success["sft"][v][last])[:seeds]))
                for v in variants
            }
    results["summary"] = summary(
        config, results["versus_sft"], results["timing"], results.get("teacher"), results["transfer"]
    )
    write_json(folder / "results.json", results)
    write_text(folder / "report.md", markdown(results))
    plot_success(results, folder / "success_vs_steps.png")


def recompute_headroom(folder: Path) -> None:
    """headroom.summarize again on the folder's evaluations and probe, as `capvector headroom` computes them."""
    results = json.loads((folder / "results.json").read_text())
    evaluations = json.loads((folder / "evaluations.json").read_text())
    probe = json.loads((folder / "probe.json").read_text())
    runs = {name.split("/")[0] for name in evaluations}
    # an auxiliary arm's evaluations are those of its chosen weight's runs only (<arm>_w<weight>)
    run_of = {arm: arm if arm in runs else next(r for r in runs if r.startswith(f"{arm}_w")) for arm in results["arms"]}
    chosen = {arm: results[arm] for arm in results["arms"] if arm in results}  # weight and validation figures
    summary = summarize(evaluations, HeadroomConfig(**results["config"]), run_of, probe, chosen)
    summary["config"] = results["config"]  # as the run had it (fields added since take their defaults above)
    write_json(folder / "results.json", summary)
    write_text(folder / "report.md", report_markdown(summary))


if __name__ == "__main__":
    for name in sys.argv[1:]:
        (recompute_headroom if (Path(name) / "evaluations.json").exists() else recompute)(Path(name))
        print(f"{name}: intervals recomputed")
