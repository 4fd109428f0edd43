"""Paired differences between arms of two diagnostic studies of the same run, read from their work folders: the mean
over the first arms minus the mean over the second, cell by (seed, task), in each variant and budget, with the 95%
seed-bootstrap interval. Valid because run.py evaluates every arm's seed on the run's placements for that seed
(protocol.first_episode) with the same episodes, so a (seed, task) cell is the same placements in both studies.

    PYTHONPATH=src .venv/bin/python docs/results/diagnostics/pair_studies.py WORK_A ARM[,ARM...] WORK_B ARM[,ARM...]
"""

import json
import sys
from pathlib import Path

import numpy as np
from run import success_cells  # this folder's run.py: how a study reads its evaluations

from capvector.bench.statistics import paired_difference, points


def evaluations(work: Path) -> dict:
    """Every evaluation in the work folder's evaluation files (one per plan it evaluated); a name two plans evaluated
    differently (a start changed between them) is refused, since which one the study reported cannot be told here."""
    found: dict = {}
    for path in sorted(work.glob("evaluations-*.json")):
        for name, result in json.loads(path.read_text()).items():
            if found.setdefault(name, result) != result:
                raise SystemExit(f"{work}: {name} was evaluated differently by two plans; delete the stale file")
    return found


def cells(found: dict, arms: list[str], budget: str, variant: str, seeds: list[int], tasks: list[str]) -> np.ndarray:
    """The arms' mean success per (seed, task)."""
    return np.mean([success_cells(found, arm, budget, variant, seeds, tasks) for arm in arms], axis=0)


def main(work_a: Path, arms_a: list[str], work_b: Path, arms_b: list[str]) -> None:
    a, b = evaluations(work_a), evaluations(work_b)
    keys = [key for key in a if key.startswith(f"{arms_a[0]}/")]
    seeds = sorted({int(key.split("/")[1][4:]) for key in keys})
    budgets = sorted({key.split("/")[2].split("@")[0][4:] for key in keys}, key=int)
    variants = sorted({key.split("@")[1] for key in keys})
    tasks = list(a[keys[0]]["tasks"])
    print(f"mean of {', '.join(arms_a)} ({work_a}) - mean of {', '.join(arms_b)} ({work_b}), seeds {seeds}:")
    for variant in variants:
        for budget in budgets:
            first, second = (cells(f, arms, budget, variant, seeds, tasks) for f, arms in ((a, arms_a), (b, arms_b)))
            mean, low, high = points(paired_difference(first, second))
            print(f"  {variant}, {budget} steps: {mean:+.1f} [{low:+.1f}, {high:+.1f}]")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2].split(","), Path(sys.argv[3]), sys.argv[4].split(","))
