"""The README's tables of the committed runs, made from their results.json (a test keeps them equal): per
`capvector reproduce` run and budget, each method's in-domain paired difference to (a) SFT from theta_pt; per
diagnostic study (docs/results/diagnostics), the comparisons that answer its question; per `capvector headroom`
regime and budget, each arm's difference to SFT trained from scratch; in success-rate points with 95% bootstrap
intervals over seeds.

  python docs/results/overview.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent
# The runs, newest first: their folder under docs/results/ and the stop that made it.
RUNS = {
    "full": "stop 38",
    "spatial-forcing": "stop 36",
    "control": "stop 34",
    "full-10-demos": "stop 31",
    "full-no-shift": "stop 26",
    "views-teacher": "stops 22-23",
    "views-long": "stops 22-23",
}
COLUMNS = {  # method -> header (the paper's rows, then the oracle and the control's)
    "aux": "(b) aux SFT",
    "meta_sft": "(c) theta_meta, no L_orth",
    "capvector": "(d) CapVector",
    "capvector_lora": "(e) CapVector, LoRA",
    "oracle": "(o) oracle",
    "control_aux": "(b') control's aux SFT",
    "control_capvector": "(d') control's CapVector",
}
TRANSFER = "(g) - (f): theta_ao against theta_ft as a start"
# The headroom regimes in the order they were run (docs/results/headroom/<folder>).
HEADROOM = [
    "wide",
    "scarce",
    "coarse",
    "scan",
    "views",
    "views-scan",
    "views-picked",
    "views-confirm",
    "views-confirm-teacher",
    "views-confirm-teacher-locate30",
    "views-confirm-shift",
    "views-confirm-shift-per-seed",
    "views-confirm-shift-more",
]
# The diagnostics (docs/results/diagnostics/<study>.json), newest first: the run whose models they studied, their
# question, and the comparisons that answer it: (what it is, the comparison's label in the study's results, the
# steps it is read at).
SHORT, LONG, BOTH = ("1000",), ("2000",), ("1000", "2000")  # the steps an answer is read at
RANDOM = "SFT from theta_pt + a random vector of gamma's size - (a) SFT"
DIAGNOSTICS = {
    "untrained_teachers": (
        "spatial-forcing",
        "is it the teachers' pretraining? (c) at alpha 1 from three untrained teachers' gammas",
        [("their mean", "(c) mean over the three untrained teachers - (a) SFT", BOTH)],
    ),
    "teacher_seeds": (
        "spatial-forcing",
        "is a 3D teacher's gamma what teachers hold, or which run it was? (c) at alpha 1 from five teachers' gammas",
        [("their mean", "(c) mean over the five teachers - (a) SFT", BOTH)],
    ),
    "alpha_one": (
        "spatial-forcing",
        "was it alpha? (c) at alpha 1 with the run's gamma",
        [("(c) at alpha 1", "(c) at alpha 1: SFT from theta_pt + gamma - (a) SFT", BOTH)],
    ),
    "random_direction": (
        "control",
        "is (c)'s lead gamma's direction, or any move of its size?",
        [
            ("theta_pt + a random direction of gamma's per-tensor norms", RANDOM, LONG),
            ("(c) against it", "(c) theta_pt + gamma - theta_pt + random: gamma's direction", LONG),
        ],
    ),
    "teacher_gamma": (
        "control",
        "does a 3D teacher's gamma (the headroom's teacher), extracted as the run's, carry anything?",
        [
            ("(c) with it", "(c) SFT from theta_pt + the teacher's gamma - (a) SFT", LONG),
            ("against an untrained teacher's gamma", "(c) the teacher's gamma - the untrained teacher's", LONG),
        ],
    ),
    "control_seeds": (
        "full-10-demos",
        "does (d')'s +12 hold on 5 more seeds?",
        [("(d') on seeds 5-9", "(d') - (a), seeds 5-9", SHORT), ("over all 10", "(d') - (a), seeds 0-9", SHORT)],
    ),
    "control_meta": (
        "full-10-demos",
        "how much of (d')'s lead is L_orth?",
        [
            ("(c')", "(c') SFT from the control's theta_meta - (a) SFT", SHORT),
            ("(d') - (c')", "(d') - (c'): what L_orth adds to the control's gamma", SHORT),
        ],
    ),
    "control_trunk": (
        "full-10-demos",
        "does the control help at a trunk layer?",
        [("chosen on validation placements, layer 2 at 0.3", "trunk 2, weight 0.3 - (a) SFT", SHORT)],
    ),
    "lora": (
        "full-10-demos",
        "where does (e) stand?",
        [
            ("LoRA SFT", "LoRA SFT from theta_pt - (a) SFT", SHORT),
            ("gamma under LoRA", "LoRA SFT from theta_meta - from theta_pt: what gamma adds", SHORT),
        ],
    ),
    "augment": (
        "full-no-shift",
        "does the teacher's gain survive shifted images?",
        [("(b) - (a), both shifted", "(b) - (a), both with shifted images", BOTH)],
    ),
    "base": (
        "full-no-shift",
        "does gamma help at alpha 1?",
        [("theta_pt + gamma", "theta_pt + gamma (alpha 1), SFT - (a) SFT", BOTH)],
    ),
}
ARMS = {"oracle": "oracle - SFT", "control": "control - SFT", "teacher": "3D teacher - SFT"}
OBJECTIVES = {"teacher": "3D teacher", "localization": "localization control"}


def interval(values: list[float]) -> str:
    """'+1.2 [-3.0, +5.0]', bold where the interval excludes 0."""
    mean, low, high = values
    text = f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"
    return f"**{text}**" if low > 0 or high < 0 else text


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(line) + " |" for line in [headers, *rows]]
    return "\n".join([lines[0], "|---" * len(headers) + "|", *lines[1:]])


def regime(results: dict) -> str:
    config = results["config"]
    shift = "shifted images" if config["policy"].get("augment_shift") else "no shift"
    alpha = results.get("alpha_selection") or {}
    chosen = f", alpha {alpha['alpha']:g}" if alpha.get("alpha") is not None else f", alpha {config['alpha']:g}"
    objective = OBJECTIVES.get(config["objective"], config["objective"])
    return f"{objective}, {config['downstream_episodes']} demos/task, {shift}{chosen}"


def table() -> str:
    rows = []
    for run, stop in RUNS.items():
        results = json.loads((RESULTS / run / "results.json").read_text())
        variant = results["config"]["variant"]
        versus, transfer = results["versus_sft"][variant], (results.get("transfer") or {}).get(variant, {})
        budgets = sorted({int(b) for method in versus.values() for b in method.get("difference", {})})
        for budget in budgets:
            cells = [
                interval(versus[method]["difference"][str(budget)]) if method in versus else "-" for method in COLUMNS
            ]
            cells.append(interval(transfer["difference"][str(budget)]) if transfer else "-")
            label = f"[`{run}`](docs/results/{run}/report.md) ({stop})"
            rows.append([label, regime(results), str(budget), *cells])
    return markdown(["run", "regime", "steps", *COLUMNS.values(), TRANSFER], rows)


def diagnostics_table() -> str:
    rows = []
    for study, (run, question, answers) in DIAGNOSTICS.items():
        results = json.loads((RESULTS / "diagnostics" / f"{study}.json").read_text())
        in_domain = next(v for v in results["variants"] if v not in ("validation", "new_env"))
        answer = "; ".join(
            f"{what}: "
            + ", ".join(
                f"{steps} steps {interval(results['differences'][label][in_domain][steps])}" for steps in budgets
            )
            for what, label, budgets in answers
        )
        rows.append([f"[`{study}`](docs/results/diagnostics/{study}.md)", run, question, answer])
    return markdown(["study", "run", "question", "answer (in-domain, against the run's (a) unless named)"], rows)


def headroom_regime(config: dict) -> str:
    look = "moving camera" if config.get("variant") == "random_view" else "fixed camera"
    shift = ", shifted images" if config["policy"].get("augment_shift") else ""
    tasks, demos, size = len(config["tasks"]), config["demos_per_task"], config["image_size"]
    return f"{tasks} tasks x {demos} demos, {size}x{size}, {look}{shift}, {len(config['seeds'])} seeds"


def headroom_table() -> str:
    rows = []
    for regime_name in HEADROOM:
        results = json.loads((RESULTS / "headroom" / regime_name / "results.json").read_text())
        decoy = results.get("decoy") or {}
        for budget, arms in results["budgets"].items():
            cells = [interval(arms[f"{arm}_minus_sft"]) if f"{arm}_minus_sft" in arms else "-" for arm in ARMS]
            drop = interval(decoy["drop"]) if decoy and str(decoy["steps"]) == budget else "-"
            label = f"[`{regime_name}`](docs/results/headroom/{regime_name}/report.md)"
            rows.append([label, headroom_regime(results["config"]), budget, *cells, drop])
    headers = ["regime", "setting", "steps", *ARMS.values(), "oracle's drop with a decoy's positions"]
    return markdown(headers, rows)


if __name__ == "__main__":
    print(table())
    print()
    print(diagnostics_table())
    print()
    print(headroom_table())
