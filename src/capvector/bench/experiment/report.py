"""The report of a `capvector reproduce` run: results.json (every number and the config), report.md and plots.

Everything in report.md is read from the results dictionary, including the "what this shows" section, whose
sentences are chosen by comparing the numbers (interval overlap, retention of gamma), never written in advance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from capvector.bench.experiment.carried import HELD_OUT_EVERY, MIN_EPISODES, carried, carried_share
from capvector.bench.experiment.carried import SPLITS as CARRIED_SPLITS
from capvector.bench.experiment.layout import GAMMA, PLOTS, RESULTS_FILE, RunLayout, metrics_file, wall_file
from capvector.bench.experiment.protocol import (
    CONTROL_EXTRACTION,
    DECOY,
    GAMMA_NO_HEAD,
    HEAD_ABLATION,
    LONG_METHODS,
    METHODS,
    NEW_ENV,
    OBJECTIVES,
    ORACLE,
    TRANSFER_METHODS,
    DownstreamRun,
    ReproduceConfig,
    ablation_seeds,
    alpha_candidates,
    alpha_folder,
    checkpoint_at,
    downstream_runs,
    evaluated_checkpoints,
    evaluated_variants,
    evaluation_key,
    evaluation_name,
    lambda_ablation,
    long_ablation,
    long_checkpoints,
    method_vector,
    regime_overrides,
    run_name,
    split_tasks,
)
from capvector.bench.statistics import (
    MIN_SEEDS,
    area_under_curve,
    bootstrap_mean,
    bootstrap_steps_to_reach,
    paired_difference,
    points,
    wilson_interval,
)
from capvector.bench.teacher.pretraining import describe_teacher
from capvector.files import write_json, write_text
from capvector.params.checkpoints import open_checkpoint
from capvector.params.inspection import InspectReport, inspect
from capvector.params.vectors import CapabilityVector, difference, open_vector

# ---- the numbers --------------------------------------------------------------------------------------------------


def pooled(records: list[Mapping]) -> dict:
    """Success rate over all episodes of the given evaluations (tasks and seeds pooled), its interval and spread."""
    successes = sum(t["successes"] for r in records for t in r["tasks"].values())
    trials = sum(t["episodes"] for r in records for t in r["tasks"].values())
    low, high = wilson_interval(successes, trials)
    rates = [
        sum(t["successes"] for t in r["tasks"].values()) / max(1, sum(t["episodes"] for t in r["tasks"].values()))
        for r in records
    ]
    return {
        "successes": successes,
        "trials": trials,
        "rate": successes / trials if trials else 0.0,
        "low": low,
        "high": high,
        "per_run": rates,
        "std_over_runs": statistics.pstdev(rates) if len(rates) > 1 else 0.0,
    }


class Evaluations:
    """evaluate/results.json (or another file of evaluations: `path`), looked up by training run folder, step and
    variant."""

    def __init__(self, layout: RunLayout, evaluated: tuple[str, ...], path: Path | None = None):
        self.layout, self.records = layout, json.loads((path or layout.evaluations).read_text())
        self.evaluated = evaluated  # the variants every checkpoint was evaluated in (protocol.evaluated_variants)

    def record(self, folder: Path, steps: int, variant: str, task: str | None = None) -> dict:
        record = self.records[evaluation_key(evaluation_name(self.layout, folder, steps), variant)]
        return record if task is None else {"tasks": {task: record["tasks"][task]}}

    def pooled(self, folders: list[Path], steps: int, variant: str, task: str | None = None) -> dict:
        return pooled([self.record(folder, steps, variant, task) for folder in folders])

    def cells(self, folders: list[Path], steps: int, variant: str, tasks: list[str]) -> np.ndarray:
        """(seeds, tasks) success rates: one row per training run (seed), one column per task."""
        rows = [self.record(folder, steps, variant)["tasks"] for folder in folders]
        return np.array([[row[t]["successes"] / row[t]["episodes"] for t in tasks] for row in rows])

    def variants(self, folder: Path, steps: int) -> dict[str, dict]:
        """One run's checkpoint in every variant."""
        return {v: self.pooled([folder], steps, v) for v in self.evaluated}


def along_gamma(checkpoint: str | Path, pretrained: Path, gamma: CapabilityVector, base: str | None = None) -> dict:
    """Where a checkpoint sits relative to gamma: retention <theta - theta_pt, gamma> / |gamma|^2 (alpha right after
    the merge, washed out toward 0) and distance |theta - theta_pt| / |gamma| (how large the moves are next to it)."""
    moved = difference(open_checkpoint(checkpoint, base=base), open_checkpoint(pretrained), roles=("run", "start"))
    try:
        products = moved.tensor_products(gamma).values()  # per tensor (|moved|^2, |gamma|^2, <moved, gamma>)
        moved_sq, gamma_sq, dot = (sum(p[i] for p in products) for i in range(3))
    finally:
        moved.close()
    return {
        "retention": dot / gamma_sq if gamma_sq else 0.0,
        "distance": (moved_sq / gamma_sq) ** 0.5 if gamma_sq else 0.0,
    }


def band(cells: np.ndarray) -> dict[str, float]:
    """Mean success over (seeds, tasks) and its 95% interval from a bootstrap over seeds (no width with one seed)."""
    mean, low, high = bootstrap_mean(cells)
    return {"mean": mean, "low": low, "high": high}


def metrics_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_file(folder).read_text().splitlines() if line.strip()]


def metric_curve(folders: list[Path], key: str, scale: float = 1.0) -> dict | None:
    """A metrics.jsonl value against steps, `scale` times its mean over the runs (seeds) at the steps they all
    logged; None when the runs do not log it."""
    runs = [{line["step"]: line[key] for line in metrics_lines(folder) if key in line} for folder in folders]
    steps = sorted(set.intersection(*(set(run) for run in runs)))
    if not steps:
        return None
    return {"steps": steps, "mean": [scale * statistics.mean(run[step] for run in runs) for step in steps]}


def retention_curve(layout: RunLayout, runs: list[DownstreamRun], gamma: CapabilityVector) -> dict:
    """along_gamma's retention at the start point and every checkpoint of each run (seed), and its mean."""
    steps = [0, *runs[0].checkpoints]

    def retention(run: DownstreamRun, step: int) -> float:
        path, base = checkpoint_at(layout, run, step)
        return along_gamma(path, layout.pretrained, gamma, base)["retention"]

    per_seed = [[retention(run, step) for step in steps] for run in runs]
    return {"steps": steps, "mean": np.mean(per_seed, axis=0).tolist(), "per_seed": per_seed}


@contextlib.contextmanager
def methods_vectors(config: ReproduceConfig, layout: RunLayout) -> Iterator[dict[str, CapabilityVector]]:
    """Each method's vector (protocol.method_vector), opened once: gamma, and the control's with (b') or (d')."""
    vectors = {name: open_vector(layout.vector(name)) for name in dict.fromkeys(map(method_vector, config.methods))}
    try:
        yield {method: vectors[method_vector(method)] for method in config.methods}
    finally:
        for vector in vectors.values():
            vector.close()


def training_curves(config: ReproduceConfig, layout: RunLayout) -> dict[str, dict]:
    """Per method, against training steps (means over seeds): the action loss (the term every method trains on),
    L_orth (as logged, divided by lambda; methods with the regularizer only) and the retention of its vector."""
    runs = {m: [r for r in downstream_runs(config, layout) if r.method == m] for m in config.methods}
    unweighted = 1 / config.orth_lambda if config.orth_lambda else 0.0  # with lambda 0 nothing logs L_orth
    with methods_vectors(config, layout) as vectors:
        return {
            m: {
                "action_loss": metric_curve([r.folder for r in rs], "loss/action"),
                "orth": metric_curve([r.folder for r in rs], "loss/orth", unweighted),
                "retention": retention_curve(layout, rs, vectors[m]),
            }
            for m, rs in runs.items()
        }


def run_timing(folder: Path) -> dict:
    """ms per training step (median over logged intervals, the first dropped as warm-up), wall seconds, parts."""
    lines = metrics_lines(folder)
    steady = lines[1:] or lines
    parts = sorted({k for line in steady for k in line if k.startswith("time/")})
    return {
        "step_ms": statistics.median(1000 / line["steps_per_s"] for line in steady),
        "parts_ms": {
            k.removeprefix("time/").removesuffix("_ms"): statistics.median(line.get(k, 0.0) for line in steady)
            for k in parts
        },
        "train_seconds": json.loads(wall_file(folder).read_text())["seconds"],
        "steps": lines[-1]["step"],
    }


def median_timing(runs: list[dict]) -> dict:
    return {
        "step_ms": statistics.median(t["step_ms"] for t in runs),
        "train_seconds": statistics.mean(t["train_seconds"] for t in runs),
        "steps": runs[0]["steps"],
        "parts_ms": {
            part: statistics.median(t["parts_ms"].get(part, 0.0) for t in runs) for part in runs[0]["parts_ms"]
        },
    }


def success_results(config: ReproduceConfig, layout: RunLayout, evaluations: Evaluations) -> dict[str, Any]:
    """Pooled success per method, variant and budget (with Wilson intervals over episodes, and a band from a
    bootstrap over seeds); per task at the largest budget; steps to the threshold."""
    budgets, last, variants = config.budgets, config.budgets[-1], evaluations.evaluated
    runs = {m: [layout.downstream(m, s) for s in config.seeds] for m in config.methods}
    success = {m: {v: {str(b): evaluations.pooled(runs[m], b, v) for b in budgets} for v in variants} for m in runs}
    tasks = split_tasks(config)["downstream"]
    curves = success_curves(config, runs, evaluations, tasks)
    bands = {m: {v: {str(b): band(curves[v][m][i]) for i, b in enumerate(budgets)} for v in variants} for m in runs}
    per_task = {m: {v: {t: evaluations.pooled(runs[m], last, v, t) for t in tasks} for v in variants} for m in runs}
    threshold = {
        m: {
            v: next((b for b in budgets if success[m][v][str(b)]["rate"] >= config.success_threshold), None)
            for v in variants
        }
        for m in runs
    }
    return {
        "success": success,
        "success_band": bands,
        "success_per_task": per_task,
        "steps_to_threshold": threshold,
        "versus_sft": versus_sft(config, curves),
        "transfer": transfer_ceiling(config, curves),
    }


def success_curves(
    config: ReproduceConfig, runs: dict[str, list[Path]], evaluations: Evaluations, tasks: list[str]
) -> dict[str, dict[str, np.ndarray]]:
    """variant -> method -> success per (budget, seed, task) on the same placements."""
    return {
        variant: {m: np.stack([evaluations.cells(runs[m], b, variant, tasks) for b in config.budgets]) for m in runs}
        for variant in evaluations.evaluated
    }


def paired_curves(curve: np.ndarray, baseline: np.ndarray, budgets: list[int]) -> dict[str, Any]:
    """A method's success against a baseline's, paired by (seed, task), in points with 95% seed-bootstrap intervals:
    the difference at each budget and in area under success-against-steps (mean success over the steps)."""
    out: dict[str, Any] = {
        "difference": {str(b): points(paired_difference(curve[i], baseline[i])) for i, b in enumerate(budgets)}
    }
    if len(budgets) > 1:
        out["auc_difference"] = points(
            paired_difference(area_under_curve(curve, budgets), area_under_curve(baseline, budgets))
        )
    return out


def versus_sft(config: ReproduceConfig, curves: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Every method against (a) SFT (paired_curves), and the steps it needs to reach SFT's final success
    ("converges faster")."""
    budgets = config.budgets
    out: dict[str, Any] = {}
    for variant, by_method in curves.items():
        if "sft" not in by_method:
            return {}
        sft = by_method["sft"]
        out[variant] = {
            method: {
                "steps_to_sft_final": [
                    None if math.isinf(v) else round(v) for v in bootstrap_steps_to_reach(curve, budgets, sft)
                ],
                **(paired_curves(curve, sft, budgets) if method != "sft" else {}),
            }
            for method, curve in by_method.items()
        }
    return out


def transfer_ceiling(config: ReproduceConfig, curves: Mapping[str, Mapping[str, np.ndarray]]) -> dict | None:
    """(g) SFT from theta_ao against (f) SFT from theta_ft (paired_curves) per variant; None without them."""
    ao, ft = TRANSFER_METHODS
    if ao not in config.methods:
        return None
    return {variant: paired_curves(by[ao], by[ft], config.budgets) for variant, by in curves.items()}


def timing_results(config: ReproduceConfig, layout: RunLayout) -> dict[str, dict]:
    """Step times of every downstream method (medians over seeds) and of the pretraining and extraction runs."""
    timing = {m: median_timing([run_timing(layout.downstream(m, s)) for s in config.seeds]) for m in config.methods}
    for folder in (layout.pretrain, *(layout.extract(strategy) for strategy in ("sft", "aux"))):
        timing[run_name(layout, folder)] = run_timing(folder)
    return timing


def ablation_row(evaluations: Evaluations, runs: list[Path], sft: list[Path], steps: int, tasks: list[str]) -> dict:
    """An ablation's runs (one per seed) after `steps`: pooled success in every variant, and the difference to SFT's
    runs of the same seeds, paired by (seed, task)."""
    cells = lambda folders, v: evaluations.cells(folders, steps, v, tasks)  # noqa: E731
    return {
        **{v: evaluations.pooled(runs, steps, v) for v in evaluations.evaluated},
        "versus_sft": {v: points(paired_difference(cells(runs, v), cells(sft, v))) for v in evaluations.evaluated},
    }


def gamma_results(config: ReproduceConfig, layout: RunLayout, evaluations: Evaluations) -> dict[str, Any]:
    """Where the runs end along gamma (the control's methods along the control's), and the ablations (alpha, lambda,
    the action head, long runs) with their success rates."""
    last, pretrained, seeds = config.budgets[-1], layout.pretrained, ablation_seeds(config)
    checkpoints, tasks = evaluated_checkpoints(config, layout), split_tasks(config)["downstream"]
    sft = [layout.downstream("sft", s) for s in seeds]
    with methods_vectors(config, layout) as vectors:
        gamma = vectors["sft"]  # the methods of the run's own objective are measured along gamma itself

        def shifted(folder: Path, steps: int, vector: CapabilityVector = gamma) -> dict:
            path, base = checkpoints[evaluation_name(layout, folder, steps)]
            return along_gamma(path, pretrained, vector, base)

        def row_of(runs: list[Path]) -> dict:
            """The ablation row of CapVector runs (one per ablation seed), compared with SFT on the same seeds."""
            return ablation_row(evaluations, runs, sft, last, tasks)

        def capvector(ablation: str | None) -> dict:
            """CapVector's runs on the ablation seeds: the main ones (None) or an ablation's."""
            return row_of(
                [layout.downstream("capvector", s) if ablation is None else layout.ablation(ablation, s) for s in seeds]
            )

        def retained(alpha: float, vector: str = GAMMA) -> dict:
            return {
                "theta_meta_retention": along_gamma(layout.theta_meta(alpha, vector), pretrained, gamma)["retention"]
            }

        shift = {m: [shifted(layout.downstream(m, s), last, vectors[m]) for s in config.seeds] for m in config.methods}
        main = capvector(None)  # the first row of every ablation table
        alphas = [
            {
                "alpha": alpha,
                **(main if alpha == config.alpha else row_of([alpha_folder(config, layout, alpha, s) for s in seeds])),
                **retained(alpha),
            }
            for alpha in alpha_candidates(config)
        ]
        lambdas = [
            {"lambda": value, **(main if value == config.orth_lambda else capvector(lambda_ablation(value)))}
            for value in [config.orth_lambda, *config.lambdas]
        ]
        head = (
            [
                {"vector": GAMMA, **main, "theta_meta_retention": alphas[0]["theta_meta_retention"]},
                {"vector": GAMMA_NO_HEAD, **capvector(HEAD_ABLATION), **retained(config.alpha, GAMMA_NO_HEAD)},
            ]
            if config.ablate_head
            else []
        )
        long = {
            m: [
                {"step": steps, **evaluations.variants(folder, steps), **shifted(folder, steps)}
                for folder in (layout.ablation(long_ablation(m), config.seeds[0]),)
                for steps in long_checkpoints(config)
            ]
            for m in LONG_METHODS
        }
    along = {
        m: {
            "retention": statistics.mean(r["retention"] for r in rows),
            "distance": statistics.mean(r["distance"] for r in rows),
            "per_seed": rows,
        }
        for m, rows in shift.items()
    }
    return {
        "along_gamma": along,
        "ablations": {"seeds": seeds, "alpha": alphas, "lambda": lambdas, "head": head, "long": long},
    }


def oracle_decoy(config: ReproduceConfig, layout: RunLayout, evaluations: Evaluations) -> dict[str, Any] | None:
    """The decoy test at the largest budget, in-domain: the oracle's success told its own positions and another
    placement's, and the drop, paired by (seed, task) (points, seed bootstrap); None without the oracle method."""
    if ORACLE not in config.methods:
        return None
    folders, last = [layout.downstream(ORACLE, s) for s in config.seeds], config.budgets[-1]
    tasks = split_tasks(config)["downstream"]
    real = evaluations.cells(folders, last, config.variant, tasks)
    decoy = evaluations.cells(folders, last, DECOY, tasks)
    return {
        "steps": last,
        "oracle": points(bootstrap_mean(real)),
        "decoy": points(bootstrap_mean(decoy)),
        "drop": points(paired_difference(real, decoy)),
    }


def carried_results(config: ReproduceConfig, layout: RunLayout) -> dict[str, Any]:
    """What gamma carries (capvector.bench.experiment.carried): the probe's R^2 per split and weights, and the part
    of theta_ao's gain that theta_meta shows at every alpha, per split."""
    r2 = carried(config, layout)
    alphas = alpha_candidates(config)
    share = {split: None if v is None else {f"{a:g}": carried_share(v, a) for a in alphas} for split, v in r2.items()}
    return {"r2": r2, "share": share}


# Which rows of the summary a run's auxiliary objective fills: the positive control's (either of the two) or the
# spatial objective's.
SUMMARY_PREFIX = {"privileged": "control", "localization": "control", "spatial": "spatial", "teacher": "spatial"}


def summary(
    config: ReproduceConfig,
    versus: Mapping,
    timing: Mapping,
    teacher: Mapping[str, Any] | None = None,
    transfer: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The headline figures, in the run's in-domain look at its last budget: (b) auxiliary SFT and (d) CapVector
    against (a) SFT, paired ([mean, low, high] in success-rate points, 95% seed-bootstrap interval), filled for this
    run's objective, and for the positive control from (b') and (d') when the run has one beside it, else null; the
    teacher's acceptance probe (the
    teacher objective's `teacher` record, else null); and the step-time ratios to SFT. The oracle's lead over (a)
    with the oracle method, else null (`capvector headroom` measures it from scratch). With the transfer ceiling's
    methods: (g) against (f), else null."""
    last = str(config.budgets[-1])
    rows = versus.get(config.variant, {})
    sft_ms = timing.get("sft", {}).get("step_ms")

    def minus_sft(method: str) -> list[float] | None:
        return rows.get(method, {}).get("difference", {}).get(last)

    def step_ratio(method: str) -> float | None:
        ms = timing.get(method, {}).get("step_ms")
        return round(ms / sft_ms, 3) if ms and sft_ms else None

    # each row's (b) and (d): the objective's own, and the control's beside it (when the objective is no control)
    filled = {SUMMARY_PREFIX[config.objective]: ("aux", "capvector")}
    if config.control is not None:
        filled.setdefault(SUMMARY_PREFIX[config.control], ("control_aux", "control_capvector"))
    return {
        "seeds": len(config.seeds),
        "budget": int(last),
        "variant": config.variant,
        "oracle_minus_sft": minus_sft(ORACLE),
        **{
            f"{prefix}_{row}_minus_sft": minus_sft(filled[prefix][i]) if prefix in filled else None
            for prefix in dict.fromkeys(SUMMARY_PREFIX.values())
            for i, row in enumerate(("aux", "capvector"))
        },
        "teacher_object_variance_explained": teacher["probe"]["share"] if teacher else None,
        "transfer_ao_minus_ft": transfer[config.variant]["difference"][last] if transfer else None,
        "step_time_vs_sft": {"aux": step_ratio("aux"), "capvector": step_ratio("capvector")},
    }


def build_results(
    config: ReproduceConfig,
    layout: RunLayout,
    vector: InspectReport,
    stage_seconds: Mapping[str, float | None],
    episode: Mapping[str, Any],
    selection: Mapping[str, Any] | None = None,
    teacher: Mapping[str, Any] | None = None,
) -> dict:
    """Every number of the run, from its stage folders, as one JSON-able dictionary; `episode`: what the
    side-by-side GIF shows (reproduce's side_by_side_episode); `selection`: how alpha was chosen (the select
    stage's outputs), None when the preset fixed it; `teacher`: the teacher stage's outputs (the teacher
    objective's), else None."""
    evaluations, inspected = Evaluations(layout, evaluated_variants(config)), vector.to_dict()
    total = inspected["total"]
    success, timing = success_results(config, layout, evaluations), timing_results(config, layout)
    return {
        "preset": config.preset,
        "command": " ".join(
            [
                "capvector reproduce --preset",
                config.preset,
                *(f"--{k} {v}" for k, v in regime_overrides(config).items()),
            ]
        ),
        "note": config.note,
        "config": dataclasses.asdict(config),
        "methods": {m: METHODS[m].label for m in config.methods},
        "tasks": split_tasks(config),
        "summary": summary(config, success["versus_sft"], timing, teacher, success["transfer"]),
        **success,
        "timing": timing,
        "gamma": {
            "norm": total["norm"],
            "relative_to_pretrained": total["relative_to_base"],
            "cosine_with_tau": total["cosine"],
            "layers": inspected["layers"],
        },
        **gamma_results(config, layout, evaluations),
        "carried": carried_results(config, layout),
        "oracle_decoy": oracle_decoy(config, layout, evaluations),
        "curves": training_curves(config, layout),
        "side_by_side": dict(episode),
        "stage_seconds": dict(stage_seconds),
        "alpha_selection": dict(selection) if selection else None,
        "teacher": dict(teacher) if teacher else None,
    }


# ---- the text -------------------------------------------------------------------------------------------------------


def fmt_cell(cell: Mapping) -> str:
    return f"{100 * cell['rate']:.0f}% [{100 * cell['low']:.0f}, {100 * cell['high']:.0f}]"


def overlap(a: Mapping, b: Mapping) -> bool:
    return a["low"] <= b["high"] and b["low"] <= a["high"]


def comparison(name_a: str, a: Mapping, name_b: str, b: Mapping) -> str:
    difference = 100 * (a["rate"] - b["rate"])
    if overlap(a, b):
        return (
            f"{name_a} {fmt_cell(a)} vs {name_b} {fmt_cell(b)}: a difference of {difference:+.0f} points, "
            f"within overlapping 95% intervals, so not distinguishable at {a['trials']} episodes each"
        )
    better = name_a if difference > 0 else name_b
    return (
        f"{name_a} {fmt_cell(a)} vs {name_b} {fmt_cell(b)}: {better} is higher by {abs(difference):.0f} points "
        f"with non-overlapping 95% intervals"
    )


def resolved(interval: list) -> bool:
    """Whether a [mean, low, high] difference's interval excludes 0."""
    return interval[1] > 0 or interval[2] < 0


def paired_comparisons(results: Mapping, variant: str) -> list[tuple[str, list]]:
    """Every paired difference the report gives in one variant, named: each method against (a) SFT and (g)
    against (f), at each budget and in area."""
    letter = {m: label.split(" ")[0] for m, label in results["methods"].items()}
    rows = {f"{letter[m]} vs (a)": row for m, row in results["versus_sft"].get(variant, {}).items() if m != "sft"}
    if results["transfer"]:
        ao, ft = TRANSFER_METHODS
        rows[f"{letter[ao]} vs {letter[ft]}"] = results["transfer"][variant]
    named = []
    for name, row in rows.items():
        named += [(f"{name} at {b} steps", v) for b, v in row["difference"].items()]
        if row.get("auc_difference"):
            named.append((f"{name} in area", row["auc_difference"]))
    return named


def resolved_line(results: Mapping, variant: str, where: str) -> str:
    """Which paired differences are significant at 95% in one variant, or why none can be."""
    seeds = len(results["config"]["seeds"])
    if seeds < MIN_SEEDS:
        return (
            f"Significance: none can be claimed with {seeds} seed(s); an interval from resampling seeds "
            f"never reaches past the best and worst seed, so below {MIN_SEEDS} seeds it covers well under 95% "
            "(every seed on one side of the truth happens too often): the intervals here describe the seeds, "
            "they do not test."
        )
    named = paired_comparisons(results, variant)
    hits = [f"{name} {triple(v)}" for name, v in named if resolved(v)]
    return (
        f"Significant {where} (paired by seed and task, 95% interval excluding 0): "
        + ("; ".join(hits) if hits else "none")
        + f"; {len(named) - len(hits)} of the {len(named)} paired differences are not resolved with {seeds} seeds."
    )


def headroom_line(results: Mapping, variant: str) -> str | None:
    """(o) the oracle against (a) SFT, or None without the oracle method: does knowing where things are help here?"""
    rows, seeds = results["versus_sft"][variant], len(results["config"]["seeds"])
    if ORACLE not in rows:
        return None
    difference = rows[ORACLE]["difference"]
    ahead = [budget for budget, v in difference.items() if resolved(v) and v[0] > 0]
    verdict = (
        f"With {seeds} seed(s) it cannot be resolved (the significance line above)"
        if seeds < MIN_SEEDS
        else f"Ahead at {', '.join(ahead)} steps: knowing where things are helps these tasks here, so a perception "
        "objective has something to add"
        if ahead
        else "Not ahead at any budget: knowing where things are does not measurably help these tasks from theta_pt "
        "here, so no perception objective can be expected to"
    )
    decoy = results.get("oracle_decoy")
    uses = (
        ""
        if decoy is None
        else f" Told another placement's positions (the decoy test, {decoy['steps']} steps) its success goes from "
        f"{decoy['oracle'][0]:g}% to {decoy['decoy'][0]:g}%, a drop of {triple(decoy['drop'])} points: "
        + (
            "it uses the positions."
            if resolved(decoy["drop"]) and decoy["drop"][0] > 0
            else "not resolved, so it may find the objects from the images as well as it is told them."
        )
    )
    return (
        "Headroom, (o) the oracle told the object and goal positions against (a) SFT (points, 95% bootstrap over "
        "seeds): "
        + "; ".join(f"{budget} steps {triple(v)}" for budget, v in difference.items())
        + f". {verdict}."
        + uses
    )


def findings(results: Mapping) -> list[str]:
    """Sentences chosen by the numbers: what this run supports and what it cannot say."""
    config, success, timing = results["config"], results["success"], results["timing"]
    last, labels, home = str(config["budgets"][-1]), results["methods"], config["variant"]
    out = [resolved_line(results, home, "in-domain")]
    if len(config["seeds"]) >= MIN_SEEDS:
        out.append(resolved_line(results, NEW_ENV, "in the new environment"))
    headroom = headroom_line(results, home)
    if headroom:
        out.append(headroom)
    best = max(c["rate"] for m in success.values() for v in m.values() for c in v.values())
    if best == 0:
        out.append(
            "No method solved any evaluation episode: the policies did not learn the held-out tasks at this "
            "size, so the run cannot rank the methods; it shows only that every stage ran."
        )
    elif best < 0.1:
        out.append(
            f"The best success rate anywhere is {100 * best:.0f}%: too close to zero for the comparisons below "
            "to mean much."
        )
    for variant, where in ((home, "in-domain"), (NEW_ENV, "in the new environment")):
        for other in ("sft", "aux", "meta_sft"):
            out.append(
                f"At {last} steps {where}: "
                + comparison(
                    "CapVector (d)",
                    success["capvector"][variant][last],
                    labels[other].split(" ")[0] + " " + other,
                    success[other][variant][last],
                )
                + "."
            )
    ahead = [
        b
        for b in config["budgets"]
        if success["capvector"][home][str(b)]["rate"] > success["sft"][home][str(b)]["rate"]
    ]
    reached = results["steps_to_threshold"]
    steps_to = {m: reached[m][home] or "not reached" for m in ("capvector", "sft", "aux")}
    out.append(
        f"In-domain, CapVector's pooled success is above plain SFT's at {len(ahead)} of "
        f"{len(config['budgets'])} step budgets ({', '.join(map(str, ahead)) or 'none'}); steps to reach "
        f"{100 * config['success_threshold']:.0f}%: CapVector {steps_to['capvector']}, SFT {steps_to['sft']}, "
        f"auxiliary SFT {steps_to['aux']}."
    )
    ratio = lambda a, b: timing[a]["step_ms"] / timing[b]["step_ms"]  # noqa: E731
    out.append(
        f"Cost per training step: auxiliary SFT {ratio('aux', 'sft'):.2f}x plain SFT downstream and "
        f"{ratio('extract/aux', 'extract/sft'):.2f}x in the extraction runs (same data and steps); CapVector "
        f"{ratio('capvector', 'sft'):.2f}x, and {ratio('capvector', 'meta_sft'):.2f}x (c), whose steps are "
        "CapVector's but for L_orth: what the regularizer costs. Medians of logged intervals on a shared machine: "
        "other processes (and on a CPU the runs trained beside each one) add noise, so differences of a few percent "
        "are not meaningful."
    )
    shift = results["along_gamma"]
    out.append(
        f"gamma retained after {last} steps (<theta - theta_pt, gamma> / |gamma|^2, {config['alpha']:g} right "
        f"after the merge): {shift['meta_sft']['retention']:.3f} without L_orth, "
        f"{shift['capvector']['retention']:.3f} with it, {shift['sft']['retention']:.3f} for SFT from theta_pt. "
        f"The downstream runs moved the weights {shift['sft']['distance']:.1f} |gamma| from theta_pt (SFT), so "
        + (
            "gamma is small next to a finetuning update here."
            if shift["sft"]["distance"] > 3 * config["alpha"]
            else "gamma is of the size of a finetuning update here."
        )
    )
    long = results["ablations"]["long"]
    without, with_ = long["meta_sft"][-1], long["capvector"][-1]
    out.append(
        f"Long run ({without['step']} steps): retention {without['retention']:.3f} without L_orth and "
        f"{with_['retention']:.3f} with it"
        + (
            " (L_orth kept gamma, plain SFT washed part of it out)"
            if with_["retention"] - without["retention"] > 0.05
            else ""
        )
        + "; in-domain success "
        + comparison("with L_orth", with_[home], "without", without[home])
        + "."
    )
    ablations = results["ablations"]
    rows = [(f"alpha {r['alpha']:g}", r) for r in ablations["alpha"]]
    rows += [(f"lambda {r['lambda']:g}", r) for r in ablations["lambda"][1:]]
    rows += [("gamma without the action head", r) for r in ablations["head"][1:]]
    few = len(ablations["seeds"]) < MIN_SEEDS  # an interval then describes the seeds, it does not test
    out.append(
        f"Ablations, CapVector against SFT on the same {len(ablations['seeds'])} seed(s) at {last} steps in-domain "
        + ("(points; too few seeds for a 95% interval): " if few else "(points, 95% bootstrap over seeds): ")
        + "; ".join(
            f"{name} {r['versus_sft'][home][0]:+g}" if few else f"{name} {triple(r['versus_sft'][home])}"
            for name, r in rows
        )
        + "."
    )
    r2, shares = results["carried"]["r2"]["downstream"], results["carried"]["share"]["downstream"]
    if r2 is not None:
        ao, ft, pt = r2["theta_ao"], r2["theta_ft"], r2["theta_pt"]
        kept = "; ".join(
            f"alpha {alpha} R^2 {r2[f'theta_meta alpha {alpha}']:.3f}" + ("" if v is None else f", {v:.2f} of it")
            for alpha, v in shares.items()
        )
        out.append(
            "What gamma carries, on the held-out tasks' frames (R^2 of object and goal positions from the visual "
            f"tokens, held-out placements): theta_ao {ao:.3f} against theta_ft {ft:.3f}, "
            + ("a gain the auxiliary objective gave" if ao > ft else "no gain to carry")
            + f"; theta_pt {pt:.3f}, theta_meta at {kept}."
        )
    if results["transfer"]:
        ceiling = results["transfer"][home]["difference"]
        ahead = [b for b, v in ceiling.items() if resolved(v)]
        out.append(
            "Transfer ceiling in-domain, (g) SFT from theta_ao against (f) SFT from theta_ft (points, 95% bootstrap "
            "over seeds): "
            + "; ".join(f"{b} steps {triple(v)}" for b, v in ceiling.items())
            + (
                f". {len(config['seeds'])} seeds are too few to resolve it (the significance line above)."
                if len(config["seeds"]) < MIN_SEEDS
                else f". Resolved at {', '.join(ahead)} steps."
                if ahead
                else ". Not resolved at any budget: carried whole, what the auxiliary objective taught on D_ext does "
                "not measurably help the held-out tasks, so no capability vector extracted from these runs can be "
                "expected to."
            )
        )
    gamma = results["gamma"]
    out.append(
        f"|gamma| is {gamma['relative_to_pretrained']:.3g} of |theta_pt|; its cosine with the task vector "
        f"tau = theta_ft - theta_pt is {gamma['cosine_with_tau']:.3f}"
        + (
            ": gamma lies largely along the task-fitting direction, so it may carry more D_ext fitting rather "
            "than a transferable capability."
            if gamma["cosine_with_tau"] > 0.3
            else ": gamma points partly against the task-fitting direction (the auxiliary run fitted D_ext's actions "
            "less), so adding it also undoes part of a finetuning update."
            if gamma["cosine_with_tau"] < -0.3
            else ", so gamma is mostly a direction of its own rather than more (or less) of the task fitting."
        )
    )
    out.append(
        "Not shown: whether any of this holds at the paper's scale (a large pretrained VLA, LIBERO/RoboTwin, "
        "tens of thousands of steps). "
        + (
            "alpha was chosen on validation placements (above); lambda was fixed by the preset, and its sweep is "
            "reported, not used to choose it."
            if results["alpha_selection"]
            else "alpha and lambda were fixed by the preset before any evaluation; the sweeps are reported, not used "
            "to choose them."
        )
    )
    return out


def pictures(results: Mapping) -> list[str]:
    """The plots and the side-by-side GIF, each under a line that says what it shows."""
    seeds, episode = len(results["config"]["seeds"]), results["side_by_side"]
    outcomes = "; ".join(o["label"] for o in episode["methods"].values())
    return [
        f"Success rate against training steps: mean over seeds and tasks, the band a 95% bootstrap interval over the "
        f"{seeds} seed{'s' if seeds > 1 else ''}" + (" (one seed: no band)" if seeds == 1 else "") + ".",
        "",
        f"![success against steps]({PLOTS['success']})",
        "",
        "Training, means over seeds: the action loss (every method's task term), L_orth as the regularizer "
        "computes it (without lambda; with LoRA its O-LoRA form), and gamma retained, "
        "<theta - theta_pt, gamma> / |gamma|^2 at every checkpoint (alpha right after the merge).",
        "",
        f"![training against steps]({PLOTS['training']})",
        "",
        f"Every method's seed-{episode['seed']} policy after {episode['steps']} steps on the same placement "
        f"({episode['task']}, placement seed {episode['placement_seed']}, in-domain: the first evaluation episode "
        f"of the tables), in real time; a finished episode holds its last frame: {outcomes}.",
        "",
        f"![methods side by side]({PLOTS['side_by_side']})",
        "",
    ]


def triple(value: list | None) -> str:
    """A [mean, low, high] of results.json ("-" when absent; a None bound: never)."""
    if value is None:
        return "-"
    mean, low, high = ("never" if v is None else v for v in value)
    return f"{mean} [{low}, {high}]"


def versus_sft_lines(results: Mapping, variant: str, budgets: list[str]) -> list[str]:
    """The paired comparison with SFT as a table (empty when the run has no SFT arm)."""
    rows = results.get("versus_sft", {}).get(variant)
    if not rows:
        return []
    lines = [
        "",
        "Against (a) SFT, paired by (seed, task); points, 95% bootstrap over seeds. Area: mean success over the steps; "
        "steps to SFT's final success: when the method's mean first reaches it (interpolated; never: not within the "
        "budgets).",
        "",
        "| method | " + " | ".join(f"{b} steps" for b in budgets) + " | area | steps to SFT's final success |",
        "|---|" + "---|" * (len(budgets) + 2),
    ]
    for method, label in results["methods"].items():
        row = rows[method]
        differences = [triple(row["difference"][b]) if "difference" in row else "-" for b in budgets]
        lines.append(
            f"| {label} | {' | '.join(differences)} | {triple(row.get('auc_difference'))} | "
            f"{triple(row['steps_to_sft_final'])} |"
        )
    return lines


def transfer_lines(results: Mapping, variants: tuple[tuple[str, str], ...], budgets: list[str]) -> list[str]:
    """The transfer ceiling, (g) against (f), as a table (empty without those methods)."""
    transfer = results["transfer"]
    if not transfer:
        return []
    lines = [
        "",
        "## Transfer ceiling: what the auxiliary objective taught on D_ext, carried whole",
        "",
        "(g) SFT from theta_ao against (f) SFT from theta_ft, paired by (seed, task); points, 95% bootstrap over "
        "seeds. The two starts differ only by the auxiliary objective's share of extraction: if (g) is no better, "
        "no vector extracted from them can carry a gain to these tasks.",
        "",
        "| variant | " + " | ".join(f"{b} steps" for b in budgets) + " | area |",
        "|---|" + "---|" * (len(budgets) + 1),
    ]
    for variant, label in variants:
        row = transfer[variant]
        lines.append(
            f"| {label} | "
            + " | ".join(triple(row["difference"][b]) for b in budgets)
            + f" | {triple(row.get('auc_difference'))} |"
        )
    return lines


def carried_lines(carried: Mapping) -> list[str]:
    """The probe of what gamma carries (capvector.bench.experiment.carried) as a table."""
    splits = [split for split in CARRIED_SPLITS if carried["r2"][split] is not None]
    if not splits:
        return ["", f"What gamma carries: not probed (fewer than {MIN_EPISODES} demonstrations per split)."]
    names = {"extract": "D_ext (extraction tasks)", "downstream": "held-out tasks"}
    lines = [
        "",
        "What gamma carries: held-out R^2 of the object's and goal's positions (less their task's mean) from the "
        "image-only visual tokens, a ridge regression fitted on the frames of most demonstrations of a split and "
        f"scored on every {HELD_OUT_EVERY}th (other placements); carried: theta_meta's gain over theta_pt as a part "
        "of theta_ao's over theta_ft.",
        "",
        "| weights | " + " | ".join(names[split] for split in splits) + " |",
        "|---|" + "---|" * len(splits),
    ]
    for name in carried["r2"][splits[0]]:
        lines.append(f"| {name} | " + " | ".join(f"{carried['r2'][split][name]:.3f}" for split in splits) + " |")
    for alpha in carried["share"][splits[0]]:
        shares = [carried["share"][split][alpha] for split in splits]
        lines.append(
            f"| carried at alpha {alpha} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in shares) + " |"
        )
    return lines


def markdown(results: Mapping) -> str:
    config, success = results["config"], results["success"]
    budgets, home = [str(b) for b in config["budgets"]], config["variant"]
    variants = ((home, "in-domain"), (NEW_ENV, "new environment (out-of-domain)"))
    lines = [
        f"# CapVector on the embedded Meta-World benchmark: preset `{results['preset']}`",
        "",
        f"> {results['note']}",
        "",
        f"Auxiliary objective (extraction's aux run and method (b)): `{config['objective']}` "
        f"({OBJECTIVES[config['objective']].recipe}); placement ranges `{config['placement']}` (demonstrations and "
        f"evaluation); in-domain scene look `{home}` (demonstrations and the in-domain evaluation), out-of-domain "
        f"`{NEW_ENV}`."
        + (
            f" The positive control beside it (extraction's {CONTROL_EXTRACTION} run, its gamma, methods (b') and "
            f"(d')): `{config['control']}` at weight {config['control_weight']:g}."
            if config.get("control")
            else ""
        )
        + (f" {describe_teacher(results['teacher'])}" if results["teacher"] else ""),
        "",
        f"Command: `{results['command']}`. Downstream tasks: "
        f"{', '.join(results['tasks']['downstream'])}; D_ext: {', '.join(results['tasks']['extract'])}; "
        f"pretraining: {', '.join(results['tasks']['pretrain'])}. Seeds {config['seeds']}, "
        f"{config['eval_episodes']} evaluation episodes per task, checkpoint and seed on placements disjoint from "
        "every demonstration, each seed on placements of its own and every method of a seed on the same ones "
        "(so that the intervals over seeds cover the placements too); "
        f"alpha = {config['alpha']:g}, lambda = {config['orth_lambda']:g}.",
        "",
        *pictures(results),
    ]
    for variant, label in variants:
        lines += [
            f"## Success rate, {label} (95% Wilson interval; seeds and tasks pooled)",
            "",
            "| method | " + " | ".join(f"{b} steps" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for method, label_m in results["methods"].items():
            lines.append(f"| {label_m} | " + " | ".join(fmt_cell(success[method][variant][b]) for b in budgets) + " |")
        lines += versus_sft_lines(results, variant, budgets)
        lines.append("")
    tasks = results["tasks"]["downstream"]
    lines += [
        f"## Success per task at {budgets[-1]} steps (seeds pooled; in-domain / new environment)",
        "",
        "| method | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for method, label_m in results["methods"].items():
        cells = results["success_per_task"][method]
        lines.append(
            f"| {label_m} | "
            + " | ".join(f"{100 * cells[home][t]['rate']:.0f}% / {100 * cells[NEW_ENV][t]['rate']:.0f}%" for t in tasks)
            + " |"
        )
    lines += transfer_lines(results, variants, budgets)
    lines += [
        "",
        "## Training cost",
        "",
        "| run | ms / step (median) | x SFT | total training time (s) | steps |",
        "|---|---|---|---|---|",
    ]
    base = results["timing"].get("sft", {}).get("step_ms")
    for name, t in results["timing"].items():
        ratio = f"{t['step_ms'] / base:.2f}" if base and name in results["methods"] else "-"
        lines.append(
            f"| {results['methods'].get(name, name)} | {t['step_ms']:.1f} | {ratio} | "
            f"{t['train_seconds']:.1f} | {t['steps']} |"
        )
    threshold = 100 * config["success_threshold"]
    lines += [
        "",
        f"## Steps to reach {threshold:.0f}% success (pooled; budgets evaluated: {', '.join(budgets)})",
        "",
        "| method | in-domain | new environment |",
        "|---|---|---|",
    ]
    for method, label_m in results["methods"].items():
        reached = results["steps_to_threshold"][method]
        lines.append(f"| {label_m} | {reached[home] or 'not reached'} | {reached[NEW_ENV] or 'not reached'} |")
    ablations = results["ablations"]
    seeds = ", ".join(map(str, ablations["seeds"]))
    where = (
        f"CapVector, seeds {seeds}, {budgets[-1]} steps; success pooled over seeds and tasks (95% Wilson interval), "
        "vs SFT: against (a) SFT on the same seeds, paired by (seed, task), points, 95% bootstrap over seeds"
    )
    header = "| in-domain | vs SFT | new environment | vs SFT |"

    def ablation_cells(row: Mapping) -> str:
        return " | ".join(f"{fmt_cell(row[v])} | {triple(row['versus_sft'][v])}" for v in (home, NEW_ENV))

    selection = results["alpha_selection"]
    lines += ["", f"## Ablation: alpha ({where})", ""]
    if selection:
        candidates = ", ".join(f"{a}: {m}%" for a, m in selection["validation"].items())
        lines += [
            f"alpha {selection['alpha']:g} was chosen before the other methods were trained: CapVector at every "
            f"candidate on seeds {', '.join(map(str, selection['seeds']))}, in-domain mean success on the validation "
            f"placements (placement seed {selection['placement_seed']}, not the test's): {candidates}. Below, the "
            "same runs on the test placements.",
            "",
        ]
    lines += [f"| alpha {header} gamma in theta_meta |", "|---" * 6 + "|"]
    lines += [f"| {r['alpha']:g} | {ablation_cells(r)} | {r['theta_meta_retention']:.3f} |" for r in ablations["alpha"]]
    lines += ["", f"## Ablation: lambda ({where})", "", f"| lambda {header}", "|---" * 5 + "|"]
    lines += [f"| {r['lambda']:g} | {ablation_cells(r)} |" for r in ablations["lambda"]]
    if ablations["head"]:
        lines += [
            "",
            f"## Ablation: gamma without the action head ({where}; gamma in theta_meta: retention along all of gamma)",
            "",
            f"| merged {header} gamma in theta_meta |",
            "|---" * 6 + "|",
        ]
        lines += [
            f"| {r['vector']} | {ablation_cells(r)} | {r['theta_meta_retention']:.3f} |" for r in ablations["head"]
        ]
    lines += [
        "",
        "## Ablation: long run from theta_meta, with and without L_orth",
        "",
        "| method | step | in-domain | new environment | gamma retained |",
        "|---|---|---|---|---|",
    ]
    for method, rows in ablations["long"].items():
        for row in rows:
            lines.append(
                f"| {results['methods'][method]} | {row['step']} | {fmt_cell(row[home])} | "
                f"{fmt_cell(row[NEW_ENV])} | {row['retention']:.3f} |"
            )
    gamma = results["gamma"]
    lines += [
        "",
        "## The capability vector",
        "",
        f"|gamma| = {gamma['norm']:.4g} ({gamma['relative_to_pretrained']:.3g} of |theta_pt|), cosine with "
        f"tau = {gamma['cosine_with_tau']:.3f}; per layer in `{PLOTS['gamma']}`. Where the downstream runs end "
        f"after {budgets[-1]} steps (means over seeds"
        + ("; the control's (b') and (d') along the control's gamma" if results["config"].get("control") else "")
        + "):",
        "",
        "| method | gamma retained: <theta - theta_pt, gamma> / abs(gamma)^2 | abs(theta - theta_pt) / abs(gamma) |",
        "|---|---|---|",
    ]
    for method, shift in results["along_gamma"].items():
        lines.append(f"| {results['methods'][method]} | {shift['retention']:.3f} | {shift['distance']:.2f} |")
    lines += carried_lines(results["carried"])
    lines += ["", "## What this shows and what it does not", ""]
    lines += [f"- {line}" for line in findings(results)]
    lines += [
        "",
        f"Plots: {', '.join(f'`{name}`' for name in PLOTS.values())}. Every number is in `{RESULTS_FILE}`.",
        "",
    ]
    return "\n".join(lines)


# ---- plots and files ------------------------------------------------------------------------------------------------


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot().close(figure)


def plot_success(results: Mapping, path: Path) -> None:
    """Success against steps per method: the mean over seeds and tasks, its seed-bootstrap interval as a band."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    budgets, home = results["config"]["budgets"], results["config"]["variant"]
    for ax, (variant, title) in zip(axes, ((home, f"in-domain ({home})"), (NEW_ENV, "new environment"))):
        for i, (method, label) in enumerate(results["methods"].items()):
            cells = [results["success_band"][method][variant][str(b)] for b in budgets]
            ax.plot(budgets, [c["mean"] for c in cells], marker="o", color=f"C{i}", label=label)
            ax.fill_between(budgets, [c["low"] for c in cells], [c["high"] for c in cells], color=f"C{i}", alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("training steps")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("success rate (band: 95% bootstrap over seeds)")
    axes[0].legend(fontsize=7)
    save_figure(figure, path)


def plot_training(results: Mapping, path: Path) -> None:
    """Action loss, L_orth and gamma retained against steps, one line per method (means over seeds)."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    titles = ("action loss (L1)", "L_orth (without lambda)", "gamma retained")
    for ax, key, title in zip(axes, ("action_loss", "orth", "retention"), titles):
        for i, (method, label) in enumerate(results["methods"].items()):
            curve = results["curves"][method][key]
            if curve is not None:
                ax.plot(
                    curve["steps"],
                    curve["mean"],
                    marker="." if key == "retention" else None,
                    color=f"C{i}",
                    label=label,
                )
        ax.set_title(title)
        ax.set_xlabel("training steps")
    axes[0].set_yscale("log")
    axes[2].axhline(results["config"]["alpha"], color="grey", linestyle=":", linewidth=1)  # right after the merge
    axes[2].set_ylabel("<theta - theta_pt, gamma> / |gamma|^2")
    axes[0].legend(fontsize=7)
    save_figure(figure, path)


def plot_step_time(results: Mapping, path: Path) -> None:
    plt = pyplot()
    names = list(results["methods"])
    figure, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(names)), [results["timing"][n]["step_ms"] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("ms per training step (median)")
    save_figure(figure, path)


def write_report(
    config: ReproduceConfig,
    layout: RunLayout,
    stage_seconds: Mapping[str, float | None],
    episode: Mapping[str, Any],
    selection: Mapping[str, Any] | None = None,
    teacher: Mapping[str, Any] | None = None,
) -> Path:
    """results.json, report.md and the plots into the run's report folder (where `episode`'s GIF already is);
    returns report.md's path. `selection`, `teacher`: as build_results."""
    layout.report.mkdir(parents=True, exist_ok=True)
    vector = inspect(layout.gamma, against=layout.tau, base=layout.pretrained)
    results = build_results(config, layout, vector, stage_seconds, episode, selection, teacher)
    write_json(layout.report_results, results)
    plot_success(results, layout.plot("success"))
    plot_training(results, layout.plot("training"))
    plot_step_time(results, layout.plot("step_time"))
    vector.plot(layout.plot("gamma"))
    write_text(layout.report_file, markdown(results))
    return layout.report_file
