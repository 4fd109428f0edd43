"""Would the full run's alpha change with each seed on validation placements of its own? (stop 32)

The committed full run chose alpha with both selection seeds on the same validation placements; since stop 32 the
select stage gives each seed placements of its own (reproduce.plan_select). This evaluates the run's own selection
models on the placements the stage now plans, through the stage's own plan and evaluation (reproduce.plan_select,
reproduce.evaluate_checkpoints), and compares the choice with the run's. If the chosen alpha is the same, every stage
after the selection would train and evaluate what the run did.

    PYTHONPATH=src .venv/bin/python docs/results/diagnostics/select_per_seed.py FULL_RUN_FOLDER WORK_FOLDER \
        docs/results/diagnostics

writes select_per_seed.json beside this script (evaluations kept in WORK_FOLDER).
"""

import sys
from pathlib import Path

import numpy as np

from capvector.bench.experiment.layout import RunLayout
from capvector.bench.experiment.protocol import PRESETS
from capvector.bench.experiment.reproduce import Run, evaluate_checkpoints, pipeline, plan_select
from capvector.files import write_json


def main(full: Path, work: Path, out: Path) -> None:
    layout = RunLayout(full.resolve())
    run = Run(PRESETS["full"], layout, "cpu")
    select = plan_select(run)
    plan = select["evaluation"]
    work.mkdir(parents=True, exist_ok=True)
    results = evaluate_checkpoints(run, plan, work / "validation_per_seed.json")
    means = {
        f"{alpha:g}": round(
            100
            * float(
                np.mean(
                    [
                        t["success_rate"]
                        for name, r in results.items()
                        if f"/alpha{alpha:g}/" in name
                        for t in r["tasks"].values()
                    ]
                )
            ),
            1,
        )
        for alpha in select["candidates"]
    }
    recorded = pipeline(layout).record("select")["outputs"]
    chosen = max(select["candidates"], key=lambda alpha: means[f"{alpha:g}"])  # do_select's rule
    summary = {
        "first_episodes": plan["first_episodes"],
        "placement_seed": plan["seed"],
        "per_seed": {"validation": means, "alpha": chosen},
        "run": {"validation": recorded["validation"], "alpha": recorded["alpha"]},
        "same_alpha": chosen == recorded["alpha"],
    }
    write_json(out / "select_per_seed.json", summary)
    print(summary)


if __name__ == "__main__":  # the evaluation's worker processes import this file
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
