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

from capvector.bench.experiment.layout import RunLayout
from capvector.bench.experiment.protocol import PRESETS, selection_runs
from capvector.bench.experiment.reproduce import Run, candidate_means, evaluate_checkpoints, pipeline, plan_select
from capvector.files import write_json


def main(full: Path, work: Path, out: Path) -> None:
    layout = RunLayout(full.resolve())
    run = Run(PRESETS["full"], layout, "cpu")
    select = plan_select(run)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "validation_per_seed.json"
    evaluate_checkpoints(run, select["evaluation"], path)
    means = candidate_means(layout, selection_runs(run.config, layout), select, path)
    chosen = max(select["candidates"], key=lambda alpha: means[alpha])  # do_select's rule
    recorded = pipeline(layout).record("select")["outputs"]
    summary = {
        "first_episodes": select["evaluation"]["first_episodes"],
        "placement_seed": select["evaluation"]["seed"],
        "per_seed": {"validation": {f"{a:g}": round(100 * m, 1) for a, m in means.items()}, "alpha": chosen},
        "run": {"validation": recorded["validation"], "alpha": recorded["alpha"]},
        "same_alpha": chosen == recorded["alpha"],
    }
    write_json(out / "select_per_seed.json", summary)
    print(summary)


if __name__ == "__main__":  # the evaluation's worker processes import this file
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
