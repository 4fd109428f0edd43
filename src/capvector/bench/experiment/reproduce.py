"""`capvector reproduce`: the paper's experiment end to end on the embedded benchmark, every stage cached.

    run_dir = reproduce(preset="quick", out_dir="runs/reproduce", force=(), device="auto")

Stages, each a folder of the run with a stage.json (its key, whether it finished, an id for its outputs):
  demos       scripted-expert demonstrations of the pretraining, extraction (D_ext) and downstream tasks
  pretrain    theta_pt: SFT from scratch on the pretraining tasks
  extract     theta_ft (sft) and theta_ao (aux) from theta_pt on D_ext, identical settings
  vector      gamma = theta_ao - theta_ft, tau = theta_ft - theta_pt, theta_meta = theta_pt + alpha * gamma
  downstream  (a)-(e) of METHODS on the held-out tasks, every seed, a checkpoint at every step budget
  ablations   alpha sweep, lambda sweep, and a long run with and without L_orth (first seed)
  evaluate    every checkpoint on new placements, in-domain and in the "new environment" variant
  report      report.md, results.json and plots (capvector.bench.experiment.report)
A stage's key hashes its plan (every training config, demonstration job and evaluation it will run) with the
ids of the stages it reads, so a finished stage is skipped while nothing it depends on changed, and redone,
with the reason printed, when its plan, the code version or an input changed. An interrupted stage keeps
what it finished and resumes its training runs from their last checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from capvector import __version__
from capvector.training.config import TrainConfig, result_fields
from capvector.errors import CapvectorError
from capvector.params.merging import merge
from capvector.training.engine import STATE_FILE, checkpoint_dirs, train
from capvector.params.vectors import extract
from capvector.bench import recipe
from capvector.bench.env.tasks import resolve_tasks

STAGE_FILE = "stage.json"
RUN_FILE = "run.json"
SPLITS = ("pretrain", "extract", "downstream")
VARIANTS = ("default", "new_env")

# The downstream methods of the protocol: (label, start from, strategy, finetune).
METHODS = {
    "sft": ("(a) SFT from theta_pt", "pretrained", "sft", "full"),
    "aux": ("(b) auxiliary SFT from theta_pt", "pretrained", "aux", "full"),
    "meta_sft": ("(c) SFT from theta_meta, no L_orth", "meta", "sft", "full"),
    "capvector": ("(d) CapVector: SFT + lambda L_orth from theta_meta", "meta", "capvector", "full"),
    "capvector_lora": ("(e) CapVector with LoRA", "meta", "capvector", "lora"),
}


@dataclass
class ReproduceConfig:
    """Every number that shapes the experiment; the stages' cache keys hash what they use of it."""

    preset: str = "full"
    # Task sets: task or split names of capvector.bench.env.tasks (disjoint).
    pretrain_tasks: list = field(default_factory=lambda: ["pretrain"])
    extract_tasks: list = field(default_factory=lambda: ["extract"])
    downstream_tasks: list = field(default_factory=lambda: ["downstream"])
    # Demonstrations per task and the seed of their placements (evaluation placements never overlap them).
    pretrain_episodes: int = 15
    extract_episodes: int = 15
    downstream_episodes: int = 10
    demo_seed: int = 0
    image_size: int = 64
    # The policy (PolicyConfig fields of the new theta_pt) and the optimization shared by every run.
    policy: dict = field(default_factory=lambda: {"dim": 96, "trunk_layers": 3, "heads": 4})
    batch_size: int = 32
    warmup_steps: int = 20
    train_seed: int = 0  # pretraining and extraction
    pretrain_steps: int = 2000
    pretrain_lr: float = 5e-4
    # Extraction: sft and aux from theta_pt with identical settings; the auxiliary weight and layer.
    extract_steps: int = 500
    extract_lr: float = 3e-4
    aux_weight: float = 0.5
    aux_layer: str | None = None  # None: the policy's hook_layer (about 2/3 of the trunk)
    alpha: float = 1.0
    # Downstream: every method at every budget (checkpoints of one run per seed) and seed.
    methods: list = field(default_factory=lambda: list(METHODS))
    budgets: list = field(default_factory=lambda: [100, 200, 400])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    downstream_lr: float = 3e-4
    lora_lr: float = 1e-3
    lora_rank: int = 16
    orth_lambda: float = 10.0
    # Evaluation: episodes per task, checkpoint and variant on placements drawn from eval_seed.
    eval_episodes: int = 5
    eval_seed: int = 0
    success_threshold: float = 0.5
    # Ablations (first seed, the largest budget): merge scales, regularizer weights, a long run.
    alphas: list = field(default_factory=lambda: [0.5, 2.0])
    lambdas: list = field(default_factory=lambda: [1.0, 100.0])
    long_steps: int = 1200
    workers: int = 0  # simulator processes for demonstrations and evaluation; 0: one per CPU core
    # torch CPU threads for training. Measured on 2 shared cores (load ~5): one thread ran the quick policy's step
    # 7x faster than two, which waited on each other; on an idle machine try 2. 0: torch's default.
    threads: int = 1
    note: str = ""  # what the report says about this preset's size


PRESETS = {
    # The whole pipeline in minutes on 2 CPU cores: a tiny policy and few demonstrations, steps and episodes.
    # Its numbers show that every stage runs, not what the method does.
    "quick": ReproduceConfig(
        preset="quick",
        pretrain_tasks=["reach-v3", "push-v3", "button-press-v3", "drawer-close-v3"],
        extract_tasks=["sweep-into-v3", "handle-pull-v3"],
        downstream_tasks=["button-press-wall-v3", "faucet-close-v3"],
        pretrain_episodes=5,
        extract_episodes=5,
        downstream_episodes=5,
        image_size=32,
        policy={"dim": 32, "heads": 2, "trunk_layers": 2, "mlp_ratio": 2, "stem_channels": [8, 16]},
        batch_size=16,
        warmup_steps=10,
        pretrain_steps=400,
        extract_steps=100,
        budgets=[40, 120],
        lora_rank=4,
        eval_episodes=2,
        alphas=[0.5],
        lambdas=[100.0],
        long_steps=360,
        note="quick preset: a tiny policy, 5 demonstrations per task, at most a few hundred steps and 2 episodes per "
        "task and checkpoint; it proves that the pipeline runs end to end, its success rates say next to "
        "nothing about the method",
    ),
    "full": ReproduceConfig(
        note="full preset: 12 pretraining tasks, 4 extraction and 4 held-out tasks, 10-15 demonstrations per task, "
        "3 seeds, 5 episodes per task, seed and checkpoint (60 per table cell)",
    ),
    # The test suite's miniature: two tasks, a few steps, one episode per checkpoint.
    "test": ReproduceConfig(
        preset="test",
        pretrain_tasks=["reach-v3"],
        extract_tasks=["handle-pull-v3"],
        downstream_tasks=["door-lock-v3"],
        pretrain_episodes=2,
        extract_episodes=1,
        downstream_episodes=1,
        image_size=32,
        policy={
            "dim": 16,
            "heads": 2,
            "trunk_layers": 2,
            "mlp_ratio": 1,
            "stem_channels": [8, 8],
            "text_buckets": 64,
            "vision_layers": 1,
            "text_layers": 1,
        },
        batch_size=8,
        warmup_steps=0,
        pretrain_steps=6,
        extract_steps=4,
        budgets=[2, 4],
        seeds=[0],
        lora_rank=2,
        eval_episodes=1,
        alphas=[0.5],
        lambdas=[100.0],
        long_steps=6,
        workers=1,
        note="test preset: a miniature of the pipeline for the test suite",
    ),
}


def preset_config(preset: str | ReproduceConfig) -> ReproduceConfig:
    if isinstance(preset, ReproduceConfig):
        return preset
    if preset not in PRESETS:
        raise CapvectorError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[preset])


def check_config(config: ReproduceConfig) -> None:
    sets = {split: resolve_tasks(getattr(config, f"{split}_tasks")) for split in SPLITS}
    for a, b in (("pretrain", "extract"), ("pretrain", "downstream"), ("extract", "downstream")):
        shared = sorted(set(sets[a]) & set(sets[b]))
        if shared:
            raise CapvectorError(
                f"reproduce config: {shared} are in both {a}_tasks and {b}_tasks; the sets must be "
                "disjoint (held-out tasks are the point of the experiment)"
            )
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise CapvectorError(f"reproduce config: unknown methods {unknown}; valid methods: {', '.join(METHODS)}")
    if not config.budgets or sorted(set(config.budgets)) != list(config.budgets) or config.budgets[0] < 1:
        raise CapvectorError(f"reproduce config: budgets {config.budgets} must be increasing positive step counts")
    if config.long_steps % 2 or config.long_steps <= config.budgets[-1]:
        raise CapvectorError(
            f"reproduce config: long_steps {config.long_steps} must be even (it is evaluated halfway) "
            f"and longer than the largest budget {config.budgets[-1]}"
        )
    if len(config.seeds) < 1:
        raise CapvectorError("reproduce config: give at least one training seed (the protocol asks for 3)")


# ---- the run folder: stages, keys, cached units -----------------------------------------------------------------


def fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value, indent=1, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class Run:
    """One run folder: the config, the datasets loaded once, and what each stage recorded."""

    def __init__(self, config: ReproduceConfig, root: Path, device: str):
        self.config, self.root, self.device = config, root, device
        self.workers = config.workers or os.cpu_count() or 1
        self._datasets: dict[tuple[str, bool], Any] = {}

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def record(self, stage: str) -> dict:
        return read_json(self.path(stage, STAGE_FILE)) or {}

    def relative(self, value: Any) -> Any:
        """The plan with this run's folder written as $RUN, so that a moved run folder keeps its keys."""
        return json.loads(json.dumps(value, default=str).replace(str(self.root), "$RUN"))

    def demos(self, split: str) -> Path:
        return self.path("demos", split)

    def dataset(self, root: str, depth: bool):
        """A demonstration folder, read once per process (every run on it trains on the same object)."""
        if (root, depth) not in self._datasets:
            self._datasets[(root, depth)] = recipe.dataset(root, depth=depth)
        return self._datasets[(root, depth)]

    def train_config(
        self,
        out_dir: Path,
        split: str,
        steps: int,
        lr: float,
        seed: int,
        init_from: Path | None,
        strategy: str = "sft",
        finetune: str = "full",
        checkpoint_every: int = 0,
        **fields,
    ) -> TrainConfig:
        root = str(self.demos(split))
        config = self.config
        return TrainConfig(
            strategy=strategy,
            finetune=finetune,
            out_dir=str(out_dir),
            steps=steps,
            lr=lr,
            min_lr=lr / 10,
            seed=seed,
            batch_size=config.batch_size,
            warmup_steps=config.warmup_steps,
            device=self.device,
            policy="capvector.bench.recipe:policy",
            policy_args={} if init_from else {"dataset": root, **config.policy},
            init_from=str(init_from) if init_from else None,
            # depth maps are read by the spatial objective, which never runs on the pretraining set
            dataset="capvector.bench.recipe:dataset",
            dataset_args={"root": root, "depth": split != "pretrain"},
            auxiliary="capvector.bench.recipe:spatial" if strategy == "aux" else "",
            auxiliary_args={"dataset": root, "weight": config.aux_weight, "layer": config.aux_layer}
            if strategy == "aux"
            else {},
            lora_rank=config.lora_rank,
            lora_alpha=2.0 * config.lora_rank,
            checkpoint_every=checkpoint_every or steps,
            keep_checkpoints=0,
            log_every=max(1, min(10, steps // 4)),
            tensorboard=False,
            **fields,
        )


def run_training(run: Run, config: TrainConfig) -> Path:
    """Train unless out_dir already holds the finished policy; continue from the last checkpoint if interrupted."""
    out_dir = Path(config.out_dir)
    if (out_dir / "policy").exists():
        return out_dir
    resume = bool(checkpoint_dirs(out_dir))
    if not resume:
        shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    train(dataclasses.replace(config, resume=resume), dataset=run.dataset(**config.dataset_args))
    write_json(out_dir / "wall.json", {"seconds": time.perf_counter() - started, "resumed": resume})
    for state in out_dir.glob(f"checkpoints/*/{STATE_FILE}"):  # finished: only the policies are needed now
        state.unlink()
    return out_dir


# ---- the stages -------------------------------------------------------------------------------------------------


def plan_demos(run: Run) -> dict:
    c = run.config
    return {
        split: {
            "tasks": resolve_tasks(getattr(c, f"{split}_tasks")),
            "episodes": getattr(c, f"{split}_episodes"),
            "seed": c.demo_seed,
            "image_size": c.image_size,
        }
        for split in SPLITS
    }


def do_demos(run: Run, plan: dict) -> dict:
    from capvector.bench.env.demos import generate_demonstrations

    for split, job in plan.items():
        if not run.demos(split).exists():  # written whole (renamed at the end): present means complete
            print(f"  {split}: {len(job['tasks'])} tasks x {job['episodes']} demonstrations")
            generate_demonstrations(
                run.demos(split),
                job["tasks"],
                job["episodes"],
                seed=job["seed"],
                image_size=job["image_size"],
                workers=run.workers,
            )
    return {split: recipe.dataset_info(run.demos(split))[0]["total_episodes"] for split in SPLITS}


def plan_pretrain(run: Run) -> dict:
    c = run.config
    return {
        "pretrain": run.train_config(
            run.path("pretrain"),
            "pretrain",
            c.pretrain_steps,
            c.pretrain_lr,
            c.train_seed,
            None,
            checkpoint_every=max(1, c.pretrain_steps // 4),
        )
    }


def plan_extract(run: Run) -> dict:
    c = run.config
    return {
        strategy: run.train_config(
            run.path("extract", strategy),
            "extract",
            c.extract_steps,
            c.extract_lr,
            c.train_seed,
            run.path("pretrain", "policy"),
            strategy=strategy,
            checkpoint_every=max(1, c.extract_steps // 2),
        )
        for strategy in ("sft", "aux")
    }


def do_training(run: Run, plan: dict) -> dict:
    for name, config in plan.items():
        print(f"  {name}: {config.strategy}, {config.finetune}, {config.steps} steps")
        run_training(run, config)
    return {}


def plan_vector(run: Run) -> dict:
    return {
        "alpha": run.config.alpha,
        "aux": str(run.path("extract", "aux", "policy")),
        "sft": str(run.path("extract", "sft", "policy")),
        "pretrained": str(run.path("pretrain", "policy")),
    }


def merged_path(run: Run, alpha: float) -> Path:
    return run.path("vector", f"theta_meta_alpha{alpha:g}")


def merged(run: Run, alpha: float) -> Path:
    """theta_pt + alpha * gamma, written once per alpha."""
    path = merged_path(run, alpha)
    if not path.exists():
        merge(run.path("pretrain", "policy"), run.path("vector", "gamma"), path, alpha=alpha)
    return path


def do_vector(run: Run, plan: dict) -> dict:
    gamma_dir, tau_dir = run.path("vector", "gamma"), run.path("vector", "tau")
    for partial in (gamma_dir, tau_dir):  # extract writes both; a half-finished pair is redone
        shutil.rmtree(partial, ignore_errors=True)
    gamma = extract(plan["aux"], plan["sft"], gamma_dir, pretrained=plan["pretrained"], task_vector_output=tau_dir)
    summary = {"tensors": len(gamma), "global_norm": gamma.metadata.get("global_norm")}
    gamma.close()
    merged(run, plan["alpha"])
    return summary


def downstream_config(
    run: Run,
    out_dir: Path,
    method: str,
    seed: int,
    steps: int,
    alpha: float | None = None,
    orth_lambda: float | None = None,
) -> TrainConfig:
    c = run.config
    _, start, strategy, finetune = METHODS[method]
    alpha = c.alpha if alpha is None else alpha
    init_from = run.path("pretrain", "policy") if start == "pretrained" else merged_path(run, alpha)
    fields = {}
    if strategy == "capvector":
        fields = {
            "vector": str(run.path("vector", "gamma")),
            "orth_lambda": c.orth_lambda if orth_lambda is None else orth_lambda,
        }
    every = functools.reduce(math.gcd, c.budgets) if steps == c.budgets[-1] else max(1, steps // 2)
    return run.train_config(
        out_dir,
        "downstream",
        steps,
        c.lora_lr if finetune == "lora" else c.downstream_lr,
        seed,
        init_from,
        strategy=strategy,
        finetune=finetune,
        checkpoint_every=every,
        schedule="constant",
        **fields,
    )


def plan_downstream(run: Run) -> dict:
    c = run.config
    return {
        f"{method}/seed{seed}": downstream_config(
            run, run.path("downstream", method, f"seed{seed}"), method, seed, c.budgets[-1]
        )
        for method in c.methods
        for seed in c.seeds
    }


def plan_ablations(run: Run) -> dict:
    c = run.config
    seed, steps = c.seeds[0], c.budgets[-1]
    plan = {
        f"alpha{alpha:g}": downstream_config(
            run, run.path("ablations", f"alpha{alpha:g}"), "capvector", seed, steps, alpha=alpha
        )
        for alpha in c.alphas
    }
    plan |= {
        f"lambda{value:g}": downstream_config(
            run, run.path("ablations", f"lambda{value:g}"), "capvector", seed, steps, orth_lambda=value
        )
        for value in c.lambdas
    }
    plan |= {
        f"long_{method}": downstream_config(run, run.path("ablations", f"long_{method}"), method, seed, c.long_steps)
        for method in ("meta_sft", "capvector")
    }
    return plan


def do_ablations(run: Run, plan: dict) -> dict:
    for alpha in run.config.alphas:
        merged(run, alpha)
    return do_training(run, plan)


def checkpoint_folder(training_dir: Path, steps: int) -> Path:
    """The policy a training run saved at `steps` (the engine's checkpoint layout)."""
    return training_dir / "checkpoints" / f"step_{steps:07d}" / "policy"


def checkpoints_to_evaluate(run: Run) -> dict[str, tuple[str, str | None]]:
    """name -> (policy folder, the base its LoRA adapter applies to or None): every downstream budget of every
    method and seed, and the ablations' final (long runs: also halfway) checkpoints."""
    c = run.config
    runs = {f"downstream/{name}": (config, c.budgets) for name, config in plan_downstream(run).items()}
    runs |= {
        f"ablations/{name}": (config, long_checkpoints(c) if name.startswith("long_") else (config.steps,))
        for name, config in plan_ablations(run).items()
    }
    # the base comes from this run's folder, not the adapter's record: a moved run folder still evaluates
    return {
        f"{name}/step{steps}": (
            str(checkpoint_folder(Path(config.out_dir), steps)),
            config.init_from if config.finetune == "lora" else None,
        )
        for name, (config, budgets) in runs.items()
        for steps in budgets
    }


def long_checkpoints(config: ReproduceConfig) -> tuple[int, int]:
    """The steps at which the long runs are evaluated: halfway and at the end."""
    return config.long_steps // 2, config.long_steps


def plan_evaluate(run: Run) -> dict:
    c = run.config
    return {
        "checkpoints": checkpoints_to_evaluate(run),
        "tasks": resolve_tasks(c.downstream_tasks),
        "episodes": c.eval_episodes,
        "seed": c.eval_seed,
        "variants": list(VARIANTS),
    }


def evaluate_checkpoints(
    task: str,
    variant: str,
    checkpoints: list[tuple[str, tuple[str, str | None]]],
    episodes: int,
    seed: int,
    image_size: int,
) -> list[tuple[str, dict]]:
    """(name, {successes, episodes, mean_steps}) per checkpoint on `task` (runs in a worker: one simulator for all)."""
    from capvector.bench.env.evaluation import check_policy, run_episode
    from capvector.bench.env.sim import SimEnv, eval_placement_seed

    env = SimEnv(task, image_size=image_size, variant=variant)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 inference of a small model: extra threads only wait on each other (5x here)
    out = []
    try:
        for name, (path, base) in checkpoints:
            policy = recipe.load_trained(path, base=base)
            check_policy(policy, env)
            outcomes = [
                run_episode(env, policy, eval_placement_seed(seed, e), record=False)[:2] for e in range(episodes)
            ]
            out.append(
                (
                    name,
                    {
                        "successes": sum(s for s, _ in outcomes),
                        "episodes": episodes,
                        "mean_steps": sum(n for _, n in outcomes) / episodes,
                    },
                )
            )
    finally:
        torch.set_num_threads(threads)
        env.close()
    return out


def do_evaluate(run: Run, plan: dict) -> dict:
    """Every checkpoint on the same placements of every task, in both variants; saved as it goes (a killed stage
    keeps what it evaluated). Jobs are (task, variant, a few checkpoints): one simulator per job, not per episode."""
    from capvector.bench.env.sim import parallel_map

    path = run.path("evaluate", "results.json")
    results = read_json(path) or {}
    todo = [
        (task, variant, name)
        for variant in plan["variants"]
        for task in plan["tasks"]
        for name in plan["checkpoints"]
        if task not in results.get(f"{name}@{variant}", {}).get("tasks", {})
    ]
    per_job = max(1, math.ceil(len(todo) / (2 * run.workers)))  # 2 rounds: saved midway
    jobs = []
    for (task, variant), items in itertools.groupby(todo, key=lambda item: item[:2]):
        names = [name for _, _, name in items]
        jobs += [
            (task, variant, [(n, plan["checkpoints"][n]) for n in names[j : j + per_job]])
            for j in range(0, len(names), per_job)
        ]
    done = 0
    started = time.perf_counter()
    for i in range(0, len(jobs), run.workers):
        batch = [
            (t, v, c, plan["episodes"], plan["seed"], run.config.image_size) for t, v, c in jobs[i : i + run.workers]
        ]
        for (task, variant, _, *_), rows in zip(batch, parallel_map(evaluate_checkpoints, batch, run.workers)):
            for name, counts in rows:
                results.setdefault(f"{name}@{variant}", {"tasks": {}})["tasks"][task] = counts
                done += 1
        write_json(path, results)
        print(f"  evaluated {done}/{len(todo)} (checkpoint, task, variant) in {time.perf_counter() - started:.0f} s")
    return {"evaluations": len(results)}


def plan_report(run: Run) -> dict:
    return {"config": dataclasses.asdict(run.config), "version": __version__}


def do_report(run: Run, plan: dict) -> dict:
    from capvector.bench.experiment.report import write_report

    return {"report": str(write_report(run))}


# name -> (the stages it reads, its plan, what it does)
STAGES: dict[str, tuple[tuple[str, ...], Callable[[Run], dict], Callable[[Run, dict], dict]]] = {
    "demos": ((), plan_demos, do_demos),
    "pretrain": (("demos",), plan_pretrain, do_training),
    "extract": (("demos", "pretrain"), plan_extract, do_training),
    "vector": (("pretrain", "extract"), plan_vector, do_vector),
    "downstream": (("demos", "pretrain", "vector"), plan_downstream, do_training),
    "ablations": (("demos", "pretrain", "vector"), plan_ablations, do_ablations),
    "evaluate": (("downstream", "ablations"), plan_evaluate, do_evaluate),
    "report": (("vector", "downstream", "ablations", "evaluate"), plan_report, do_report),
}


def stage_key(run: Run, name: str) -> tuple[str, dict]:
    inputs, plan_of, _ = STAGES[name]
    plan = plan_of(run)
    described = {k: result_fields(v) if isinstance(v, TrainConfig) else v for k, v in plan.items()}
    ids = {dep: run.record(dep).get("id") for dep in inputs}
    return fingerprint({"stage": name, "version": __version__, "plan": run.relative(described), "inputs": ids}), plan


def stale_reason(record: dict, key: str) -> str | None:
    """Why a stage's folder cannot be reused as it is, or None when it can (finished or resumable)."""
    if not record:
        return None
    if record.get("version") != __version__:
        return f"made by capvector {record.get('version')}, this is {__version__}"
    if record.get("key") != key:
        return "its config or an input stage changed"
    return None


def run_stage(run: Run, name: str, number: int, force: bool) -> None:
    key, plan = stage_key(run, name)
    folder, record = run.path(name), run.record(name)
    reason = "forced" if force and record else stale_reason(record, key)
    if not reason and record.get("done"):
        print(f"[{number}/{len(STAGES)}] {name}: cached")
        return
    if reason:
        print(f"[{number}/{len(STAGES)}] {name}: redoing ({reason})")
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"[{number}/{len(STAGES)}] {name}: {'resuming' if record else 'running'}")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / STAGE_FILE, {"key": key, "version": __version__, "done": False})
    started = time.perf_counter()
    outputs = STAGES[name][2](run, plan)
    seconds = time.perf_counter() - started
    write_json(
        folder / STAGE_FILE,
        {
            "key": key,
            "version": __version__,
            "done": True,
            "id": uuid.uuid4().hex,
            "seconds": seconds,
            "outputs": outputs,
        },
    )
    print(f"[{number}/{len(STAGES)}] {name}: done in {seconds:.0f} s")


def stage_list(run: Run) -> str:
    lines = []
    for number, name in enumerate(STAGES, 1):
        record = run.record(name)
        state = "done" if record.get("done") else "interrupted" if record else "to do"
        lines.append(f"  [{number}/{len(STAGES)}] {name:<11} {state}")
    return "\n".join(lines)


def reproduce(
    preset: str | ReproduceConfig = "quick",
    out_dir: str | Path = "runs/reproduce",
    force: Iterable[str] = (),
    device: str = "auto",
) -> Path:
    """Run (or resume) the experiment of `preset` in out_dir/<preset> and return that folder; the report is in its
    report/ folder. `force`: stage names to redo (the stages after them follow, as their inputs change)."""
    config = preset_config(preset)
    check_config(config)
    force = list(force)
    unknown = [name for name in force if name not in STAGES]
    if unknown:
        raise CapvectorError(f"unknown stage {unknown[0]!r}; valid stages: {', '.join(STAGES)}")
    root = Path(out_dir, config.preset)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / RUN_FILE, {"version": __version__, "config": dataclasses.asdict(config), "device": device})
    run = Run(config, root.resolve(), device)
    print(f"capvector reproduce: preset {config.preset}, run folder {run.root}\n{stage_list(run)}")
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    try:
        for number, name in enumerate(STAGES, 1):
            run_stage(run, name, number, name in force)
    finally:
        torch.set_num_threads(threads)
    print(f"all stages done in {time.perf_counter() - started:.0f} s; report: {run.path('report', 'report.md')}")
    return run.root
