"""The report of a `capvector reproduce` run: results.json (every number and the config), report.md and plots.

Everything in report.md is read from the results dictionary, including the "what this shows" section, whose
sentences are chosen by comparing the numbers (interval overlap, retention of gamma), never written in advance.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import open_checkpoint
from ..inspection import inspect
from ..vectors import open_vector
from .evaluation import wilson_interval
from .reproduce import METHODS, STAGES, VARIANTS, long_checkpoints, merged_path
from .tasks import resolve_tasks


# ---- the numbers --------------------------------------------------------------------------------------------------


def pooled(records: list[Mapping]) -> dict:
    """Success rate over all episodes of the given evaluations (tasks and seeds pooled), its interval and spread."""
    successes = sum(t["successes"] for r in records for t in r["tasks"].values())
    trials = sum(t["episodes"] for r in records for t in r["tasks"].values())
    low, high = wilson_interval(successes, trials)
    rates = [sum(t["successes"] for t in r["tasks"].values()) / max(1, sum(t["episodes"] for t in r["tasks"].values()))
             for r in records]
    return {"successes": successes, "trials": trials, "rate": successes / trials if trials else 0.0,
            "low": low, "high": high, "per_run": rates,
            "std_over_runs": statistics.pstdev(rates) if len(rates) > 1 else 0.0}


def gamma_retention(checkpoint: Path, pretrained: Path, gamma: Mapping[str, torch.Tensor]) -> float:
    """<theta - theta_pt, gamma> / |gamma|^2: how much of gamma the weights carry (alpha right after the merge)."""
    weights, base = open_checkpoint(checkpoint), open_checkpoint(pretrained)
    try:
        dot = norm = 0.0
        for name, g in gamma.items():
            g = g.double()
            dot += float(((weights[name].double() - base[name].double()) * g).sum())
            norm += float((g * g).sum())
        return dot / norm if norm else 0.0
    finally:
        weights.close()
        base.close()


def run_timing(folder: Path) -> dict:
    """ms per training step (median over logged intervals, the first dropped as warm-up), wall seconds, parts."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = lines[1:] or lines
    parts = sorted({k for line in steady for k in line if k.startswith("time/")})
    wall = json.loads((folder / "wall.json").read_text())
    return {"step_ms": statistics.median(1000 / line["steps_per_s"] for line in steady),
            "parts_ms": {k.removeprefix("time/").removesuffix("_ms"): statistics.median(line.get(k, 0.0) for line in steady)
                         for k in parts},
            "train_seconds": wall["seconds"], "steps": lines[-1]["step"]}


def build_results(run) -> dict:
    """Every number of the run, from its stage folders, as one JSON-able dictionary."""
    config = run.config
    evaluations = json.loads(run.path("evaluate", "results.json").read_text())
    seeds, budgets = config.seeds, config.budgets

    success = {method: {variant: {str(b): pooled([evaluations[f"downstream/{method}/seed{s}/step{b}@{variant}"]
                                                  for s in seeds]) for b in budgets}
                        for variant in VARIANTS} for method in config.methods}
    per_task = {method: {variant: {task: pooled([{"tasks": {task: evaluations[
        f"downstream/{method}/seed{s}/step{budgets[-1]}@{variant}"]["tasks"][task]}} for s in seeds])
        for task in resolve_tasks(config.downstream_tasks)} for variant in VARIANTS} for method in config.methods}
    threshold = {method: {variant: next((b for b in budgets if success[method][variant][str(b)]["rate"]
                                         >= config.success_threshold), None) for variant in VARIANTS}
                 for method in config.methods}
    timing = {method: [run_timing(run.path("downstream", method, f"seed{s}")) for s in seeds] for method in config.methods}
    timing = {method: {"step_ms": statistics.median(t["step_ms"] for t in runs),
                       "train_seconds": statistics.mean(t["train_seconds"] for t in runs),
                       "parts_ms": {part: statistics.median(t["parts_ms"].get(part, 0.0) for t in runs)
                                    for part in runs[0]["parts_ms"]},
                       "steps": runs[0]["steps"]} for method, runs in timing.items()}
    for name in ("pretrain", "extract/sft", "extract/aux"):
        timing[name] = run_timing(run.path(*name.split("/")))

    gamma = open_vector(run.path("vector", "gamma"))
    pretrained = run.path("pretrain", "policy")
    last = budgets[-1]
    retention = {method: [gamma_retention(run.path("downstream", method, f"seed{s}", "checkpoints", f"step_{last:07d}",
                                                   "policy"), pretrained, gamma) for s in seeds]
                 for method in config.methods}
    ablations = {"alpha": [], "lambda": [], "long": {}}
    for alpha in [config.alpha, *config.alphas]:
        prefix = f"downstream/capvector/seed{seeds[0]}/step{last}@" if alpha == config.alpha else f"ablations/alpha{alpha:g}/step{last}@"
        ablations["alpha"].append({"alpha": alpha, **{v: pooled([evaluations[prefix + v]]) for v in VARIANTS},
                                   "theta_meta_retention": gamma_retention(merged_path(run, alpha), pretrained, gamma)})
    for value in [config.orth_lambda, *config.lambdas]:
        prefix = f"downstream/capvector/seed{seeds[0]}/step{last}@" if value == config.orth_lambda else f"ablations/lambda{value:g}/step{last}@"
        ablations["lambda"].append({"lambda": value, **{v: pooled([evaluations[prefix + v]]) for v in VARIANTS}})
    for method in ("meta_sft", "capvector"):
        folder = run.path("ablations", f"long_{method}")
        ablations["long"][method] = [
            {"step": s, **{v: pooled([evaluations[f"ablations/long_{method}/step{s}@{v}"]]) for v in VARIANTS},
             "retention": gamma_retention(folder / "checkpoints" / f"step_{s:07d}" / "policy", pretrained, gamma)}
            for s in long_checkpoints(config)]

    vector = inspect(gamma, against=run.path("vector", "tau"), base=pretrained).to_dict()
    gamma.close()
    return {
        "preset": config.preset, "note": config.note, "config": dataclasses.asdict(config),
        "methods": {m: METHODS[m][0] for m in config.methods},
        "tasks": {split: resolve_tasks(getattr(config, f"{split}_tasks")) for split in ("pretrain", "extract", "downstream")},
        "success": success, "success_per_task": per_task, "steps_to_threshold": threshold, "timing": timing,
        "gamma": {"norm": vector["total"]["norm"], "relative_to_pretrained": vector["total"]["relative_to_base"],
                  "cosine_with_tau": vector["total"]["cosine"], "layers": vector["layers"]},
        "retention": {m: {"mean": statistics.mean(r), "per_seed": r} for m, r in retention.items()},
        "ablations": ablations,
        "stage_seconds": {name: run.record(name).get("seconds") for name in STAGES},
    }


# ---- the text -------------------------------------------------------------------------------------------------------


def fmt_cell(cell: Mapping) -> str:
    return f"{100 * cell['rate']:.0f}% [{100 * cell['low']:.0f}, {100 * cell['high']:.0f}]"


def overlap(a: Mapping, b: Mapping) -> bool:
    return a["low"] <= b["high"] and b["low"] <= a["high"]


def comparison(name_a: str, a: Mapping, name_b: str, b: Mapping) -> str:
    difference = 100 * (a["rate"] - b["rate"])
    if overlap(a, b):
        return (f"{name_a} {fmt_cell(a)} vs {name_b} {fmt_cell(b)}: a difference of {difference:+.0f} points, "
                f"within overlapping 95% intervals, so not distinguishable at {a['trials']} episodes each")
    better = name_a if difference > 0 else name_b
    return (f"{name_a} {fmt_cell(a)} vs {name_b} {fmt_cell(b)}: {better} is higher by {abs(difference):.0f} points "
            f"with non-overlapping 95% intervals")


def findings(results: Mapping) -> list[str]:
    """Sentences chosen by the numbers: what the run supports and what it cannot say."""
    success, config, methods = results["success"], results["config"], list(results["methods"])
    last = str(config["budgets"][-1])
    out = []
    all_rates = [c["rate"] for m in success.values() for v in m.values() for c in v.values()]
    if max(all_rates) == 0:
        out.append("No method solved any evaluation episode: at this size the policies did not learn the held-out "
                   "tasks, so this run cannot compare the methods; it only shows that every stage ran.")
    elif max(all_rates) < 0.1:
        out.append(f"The best success rate anywhere is {100 * max(all_rates):.0f}%: too close to zero for the "
                   "comparisons below to mean much.")
    for variant, label in (("default", "in-domain"), ("new_env", "in the new environment")):
        for other in ("sft", "aux", "meta_sft"):
            if "capvector" in success and other in success:
                out.append(f"At {last} steps {label}: " + comparison(
                    "CapVector (d)", success["capvector"][variant][last], f"{other} ({'abc'['sft aux meta_sft'.split().index(other)]})",
                    success[other][variant][last]) + ".")
    if "capvector" in success and "sft" in success:
        budgets = config["budgets"]
        first = [b for b in budgets if success["capvector"]["default"][str(b)]["rate"] > success["sft"]["default"][str(b)]["rate"]]
        out.append(f"CapVector's pooled in-domain success is above plain SFT's at {len(first)} of {len(budgets)} step "
                   f"budgets ({', '.join(map(str, first)) or 'none'}); steps to reach "
                   f"{100 * config['success_threshold']:.0f}%: CapVector "
                   f"{results['steps_to_threshold']['capvector']['default'] or 'not reached'}, SFT "
                   f"{results['steps_to_threshold']['sft']['default'] or 'not reached'}.")
    timing = results["timing"]
    if "aux" in timing and "sft" in timing:
        out.append(f"Cost per training step: the auxiliary method takes {timing['aux']['step_ms'] / timing['sft']['step_ms']:.2f}x "
                   f"plain SFT's time, CapVector {timing['capvector']['step_ms'] / timing['sft']['step_ms']:.2f}x "
                   "(medians over seeds on a shared machine: other processes add noise to single runs).")
    retention = results["retention"]
    if "meta_sft" in retention and "capvector" in retention:
        out.append(f"gamma retained after {last} steps (<theta - theta_pt, gamma> / |gamma|^2; alpha = "
                   f"{config['alpha']:g} right after the merge): {retention['meta_sft']['mean']:.3f} without L_orth, "
                   f"{retention['capvector']['mean']:.3f} with it, {retention['sft']['mean']:.3f} for SFT from theta_pt."
                   if "sft" in retention else "")
    long = results["ablations"]["long"]
    if long.get("meta_sft") and long.get("capvector"):
        a, b = long["meta_sft"][-1], long["capvector"][-1]
        out.append(f"Long run ({a['step']} steps): retention {a['retention']:.3f} without L_orth vs {b['retention']:.3f} "
                   f"with it; in-domain success " + comparison("with L_orth", b["default"], "without", a["default"]) + ".")
    gamma = results["gamma"]
    out.append(f"|gamma| is {gamma['relative_to_pretrained']:.3g} of |theta_pt| and its cosine with the task vector "
               f"tau = theta_ft - theta_pt is {gamma['cosine_with_tau']:.3f}"
               + (": gamma is largely along the task-fitting direction, so it may carry D_ext fitting rather than a "
                  "transferable capability." if abs(gamma["cosine_with_tau"]) > 0.3 else
                  ": gamma is mostly a direction of its own, not the task-fitting one."))
    out.append("Not shown here: whether these differences hold at the paper's scale (a large pretrained VLA, "
               "LIBERO/RoboTwin, tens of thousands of steps); alpha and lambda were fixed by the preset before any "
               "evaluation, and the sweeps below are reported, not used to pick them.")
    return [line for line in out if line]


def markdown(results: Mapping) -> str:
    config, success = results["config"], results["success"]
    budgets = [str(b) for b in config["budgets"]]
    variants = (("default", "in-domain"), ("new_env", "new environment (out-of-domain)"))
    lines = [f"# CapVector on the embedded Meta-World benchmark: preset `{results['preset']}`", "",
             f"> {results['note']}", "",
             f"Command: `capvector reproduce --preset {results['preset']}`. Downstream tasks: "
             f"{', '.join(results['tasks']['downstream'])}; D_ext: {', '.join(results['tasks']['extract'])}; "
             f"pretraining: {', '.join(results['tasks']['pretrain'])}. Seeds {config['seeds']}, "
             f"{config['eval_episodes']} evaluation episodes per task, checkpoint and seed on placements disjoint from "
             f"every demonstration; alpha = {config['alpha']:g}, lambda = {config['orth_lambda']:g}.", ""]
    for variant, label in variants:
        lines += [f"## Success rate, {label} (95% Wilson interval; seeds and tasks pooled)", "",
                  "| method | " + " | ".join(f"{b} steps" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for method, label_m in results["methods"].items():
            lines.append(f"| {label_m} | " + " | ".join(fmt_cell(success[method][variant][b]) for b in budgets) + " |")
        lines.append("")
    tasks = results["tasks"]["downstream"]
    lines += [f"## Success per task at {budgets[-1]} steps (seeds pooled; in-domain / new environment)", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for method, label_m in results["methods"].items():
        cells = results["success_per_task"][method]
        lines.append(f"| {label_m} | " + " | ".join(f"{100 * cells['default'][t]['rate']:.0f}% / "
                                                     f"{100 * cells['new_env'][t]['rate']:.0f}%" for t in tasks) + " |")
    lines += ["", "## Training cost", "", "| run | ms / step (median) | x SFT | total training time (s) | steps |",
              "|---|---|---|---|---|"]
    base = results["timing"].get("sft", {}).get("step_ms")
    for name, t in results["timing"].items():
        ratio = f"{t['step_ms'] / base:.2f}" if base and name in results["methods"] else "-"
        lines.append(f"| {results['methods'].get(name, name)} | {t['step_ms']:.1f} | {ratio} | "
                     f"{t['train_seconds']:.1f} | {t['steps']} |")
    threshold = 100 * config["success_threshold"]
    lines += ["", f"## Steps to reach {threshold:.0f}% success (pooled; budgets evaluated: {', '.join(budgets)})", "",
              "| method | in-domain | new environment |", "|---|---|---|"]
    for method, label_m in results["methods"].items():
        reached = results["steps_to_threshold"][method]
        lines.append(f"| {label_m} | {reached['default'] or 'not reached'} | {reached['new_env'] or 'not reached'} |")
    ablations = results["ablations"]
    lines += ["", f"## Ablation: alpha (CapVector, seed {config['seeds'][0]}, {budgets[-1]} steps)", "",
              "| alpha | in-domain | new environment | gamma in theta_meta |", "|---|---|---|---|"]
    for row in ablations["alpha"]:
        lines.append(f"| {row['alpha']:g} | {fmt_cell(row['default'])} | {fmt_cell(row['new_env'])} | "
                     f"{row['theta_meta_retention']:.3f} |")
    lines += ["", f"## Ablation: lambda (CapVector from theta_meta, seed {config['seeds'][0]}, {budgets[-1]} steps)", "",
              "| lambda | in-domain | new environment |", "|---|---|---|"]
    for row in ablations["lambda"]:
        lines.append(f"| {row['lambda']:g} | {fmt_cell(row['default'])} | {fmt_cell(row['new_env'])} |")
    lines += ["", "## Ablation: long run from theta_meta, with and without L_orth", "",
              "| method | step | in-domain | new environment | gamma retained |", "|---|---|---|---|---|"]
    for method, rows in ablations["long"].items():
        for row in rows:
            lines.append(f"| {results['methods'].get(method, method)} | {row['step']} | {fmt_cell(row['default'])} | "
                         f"{fmt_cell(row['new_env'])} | {row['retention']:.3f} |")
    gamma = results["gamma"]
    lines += ["", "## The capability vector", "",
              f"|gamma| = {gamma['norm']:.4g} ({gamma['relative_to_pretrained']:.3g} of |theta_pt|), cosine with tau "
              f"= {gamma['cosine_with_tau']:.3f}. Per layer: `gamma_layers.png`. gamma retained after "
              f"{budgets[-1]} steps (<theta - theta_pt, gamma> / |gamma|^2, mean over seeds): "
              + ", ".join(f"{m} {r['mean']:.3f}" for m, r in results["retention"].items()) + ".", "",
              "## What this shows and what it does not", ""]
    lines += [f"- {line}" for line in findings(results)]
    lines += ["", "Plots: `success_vs_steps.png`, `step_time.png`, `gamma_layers.png`. Every number is in "
              "`results.json`.", ""]
    return "\n".join(lines)


# ---- plots and files ------------------------------------------------------------------------------------------------


def plot_success(results: Mapping, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    budgets = results["config"]["budgets"]
    for ax, (variant, title) in zip(axes, (("default", "in-domain"), ("new_env", "new environment"))):
        for method, label in results["methods"].items():
            cells = [results["success"][method][variant][str(b)] for b in budgets]
            rates = [c["rate"] for c in cells]
            ax.errorbar(budgets, rates, yerr=[[r - c["low"] for r, c in zip(rates, cells)],
                                              [c["high"] - r for r, c in zip(rates, cells)]],
                        marker="o", capsize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("training steps")
    axes[0].set_ylabel("success rate (95% Wilson)")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_step_time(results: Mapping, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    figure, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(names)), [results["timing"][n]["step_ms"] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("ms per training step (median)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(run) -> Path:
    """results.json, report.md and the plots into the run's report folder; returns report.md's path."""
    folder = run.path("report")
    folder.mkdir(parents=True, exist_ok=True)
    results = build_results(run)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_success(results, folder / "success_vs_steps.png")
    plot_step_time(results, folder / "step_time.png")
    inspect(run.path("vector", "gamma"), against=run.path("vector", "tau"), base=run.path("pretrain", "policy")).plot(
        folder / "gamma_layers.png")
    (folder / "report.md").write_text(markdown(results))
    return folder / "report.md"
