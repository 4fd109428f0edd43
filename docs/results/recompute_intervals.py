"""Recompute the seed-bootstrap intervals of committed reproduce reports with the current statistics, from their
results.json alone, and write results.json and report.md (and the success plot) again.

Stop 24 widened the intervals (capvector.bench.statistics.expanded_tail): the plain percentile bootstrap over 5 seeds
covered a known difference ~87% of the time, not 95%. The per-seed success rates (`per_run`, each the mean over the
held-out tasks' equal numbers of episodes) are all a seed bootstrap reads, so the numbers below are those a run of
the current code would report.

    .venv/bin/python docs/results/recompute_intervals.py docs/results/views-long docs/results/views-teacher \
        docs/results/headroom/{wide,scarce,coarse,scan,views,views-scan,views-picked,views-confirm}

A `capvector headroom` folder is recomputed from its evaluations.json (and probe.json where the regime has the probe):
every arm's success, its paired difference to SFT, the decoy figures and the probe's intervals.
"""

import json
import sys
from pathlib import Path

import numpy as np

from capvector.bench.experiment.headroom import report_markdown
from capvector.bench.experiment.protocol import ReproduceConfig
from capvector.bench.experiment.report import (
    band,
    markdown,
    plot_success,
    summary,
    transfer_ceiling,
    versus_sft,
)
from capvector.bench.statistics import bootstrap_mean, paired_difference, points
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
    results = json.loads((folder / "results.json").read_text())
    evaluations = json.loads((folder / "evaluations.json").read_text())
    seeds, tasks = results["config"]["seeds"], results["config"]["tasks"]
    runs = {name.split("/")[0] for name in evaluations}
    # older folders name no arms (sft, oracle and, where they have its column, the control); an auxiliary arm's
    # evaluations are those of its chosen weight's runs only (<arm>_w<weight>)
    first = results["budgets"][next(iter(results["budgets"]))]
    arms = results.get("arms") or ["sft", "oracle", *(["control"] if "control" in first else [])]
    run_of = {arm: arm if arm in runs else next(r for r in runs if r.startswith(f"{arm}_w")) for arm in arms}

    def cells(arm: str, steps: str, decoy: bool = False) -> np.ndarray:
        suffix = "/decoy" if decoy else ""
        return np.array([[evaluations[f"{run_of[arm]}/seed{s}/step{steps}{suffix}"][t] for t in tasks] for s in seeds])

    for steps, row in results["budgets"].items():
        sft = cells("sft", steps)
        for arm in run_of:
            row[arm] = points(bootstrap_mean(cells(arm, steps)))
            if arm != "sft":
                row[f"{arm}_minus_sft"] = points(paired_difference(cells(arm, steps), sft))
    decoy = results["decoy"]
    oracle, misled = cells("oracle", str(decoy["steps"])), cells("oracle", str(decoy["steps"]), True)
    decoy |= {
        "oracle": points(bootstrap_mean(oracle)),
        "oracle_with_decoy": points(bootstrap_mean(misled)),
        "drop": points(paired_difference(oracle, misled)),
    }
    best = max(results["budgets"], key=lambda b: results["budgets"][b]["oracle_minus_sft"][1])
    lead = results["budgets"][best]["oracle_minus_sft"]
    results["headroom"] |= {"budget": int(best), "oracle_minus_sft": lead, "accepted": lead[0] >= 20 and lead[1] > 0}
    if (folder / "probe.json").exists():
        probe, steps = json.loads((folder / "probe.json").read_text()), results["probe"]["steps"]
        for arm in run_of:
            r2 = np.array([[probe[f"{run_of[arm]}/seed{s}/step{steps}"]] for s in seeds])
            results["probe"][arm] = [round(v, 3) for v in bootstrap_mean(r2)]
    write_json(folder / "results.json", results)
    write_text(folder / "report.md", report_markdown(results))


if __name__ == "__main__":
    for name in sys.argv[1:]:
        (recompute_headroom if (Path(name) / "evaluations.json").exists() else recompute)(Path(name))
        print(f"{name}: intervals recomputed")
