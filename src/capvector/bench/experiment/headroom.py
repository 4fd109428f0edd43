"""Headroom: does knowing where things are help in this regime? Measured before any perception objective is built.

    capvector headroom --regime wide          # runs/headroom/wide/report/report.md

Arms trained from scratch on the same demonstrations, seeds and batches, evaluated on the same held-out
placements (paired):
  sft      images, state and instruction: what every method of the experiment sees.
  oracle   the same plus the simulator's object and goal positions (`observation.privileged`) as one more token.
  control  auxiliary SFT with the positive control (capvector.bench.objectives.privileged): the positions are a
           training target for the visual tokens, never an input; at evaluation it sees what sft sees.
If the oracle is not clearly ahead, no perception objective can help here and the regime cannot test the method.
The decoy test evaluates the oracle with the positions of another placement (moved as the real ones move): if its
success drops, the oracle uses the positions; if not, it finds the objects from the images anyway.

Every stage is cached in the run folder: demonstrations, each training run (resumed from its last checkpoint when
interrupted), each evaluation (results.json, saved as it goes); the report is rebuilt from them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capvector.bench import recipe
from capvector.bench.env.features import PRIVILEGED_DIM
from capvector.bench.env.sim import PLACEMENTS, parallel_map
from capvector.bench.env.tasks import resolve_tasks
from capvector.bench.experiment.layout import HeadroomLayout, checkpoint_folder, trained_policy
from capvector.bench.statistics import bootstrap_mean, paired_difference, resolvable_difference
from capvector.errors import CapvectorError
from capvector.files import content_hash, read_json, write_json, write_text
from capvector.training.checkpointing import checkpoint_dirs
from capvector.training.config import TrainConfig
from capvector.training.engine import train

ARMS = ("sft", "oracle", "control")


@dataclass
class HeadroomConfig:
    regime: str = "wide"
    arms: list = field(default_factory=lambda: ["sft", "oracle"])  # sft and oracle always; "control" optional
    # Tasks whose success hinges on reaching an object placed at random (the goal sits at a fixed offset from it).
    tasks: list = field(
        default_factory=lambda: ["button-press-topdown-v3", "button-press-v3", "door-lock-v3", "handle-press-v3"]
    )
    placement: str = "wide"
    demos_per_task: int = 10
    demo_seed: int = 0
    image_size: int = 64
    policy: dict = field(default_factory=lambda: {"dim": 96, "trunk_layers": 3, "heads": 4})
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 50
    budgets: list = field(default_factory=lambda: [300, 1000])
    seeds: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    eval_episodes: int = 20
    eval_seed: int = 0
    # The scripted experts finish these tasks in at most ~230 steps on wide placements; a failure stops at the cap.
    max_steps: int = 300
    control_weight: float = 0.5
    workers: int = 2


REGIMES = {
    # Meta-World's own placement ranges, the regime of the full preset's downstream tasks (for comparison).
    "default": HeadroomConfig(regime="default", placement="default"),
    # x/y placement spans 2.5x Meta-World's, 10 demonstrations per task.
    "wide": HeadroomConfig(),
    # Wide placements seen through less: 32x32 camera frames and 5 demonstrations per task, trained longer. Finding
    # an object from coarse pixels after few examples is what the oracle is spared.
    "scarce": HeadroomConfig(regime="scarce", demos_per_task=5, image_size=32, budgets=[500, 1000, 2000]),
    # The suite's miniature: one task, a tiny policy, a few steps.
    "test": HeadroomConfig(
        regime="test",
        arms=["sft", "oracle", "control"],
        tasks=["button-press-topdown-v3"],
        demos_per_task=2,
        image_size=32,
        policy={"dim": 16, "heads": 2, "trunk_layers": 1, "mlp_ratio": 1, "stem_channels": [8, 8]},
        batch_size=8,
        warmup_steps=0,
        budgets=[4],
        seeds=[0, 1],
        eval_episodes=1,
        max_steps=40,
        workers=1,
    ),
}


def check_config(config: HeadroomConfig) -> None:
    resolve_tasks(config.tasks)
    if not {"sft", "oracle"} <= set(config.arms) <= set(ARMS):
        raise CapvectorError(f"headroom: arms {config.arms} must include sft and oracle, from {', '.join(ARMS)}")
    if config.placement not in PLACEMENTS:
        raise CapvectorError(f"headroom: unknown placement {config.placement!r}; valid: {', '.join(PLACEMENTS)}")
    if not config.budgets or sorted(set(config.budgets)) != list(config.budgets) or config.budgets[0] < 1:
        raise CapvectorError(f"headroom: budgets {config.budgets} must be increasing positive step counts")
    if len(config.seeds) < 2:
        raise CapvectorError("headroom: give at least two seeds (the paired intervals are over seeds)")


def run_name(config: HeadroomConfig, arm: str) -> str:
    """The folder and result name of an arm's runs: the control's weight is part of it."""
    return f"control_w{config.control_weight:g}" if arm == "control" else arm


def train_config(config: HeadroomConfig, layout: HeadroomLayout, arm: str, seed: int) -> TrainConfig:
    demos = str(layout.demos)
    oracle = {"privileged_dim": PRIVILEGED_DIM} if arm == "oracle" else {}
    return TrainConfig(
        strategy="aux" if arm == "control" else "sft",
        auxiliary="capvector.bench.recipe:privileged" if arm == "control" else "",
        auxiliary_args={"weight": config.control_weight} if arm == "control" else {},
        out_dir=str(layout.training(run_name(config, arm), seed)),
        steps=config.budgets[-1],
        lr=config.lr,
        min_lr=config.lr / 10,
        warmup_steps=config.warmup_steps,
        batch_size=config.batch_size,
        seed=seed,
        device="auto",
        policy="capvector.bench.recipe:policy",
        policy_args={"dataset": demos, **config.policy, **oracle},
        dataset="capvector.bench.recipe:dataset",
        dataset_args={"root": demos, "depth": False},
        checkpoint_every=functools.reduce(math.gcd, config.budgets),
        keep_checkpoints=0,
        log_every=max(1, config.budgets[-1] // 20),
        progress=False,
        tensorboard=False,
    )


def train_arm(config: TrainConfig) -> str:
    """One training run (in a worker process), resumed from its last checkpoint if it was interrupted."""
    out_dir = Path(config.out_dir)
    if not trained_policy(out_dir).exists():
        train(dataclasses.replace(config, resume=bool(checkpoint_dirs(out_dir))))
    return str(out_dir)


def policy_at(layout: HeadroomLayout, name: str, seed: int, steps: int) -> Path:
    return checkpoint_folder(layout.training(name, seed), steps)


def evaluations(config: HeadroomConfig) -> list[tuple[str, str, int, int, bool]]:
    """(name, arm, seed, steps, decoy) of every evaluation: both arms at every budget, the oracle's decoy at the
    last."""
    runs = [(run_name(config, a), s, b, False) for a in config.arms for s in config.seeds for b in config.budgets]
    runs += [("oracle", s, config.budgets[-1], True) for s in config.seeds]
    return [(f"{a}/seed{s}/step{b}{'/decoy' if d else ''}", a, s, b, d) for a, s, b, d in runs]


def evaluate_all(config: HeadroomConfig, layout: HeadroomLayout) -> dict:
    from capvector.bench.env.evaluation import evaluate_many

    path = layout.evaluations
    path.parent.mkdir(parents=True, exist_ok=True)
    results = read_json(path) or {}
    todo = [e for e in evaluations(config) if e[0] not in results]
    started = time.perf_counter()
    rates: dict[str, dict[str, float]] = {}  # per name, its tasks evaluated so far
    for decoy in (False, True):  # one simulator setting per pass: the oracle's decoy test is another
        batch = [e for e in todo if e[4] == decoy]
        factories = [functools.partial(recipe.load_trained, policy_at(layout, a, s, b)) for _, a, s, b, _ in batch]
        for i, task, rows in evaluate_many(
            factories,
            config.tasks,
            config.eval_episodes,
            config.eval_seed,
            config.workers,
            image_size=config.image_size,
            placement=config.placement,
            decoy=decoy,
            max_steps=config.max_steps,
        ):
            name = batch[i][0]
            rates.setdefault(name, {})[task] = sum(row[3] for row in rows) / len(rows)
            if len(rates[name]) == len(config.tasks):  # saved whole: a name in results.json is done
                results[name] = {t: rates[name][t] for t in config.tasks}
                write_json(path, results)
                mean = sum(results[name].values()) / len(config.tasks)
                done = len(todo) - sum(e[0] not in results for e in todo)
                print(f"  evaluated {name}: {mean:.2f} ({done}/{len(todo)}, {time.perf_counter() - started:.0f} s)")
    return results


def cells(results: dict, config: HeadroomConfig, arm: str, steps: int, decoy: bool = False) -> np.ndarray:
    """(seeds, tasks) success rates of one arm at one budget."""
    name, suffix = run_name(config, arm), "/decoy" if decoy else ""
    return np.array([[results[f"{name}/seed{s}/step{steps}{suffix}"][t] for t in config.tasks] for s in config.seeds])


def summarize(results: dict, config: HeadroomConfig) -> dict:
    """Per arm and budget: mean success and its seed-bootstrap interval; oracle - sft paired; the decoy's drop; how
    small a difference these seeds resolve. Success rates in points (0-100)."""

    def points(triple: tuple[float, float, float]) -> list[float]:
        return [round(100 * v, 1) for v in triple]

    budgets: dict[str, Any] = {}
    for steps in config.budgets:
        by_arm = {arm: cells(results, config, arm, steps) for arm in config.arms}
        sft, oracle = by_arm["sft"], by_arm["oracle"]
        row: dict[str, Any] = {}
        for arm, outcomes in by_arm.items():
            row[arm] = points(bootstrap_mean(outcomes))
            row[f"{arm}_per_task"] = dict(zip(config.tasks, (100 * outcomes.mean(axis=0)).round(1).tolist()))
            if arm != "sft":
                row[f"{arm}_minus_sft"] = points(paired_difference(outcomes, sft))
        row |= {
            "sft_per_seed": (100 * sft.mean(axis=1)).round(1).tolist(),
            "oracle_per_seed": (100 * oracle.mean(axis=1)).round(1).tolist(),
            "resolvable_paired_difference": round(100 * resolvable_difference(oracle - sft), 1),
        }
        budgets[str(steps)] = row
    last = config.budgets[-1]
    oracle, decoy = cells(results, config, "oracle", last), cells(results, config, "oracle", last, decoy=True)
    best = max(budgets, key=lambda b: budgets[b]["oracle_minus_sft"][1])
    return {
        "regime": config.regime,
        "config": dataclasses.asdict(config),
        "budgets": budgets,
        "decoy": {
            "oracle": points(bootstrap_mean(oracle)),
            "oracle_with_decoy": points(bootstrap_mean(decoy)),
            "drop": points(paired_difference(oracle, decoy)),
            "steps": last,
        },
        "headroom": {
            "budget": int(best),
            "oracle_minus_sft": budgets[best]["oracle_minus_sft"],
            "accepted": budgets[best]["oracle_minus_sft"][0] >= 20 and budgets[best]["oracle_minus_sft"][1] > 0,
        },
    }


def interval(triple: list[float], sign: str = "") -> str:
    mean, low, high = triple
    return f"{mean:{sign}} [{low:{sign}}, {high:{sign}}]"


def report_markdown(summary: dict) -> str:
    config = summary["config"]
    lines = [
        f"# Headroom: regime `{summary['regime']}`",
        "",
        f"Tasks {', '.join(config['tasks'])}; placement ranges `{config['placement']}`; {config['demos_per_task']} "
        f"demonstrations per task; {len(config['seeds'])} seeds; {config['eval_episodes']} held-out placements per "
        f"task, the same for every policy. Success in %, mean over seeds and tasks, 95% interval from a bootstrap "
        "over seeds; differences paired by (seed, task).",
        "",
        "| steps | SFT | oracle (+ object/goal positions) | oracle - SFT | "
        f"resolvable difference ({len(config['seeds'])} seeds) |",
        "|---|---|---|---|---|",
    ]
    for steps, row in summary["budgets"].items():
        sft, oracle, diff = row["sft"], row["oracle"], row["oracle_minus_sft"]
        lines.append(
            f"| {steps} | {interval(sft)} | {interval(oracle)} | {interval(diff, '+')} | "
            f"{row['resolvable_paired_difference']} |"
        )
    if "control" in config["arms"]:
        lines += [
            "",
            f"Positive control (auxiliary SFT, weight {config['control_weight']}: visual tokens regress object and "
            "goal positions relative to the hand; positions never an input):",
            "",
            "| steps | SFT | control | control - SFT |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {steps} | {interval(row['sft'])} | {interval(row['control'])} | "
            f"{interval(row['control_minus_sft'], '+')} |"
            for steps, row in summary["budgets"].items()
        ]
    decoy = summary["decoy"]
    head = summary["headroom"]
    lines += [
        "",
        f"Decoy test at {decoy['steps']} steps: the oracle {decoy['oracle'][0]}% with the true positions, "
        f"{decoy['oracle_with_decoy'][0]}% [{decoy['oracle_with_decoy'][1]}, {decoy['oracle_with_decoy'][2]}] with "
        f"another placement's; drop {decoy['drop'][0]:+} [{decoy['drop'][1]:+}, {decoy['drop'][2]:+}] points.",
        "",
        "Per task (mean over seeds):",
        "",
        f"| steps | task | {' | '.join(config['arms'])} |",
        "|---|---|" + "---|" * len(config["arms"]),
    ]
    for steps, row in summary["budgets"].items():
        for task in config["tasks"]:
            rates = " | ".join(str(row[f"{arm}_per_task"][task]) for arm in config["arms"])
            lines.append(f"| {steps} | {task} | {rates} |")
    verdict = (
        "has headroom: the oracle is ahead by at least 20 points with its interval above 0"
        if head["accepted"]
        else "does not meet the acceptance bar (oracle ahead by >= 20 points, interval above 0)"
    )
    lines += [
        "",
        f"At {head['budget']} steps this regime {verdict}: oracle - SFT {head['oracle_minus_sft'][0]:+} "
        f"[{head['oracle_minus_sft'][1]:+}, {head['oracle_minus_sft'][2]:+}] points.",
    ]
    return "\n".join(lines) + "\n"


def headroom(regime: str | HeadroomConfig = "wide", out_dir: str | Path = "runs/headroom") -> Path:
    """Run (or resume) the headroom measurement of `regime`; returns the report folder."""
    if isinstance(regime, str):
        if regime not in REGIMES:
            raise CapvectorError(f"unknown headroom regime {regime!r}; valid: {', '.join(REGIMES)}")
        regime = dataclasses.replace(REGIMES[regime])
    config = regime
    check_config(config)
    layout = HeadroomLayout(Path(out_dir, config.regime).resolve())
    # Arms are separate runs in folders named by what shapes them (run_name): adding an arm, or another control
    # weight, to a finished run folder trains and evaluates only that arm.
    key = content_hash({k: v for k, v in dataclasses.asdict(config).items() if k not in ("arms", "control_weight")})
    recorded = read_json(layout.config)
    if recorded and recorded.get("key") != key:
        raise CapvectorError(
            f"{layout.root} holds a headroom run of another config; remove it or choose another out_dir"
        )
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json(layout.config, {"key": key, "config": dataclasses.asdict(config)})
    started = time.perf_counter()
    if not layout.demos.exists():
        from capvector.bench.env.demos import generate_demonstrations

        print(f"demonstrations: {len(config.tasks)} tasks x {config.demos_per_task}, placement {config.placement}")
        generate_demonstrations(
            layout.demos,
            config.tasks,
            config.demos_per_task,
            seed=config.demo_seed,
            image_size=config.image_size,
            workers=config.workers,
            placement=config.placement,
        )
    jobs = [(train_config(config, layout, arm, seed),) for seed in config.seeds for arm in config.arms]
    print(f"training {len(jobs)} runs of {config.budgets[-1]} steps, {config.workers} at a time")
    parallel_map(train_arm, jobs, config.workers)
    print(f"trained in {time.perf_counter() - started:.0f} s; evaluating")
    summary = summarize(evaluate_all(config, layout), config)
    layout.report.mkdir(exist_ok=True)
    write_json(layout.report_results, summary)
    write_text(layout.report_file, report_markdown(summary))
    print(f"done in {time.perf_counter() - started:.0f} s: {layout.report_file}")
    return layout.report
