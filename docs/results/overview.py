"""The README's tables of the committed runs, made from their results.json (a test keeps them equal): per
`capvector reproduce` run and budget, each method's in-domain paired difference to (a) SFT from theta_pt; per
`capvector headroom` regime and budget, each arm's difference to SFT trained from scratch; in success-rate points
with 95% bootstrap intervals over seeds.

  python docs/results/overview.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent
# The runs, newest first: their folder under docs/results/ and the stop that made it.
RUNS = {
    "spatial-forcing": "stop 36",
    "control": "stop 34",
    "full": "stop 31",
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
    print(headroom_table())
