"""`capvector reproduce`: the paper's experiment end to end on the embedded benchmark, every stage cached.

    run_dir = reproduce(preset="quick", out_dir="runs/reproduce", force=(), device="auto")

Stages (run by capvector.bench.experiment.stages, each a folder of the run: capvector.bench.experiment.layout):
  demos       scripted-expert demonstrations of the pretraining, extraction (D_ext) and downstream tasks
  teacher     the teacher objective's frozen 3D teacher, pretrained on frames it records of the pretraining tasks
  pretrain    theta_pt: SFT from scratch on the pretraining tasks
  extract     theta_ft (sft) and theta_ao (aux) from theta_pt on D_ext, identical settings
  vector      gamma = theta_ao - theta_ft, tau = theta_ft - theta_pt, theta_meta = theta_pt + alpha * gamma
  select      with select_alpha: CapVector at every candidate alpha, evaluated on validation placements; the best
              alpha is the one every later stage uses
  downstream  (a)-(e) of the protocol's methods on the held-out tasks, every seed, a checkpoint at every budget
  ablations   alpha sweep, lambda sweep, and a long run with and without L_orth (first seed)
  evaluate    every checkpoint on new placements, in-domain and in the "new environment" variant
  report      report.md, results.json and plots (capvector.bench.experiment.report)
The regime (the auxiliary objective, the placement ranges, the in-domain look: ReproduceConfig's objective, placement
and variant) is part of the plans of the stages it shapes.
What is trained and evaluated is capvector.bench.experiment.protocol; this module plans each stage from it and
carries the plans out. An interrupted stage keeps what it finished and resumes its training runs from their last
checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from capvector import __version__
from capvector.bench import recipe
from capvector.bench.env.dataset import DemoDataset, open_meta
from capvector.bench.env.features import PRIVILEGED_DIM
from capvector.bench.env.sim import parallel_imap
from capvector.bench.experiment.layout import (
    GAMMA,
    WALL_FILE,
    RunLayout,
    checkpoint_folder,
    trained_policy,
    wall_file,
)
from capvector.bench.experiment.protocol import (
    CONTROL_EXTRACTION,
    DECOY,
    EXTRACT_STRATEGIES,
    METHODS,
    OBJECTIVES,
    ORACLE,
    VECTORS,
    DownstreamRun,
    ReproduceConfig,
    ablation_runs,
    ablation_seeds,
    alpha_candidates,
    check_config,
    control_config,
    decoy_checkpoints,
    downstream_runs,
    evaluated_checkpoints,
    evaluated_variants,
    evaluation_key,
    evaluation_name,
    first_episode,
    first_test_episodes,
    preset_config,
    run_label,
    run_name,
    selection_runs,
    split_tasks,
    start_point,
    teacher_pretraining,
    with_chosen_alpha,
)
from capvector.bench.experiment.report import Evaluations, write_report
from capvector.bench.experiment.stages import Pipeline, Plan, Stage
from capvector.bench.policy.modeling_policy import Policy
from capvector.bench.teacher.pretraining import pretrain_teacher, pretraining_summary, record_frames
from capvector.files import read_json, write_json
from capvector.params.merging import merge
from capvector.params.vectors import extract
from capvector.training.checkpointing import STATE_FILE, checkpoint_dirs
from capvector.training.config import CONFIG_FILE, TrainConfig, config_hash, result_fields, save_config
from capvector.training.engine import train
from capvector.training.preflight import pick_device


class Run:
    """One run of the protocol: its config, its folder, and the datasets loaded once."""

    def __init__(self, config: ReproduceConfig, layout: RunLayout, device: str):
        self.config, self.layout, self.device = config, layout, device
        self.workers = config.workers or os.cpu_count() or 1
        self._datasets: dict[tuple[str, bool], DemoDataset] = {}

    @property
    def protocol(self) -> ReproduceConfig:
        """The config the stages after the selection plan with: alpha the chosen one (protocol.with_chosen_alpha)."""
        return with_chosen_alpha(self.config, pipeline(self.layout).record("select").get("outputs"))

    def dataset(self, root: str, depth: bool) -> DemoDataset:
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
        control: bool = False,
        **fields: Any,
    ) -> TrainConfig:
        """A training run on the demonstrations of `split`, with the control objective as its auxiliary one if
        `control`; `fields` set or override TrainConfig fields."""
        root, c = str(self.layout.demos(split)), control_config(self.config) if control else self.config
        aux, objective = fields.get("strategy") == "aux", OBJECTIVES[c.objective]
        settings: dict[str, Any] = {
            "out_dir": str(out_dir),
            "steps": steps,
            "lr": lr,
            "min_lr": lr / 10,
            "seed": seed,
            "batch_size": c.batch_size,
            "warmup_steps": c.warmup_steps,
            "device": self.device,
            "policy": "capvector.bench.recipe:policy",
            "policy_args": {} if init_from else {"dataset": root, **c.policy},
            "init_from": str(init_from) if init_from else None,
            "dataset": "capvector.bench.recipe:dataset",
            # depth maps are read only by an objective that needs them, which never runs on the pretraining set
            "dataset_args": {"root": root, "depth": objective.depth and split != "pretrain"},
            "auxiliary": objective.recipe if aux else "",
            "auxiliary_args": objective.args(c, self.layout, root) if aux else {},
            "lora_rank": c.lora_rank,
            "lora_alpha": 2.0 * c.lora_rank,
            "checkpoint_every": steps,
            "keep_checkpoints": 0,
            "log_every": max(1, min(10, steps // 4)),
            "tensorboard": False,
        }
        return TrainConfig(**(settings | fields))


def run_training(run: Run, config: TrainConfig) -> Path:
    """Train unless out_dir already holds the finished policy, or another finished run of this run folder is its
    twin (then its files are hard-linked in: the selection's CapVector runs at the chosen alpha are the method's own
    runs on those seeds); continue from the last checkpoint if interrupted."""
    out_dir = Path(config.out_dir)
    if trained_policy(out_dir).exists():
        return out_dir
    twin = finished_twin(run.layout, config)
    if twin is not None:
        linking = out_dir.with_name(f"{out_dir.name}.linking")  # renamed when whole: a killed copy is never a run
        shutil.rmtree(linking, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(twin, linking, copy_function=os.link, ignore=shutil.ignore_patterns(CONFIG_FILE, WALL_FILE))
        save_config(config, linking / CONFIG_FILE)
        write_json(wall_file(linking), (read_json(wall_file(twin)) or {}) | {"reused": run_name(run.layout, twin)})
        os.replace(linking, out_dir)
        return out_dir
    resume = bool(checkpoint_dirs(out_dir))
    if not resume:
        shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    train(dataclasses.replace(config, resume=resume), dataset=run.dataset(**config.dataset_args))
    seconds = time.perf_counter() - started
    write_json(wall_file(out_dir), {"seconds": seconds, "resumed": resume, "config_hash": config_hash(config)})
    for state in out_dir.glob(f"checkpoints/*/{STATE_FILE}"):  # finished: only the policies are needed now
        state.unlink()
    return out_dir


def finished_twin(layout: RunLayout, config: TrainConfig) -> Path | None:
    """A finished training run of the run folder with the same result fields as `config` (so the same weights: every
    run is seeded) and a checkpoint at every step `config` saves one, or None."""
    wanted, every = config_hash(config), config.checkpoint_every
    for wall in sorted(layout.root.glob(f"*/**/{WALL_FILE}")):
        folder = wall.parent
        if (
            folder != Path(config.out_dir)
            and (read_json(wall) or {}).get("config_hash") == wanted
            and trained_policy(folder).exists()
            and all(checkpoint_folder(folder, step).exists() for step in range(every, config.steps + 1, every))
        ):
            return folder
    return None


# ---- the stages: what each plans and does -------------------------------------------------------------------------


def plan_demos(run: Run) -> Plan:
    c = run.config
    return {
        split: {
            "tasks": tasks,
            "episodes": getattr(c, f"{split}_episodes"),
            "seed": c.demo_seed,
            "image_size": c.image_size,
            "placement": c.placement,
            "variant": c.variant,
        }
        for split, tasks in split_tasks(c).items()
    }


def do_demos(run: Run, plan: Plan) -> dict[str, Any]:
    from capvector.bench.env.demos import generate_demonstrations

    for split, job in plan.items():
        folder = run.layout.demos(split)
        if not folder.exists():  # written whole (renamed at the end): present means complete
            print(f"  {split}: {len(job['tasks'])} tasks x {job['episodes']} demonstrations")
            generate_demonstrations(
                folder,
                job["tasks"],
                job["episodes"],
                seed=job["seed"],
                image_size=job["image_size"],
                workers=run.workers,
                variant=job["variant"],
                placement=job["placement"],
            )
    return {split: open_meta(run.layout.demos(split)).info["total_episodes"] for split in plan}


def plan_teacher(run: Run) -> Plan:
    c = run.config
    if not OBJECTIVES[c.objective].teacher:
        return {}
    settings = teacher_pretraining(c, run.layout)
    frames = {"tasks": c.pretrain_tasks, "image_size": c.image_size, "variant": c.variant, "placement": c.placement}
    return {"pretraining": dataclasses.asdict(settings), "frames": frames}


def do_teacher(run: Run, plan: Plan) -> dict[str, Any]:
    """Record the teacher's frames (VGGT's role: a model pretrained on data of its own, here more episodes of the
    pretraining tasks than the policy's demonstrations) and pretrain it; its validation errors and the acceptance
    probe of its features are the outputs."""
    if not plan:
        return {}
    settings, folder = teacher_pretraining(run.config, run.layout), run.layout.teacher_frames
    if not folder.exists():  # written whole (renamed at the end): present means complete
        frames = plan["frames"]
        print(f"  teacher frames: {settings.episodes_per_task} episodes of each pretraining task")
        record_frames(dataclasses.replace(settings, workers=run.workers), folder, frames["tasks"], frames["variant"])
    with lone_run_threads(run):
        return pretraining_summary(pretrain_teacher(settings, run.layout.teacher))


def plan_pretrain(run: Run) -> Plan:
    c = run.config
    every = max(1, c.pretrain_steps // 4)
    return {
        "pretrain": run.train_config(
            run.layout.pretrain, "pretrain", c.pretrain_steps, c.pretrain_lr, c.train_seed, None, checkpoint_every=every
        )
    }


def plan_extract(run: Run) -> Plan:
    """theta_ft and theta_ao from theta_pt with identical settings, and with a control objective its theta_ao."""
    c, layout = run.config, run.layout
    every = max(1, c.extract_steps // 2)
    runs = [(strategy, strategy, False) for strategy in EXTRACT_STRATEGIES]
    if c.control is not None:
        runs.append((CONTROL_EXTRACTION, "aux", True))
    return {
        name: run.train_config(
            layout.extract(name),
            "extract",
            c.extract_steps,
            c.extract_lr,
            c.train_seed,
            layout.pretrained,
            control=control,
            strategy=strategy,
            checkpoint_every=every,
        )
        for name, strategy, control in runs
    }


def train_in_worker(config: ReproduceConfig, layout: RunLayout, device: str, train_config: TrainConfig) -> str:
    """run_training in a spawned process (parallel_imap's worker: one torch thread), which reads its dataset anew."""
    return str(run_training(Run(config, layout, device), train_config))


def side_by_side(run: Run) -> bool:
    """Whether training runs go side by side, one per core: on a CPU with single-threaded training (threads 1:
    measured faster than one run on two threads); else one at a time (a GPU, or torch's own threads over every core)."""
    return run.config.threads == 1 and pick_device(run.device).type == "cpu"


def training_processes(run: Run, runs: int) -> int:
    """How many training runs go at once (side_by_side)."""
    return min(run.workers, runs) if side_by_side(run) else 1


@contextlib.contextmanager
def lone_run_threads(run: Run) -> Iterator[None]:
    """A lone training run on a CPU, where the config trains single-threaded so that runs go side by side (threads
    1), gets a thread per core: on an idle 2-core machine two threads ran the full policy's training step 1.6x and
    the teacher's 1.65x and quick's 400-step pretraining 1.2x faster than one (benchmarks/policy_speed.py --threads 1
    and 2; the others timed alike in stop 30)."""
    if not side_by_side(run):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(run.workers)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def do_training(run: Run, plan: Plan) -> dict[str, Any]:
    """Every training run of the plan; independent runs on a CPU go in parallel (each seeded: the same weights)."""
    names, configs = list(plan), list(plan.values())
    for name, config in plan.items():
        print(f"  {name}: {config.strategy}, {config.finetune}, {config.steps} steps")
    processes = training_processes(run, len(configs))
    if processes == 1:  # here, on the run's datasets read once
        with lone_run_threads(run) if len(configs) == 1 else contextlib.nullcontext():
            for name, config in plan.items():
                run_training(run, config)
                print(f"  {name}: trained")
        return {}
    jobs = [(run.config, run.layout, run.device, config) for config in configs]
    for i, _ in parallel_imap(train_in_worker, jobs, processes):
        print(f"  {names[i]}: trained")
    return {}


def plan_vector(run: Run) -> Plan:
    layout = run.layout
    return {
        "alpha": run.config.alpha,
        "aux": str(layout.auxiliary),
        "sft": str(layout.finetuned),
        "pretrained": str(layout.pretrained),
    }


def merged(run: Run, alpha: float, vector: str = GAMMA) -> Path:
    """theta_pt + alpha * the vector `vector` (VECTORS), written once per alpha and vector."""
    layout = run.layout
    path = layout.theta_meta(alpha, vector)
    if not path.exists():
        if not layout.vector(vector).exists():  # gamma comes from the vector stage, the others from here
            source, excluded = VECTORS[vector]
            extract(
                trained_policy(layout.extract(source)),
                layout.finetuned,
                layout.vector(vector),
                exclude=excluded,
            ).close()
        merge(layout.pretrained, layout.vector(vector), path, alpha=alpha)
    return path


def do_vector(run: Run, plan: Plan) -> dict[str, Any]:
    gamma_dir, tau_dir = run.layout.gamma, run.layout.tau
    # extract writes both; a half-finished pair is redone, and the vectors and merges made from a previous
    # extraction go with it (a capvector run refuses a theta_meta merged from another vector)
    stale = [run.layout.vector(name) for name in VECTORS] + [tau_dir, *run.layout.theta_metas()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    gamma = extract(plan["aux"], plan["sft"], gamma_dir, pretrained=plan["pretrained"], task_vector_output=tau_dir)
    summary = {"tensors": len(gamma), "global_norm": gamma.metadata.get("global_norm")}
    gamma.close()
    merged(run, plan["alpha"])
    return summary


def downstream_config(run: Run, spec: DownstreamRun) -> TrainConfig:
    c, method = run.config, METHODS[spec.method]
    fields: dict[str, Any] = {}
    if method.strategy == "capvector":
        fields = {"vector": str(run.layout.vector(spec.vector)), "orth_lambda": spec.orth_lambda}
    if spec.method == ORACLE:
        fields = {"policy_args": {"dataset": str(run.layout.demos("downstream")), "privileged_dim": PRIVILEGED_DIM}}
    return run.train_config(
        spec.folder,
        "downstream",
        spec.steps,
        c.lora_lr if method.finetune == "lora" else c.downstream_lr,
        spec.seed,
        start_point(run.layout, spec),
        control=method.objective == "control",
        strategy=method.strategy,
        finetune=method.finetune,
        checkpoint_every=spec.checkpoint_every,
        schedule="constant",
        **fields,
    )


def training_plan(run: Run, runs: list[DownstreamRun]) -> Plan:
    return {run_name(run.layout, r.folder): downstream_config(run, r) for r in runs}


def evaluation_plan(
    config: ReproduceConfig,
    checkpoints: dict[str, tuple[str, str | None]],
    seed: int,
    variants: list[str],
    first_episodes: dict[str, int] | None = None,
) -> Plan:
    """What evaluate_checkpoints does: `checkpoints` on every held-out task, on the placements of `seed` (from
    episode `first_episodes[name]` of it where given, else the first)."""
    return {
        "checkpoints": checkpoints,
        "tasks": split_tasks(config)["downstream"],
        "episodes": config.eval_episodes,
        "seed": seed,
        "variants": variants,
        "placement": config.placement,
    } | ({"first_episodes": first_episodes} if first_episodes else {})


def plan_select(run: Run) -> Plan:
    c, layout = run.config, run.layout
    if not c.select_alpha:
        return {}
    runs = selection_runs(c, layout)
    checkpoints, first = evaluated_checkpoints(c, layout, runs), first_test_episodes(c, layout, runs)
    return {
        "candidates": alpha_candidates(c),
        "training": training_plan(run, runs),
        "evaluation": evaluation_plan(c, checkpoints, c.validation_seed, [c.variant], first),
    }


def candidate_means(layout: RunLayout, runs: list[DownstreamRun], plan: Plan, path: Path) -> dict[float, float]:
    """alpha -> mean success over (seed, task) of the selection `runs` at that alpha, as evaluated into `path` by
    plan_select's evaluation (`plan`)."""
    evaluation = plan["evaluation"]
    (variant,) = evaluation["variants"]
    validation = Evaluations(layout, (variant,), path)
    return {
        alpha: float(
            validation.cells(
                [r.folder for r in runs if r.alpha == alpha], runs[0].steps, variant, evaluation["tasks"]
            ).mean()
        )
        for alpha in plan["candidates"]
    }


def do_select(run: Run, plan: Plan) -> dict[str, Any]:
    """CapVector at every candidate alpha, evaluated on the validation placements (each seed on its own); the chosen
    alpha has the best mean success over (seed, task) (ties: the earlier candidate). Its record's outputs are what
    Run.protocol reads."""
    if not plan:
        return {}
    layout, runs = run.layout, selection_runs(run.config, run.layout)
    for alpha in plan["candidates"]:
        merged(run, alpha)
    do_training(run, plan["training"])
    evaluation = plan["evaluation"]
    evaluate_checkpoints(run, evaluation, layout.validation)
    means = candidate_means(layout, runs, plan, layout.validation)
    chosen = max(plan["candidates"], key=lambda alpha: means[alpha])
    print(f"  alpha {chosen:g} chosen: " + ", ".join(f"{a:g}: {100 * m:.1f}%" for a, m in means.items()))
    return {
        "alpha": chosen,
        "candidates": plan["candidates"],
        "validation": {f"{a:g}": round(100 * m, 1) for a, m in means.items()},
        "seeds": ablation_seeds(run.config),
        "placement_seed": evaluation["seed"],
    }


def plan_downstream(run: Run) -> Plan:
    return training_plan(run, downstream_runs(run.protocol, run.layout))


def plan_ablations(run: Run) -> Plan:
    return training_plan(run, ablation_runs(run.protocol, run.layout))


def train_merged(run: Run, plan: Plan, specs: list[DownstreamRun]) -> dict[str, Any]:
    """The theta_meta each run from theta_meta starts from (merged once per alpha and vector), then the runs."""
    for spec in specs:
        if spec.start == "meta":
            merged(run, spec.alpha, spec.vector)
    return do_training(run, plan)


def do_downstream(run: Run, plan: Plan) -> dict[str, Any]:
    return train_merged(run, plan, downstream_runs(run.protocol, run.layout))


def do_ablations(run: Run, plan: Plan) -> dict[str, Any]:
    return train_merged(run, plan, ablation_runs(run.protocol, run.layout))


def plan_evaluate(run: Run) -> Plan:
    c = run.protocol
    checkpoints, first = evaluated_checkpoints(c, run.layout), first_test_episodes(c, run.layout)
    plan = evaluation_plan(c, checkpoints, c.eval_seed, list(evaluated_variants(c)), first)
    decoys = decoy_checkpoints(c, run.layout)
    return plan | ({"decoys": decoys} if decoys else {})


def trained_loader(path: str, base: str | None) -> functools.partial[Policy]:
    """A picklable factory of the policy in `path` (a LoRA adapter folder is applied to `base`)."""
    return functools.partial(recipe.load_trained, path, base=base)


def do_evaluate(run: Run, plan: Plan) -> dict[str, Any]:
    return {"evaluations": len(evaluate_checkpoints(run, plan, run.layout.evaluations))}


def evaluate_checkpoints(run: Run, plan: Plan, path: Path) -> dict[str, Any]:
    """Every checkpoint of `plan` (evaluation_plan's) on its placements of every task (a checkpoint's, from its
    first episode), in every variant, and its `decoys` once more in the first variant with another placement's
    positions (kept under DECOY), through the evaluation harness (capvector.bench.env.evaluation.evaluate_many);
    saved into `path` as it goes (a killed stage keeps what it evaluated). Returns every result in `path`."""
    from capvector.bench.env.evaluation import evaluate_many, task_result

    results = read_json(path) or {}
    passes = [(variant, variant, list(plan["checkpoints"])) for variant in plan["variants"]]
    passes.append((DECOY, plan["variants"][0], plan.get("decoys", [])))
    first_episodes = plan.get("first_episodes", {})
    # (key, look, tasks not evaluated yet, first episode) -> names
    todo: dict[tuple[str, str, tuple[str, ...], int], list[str]] = {}
    for label, variant, names in passes:
        for name in names:
            done = results.get(evaluation_key(name, label), {}).get("tasks", {})
            missing = tuple(task for task in plan["tasks"] if task not in done)
            if missing:
                todo.setdefault((label, variant, missing, first_episodes.get(name, 0)), []).append(name)
    finished, total = 0, sum(len(tasks) * len(names) for (_, _, tasks, _), names in todo.items())
    started = last_print = time.perf_counter()
    for (label, variant, tasks, first), names in todo.items():
        factories = [trained_loader(*plan["checkpoints"][name]) for name in names]
        outcomes = evaluate_many(
            factories,
            list(tasks),
            plan["episodes"],
            plan["seed"],
            run.workers,
            variant,
            run.config.image_size,
            placement=plan["placement"],
            decoy=label == DECOY,
            first_episode=first,
        )
        for i, task, rows in outcomes:
            result = dataclasses.asdict(task_result(task, rows))
            results.setdefault(evaluation_key(names[i], label), {"tasks": {}})["tasks"][task] = result
            write_json(path, results)
            finished += 1
            if finished == total or time.perf_counter() - last_print > 30:
                last_print = time.perf_counter()
                print(f"  evaluated {finished}/{total} (checkpoint, task, variant) in {last_print - started:.0f} s")
    return results


def side_by_side_episode(run: Run) -> dict[str, Any]:
    """Every method's first-seed policy at the largest budget on the first evaluation placement of the first
    held-out task, in-domain (the tables' first episode of that cell), recorded into one GIF, methods left to
    right; returns what it shows."""
    from capvector.bench.env.evaluation import evaluate_many, save_gif, side_by_side

    c, layout = run.protocol, run.layout
    seed, steps, task = c.seeds[0], c.budgets[-1], split_tasks(c)["downstream"][0]
    checkpoints = evaluated_checkpoints(c, layout)
    names = [evaluation_name(layout, layout.downstream(m, seed), steps) for m in c.methods]
    factories = [trained_loader(*checkpoints[name]) for name in names]
    episodes = {
        i: rows[0]
        for i, _, rows in evaluate_many(
            factories,
            [task],
            1,
            c.eval_seed,
            run.workers,
            variant=c.variant,
            image_size=c.image_size,
            placement=c.placement,
            gif_episodes=1,
            first_episode=first_episode(c, seed),
        )
    }
    outcomes = {}
    for i, method in enumerate(c.methods):
        _, _, placement_seed, success, length, _ = episodes[i]
        label = f"{METHODS[method].label.split(' ')[0]} {method}: " + (
            f"success in {length} steps" if success else "fail"
        )
        outcomes[method] = {"success": bool(success), "steps": length, "label": label}
    frames = side_by_side([episodes[i][5] for i in range(len(c.methods))], [o["label"] for o in outcomes.values()])
    layout.report.mkdir(parents=True, exist_ok=True)
    save_gif(layout.plot("side_by_side"), frames)
    return {"task": task, "placement_seed": placement_seed, "seed": seed, "steps": steps, "methods": outcomes}


def plan_report(run: Run) -> Plan:
    return {"config": dataclasses.asdict(run.protocol), "version": __version__}


def do_report(run: Run, plan: Plan) -> dict[str, Any]:
    stages = pipeline(run.layout)
    selection, teacher = (stages.record(name).get("outputs") or None for name in ("select", "teacher"))
    report = write_report(run.protocol, run.layout, stages.seconds(), side_by_side_episode(run), selection, teacher)
    return {"report": str(report)}


STAGES: dict[str, Stage[Run]] = {
    stage.name: stage
    for stage in [
        Stage("demos", (), plan_demos, do_demos),
        Stage("teacher", (), plan_teacher, do_teacher),
        Stage("pretrain", ("demos",), plan_pretrain, do_training),
        Stage("extract", ("demos", "teacher", "pretrain"), plan_extract, do_training),
        Stage("vector", ("pretrain", "extract"), plan_vector, do_vector),
        Stage("select", ("demos", "pretrain", "vector"), plan_select, do_select),
        Stage(
            "downstream",
            ("demos", "teacher", "pretrain", "extract", "vector", "select"),
            plan_downstream,
            do_downstream,
        ),
        Stage("ablations", ("demos", "teacher", "pretrain", "vector", "select"), plan_ablations, do_ablations),
        Stage("evaluate", ("select", "downstream", "ablations"), plan_evaluate, do_evaluate),
        Stage("report", ("vector", "select", "downstream", "ablations", "evaluate"), plan_report, do_report),
    ]
}


def describe(value: Any) -> Any:
    """What a stage's key hashes of a plan's value: a training config's result fields (not its bookkeeping)."""
    return result_fields(value) if isinstance(value, TrainConfig) else value


def pipeline(layout: RunLayout) -> Pipeline[Run]:
    return Pipeline(STAGES, layout, describe)


def reproduce(
    preset: str | ReproduceConfig = "quick",
    out_dir: str | Path = "runs/reproduce",
    force: Iterable[str] = (),
    device: str = "auto",
) -> Path:
    """Run (or resume) the experiment of `preset` (a name or a config) in out_dir/<run_label> (the preset's name,
    and the regime where it is not the preset's) and return that folder; the report is in its report/ folder.
    `force`: stage names to redo (the stages after them follow, as their inputs change)."""
    config = preset_config(preset)
    check_config(config)
    force = list(force)
    root = Path(out_dir, run_label(config))
    stages = pipeline(RunLayout(root.resolve()))
    stages.check(force)
    root.mkdir(parents=True, exist_ok=True)
    layout = stages.layout
    write_json(layout.run_file, {"version": __version__, "config": dataclasses.asdict(config), "device": device})
    print(
        f"capvector reproduce: preset {config.preset}, objective {config.objective}, placement {config.placement}, "
        f"variant {config.variant}, run folder {layout.root}\n{stages.listing()}"
    )
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    try:
        stages.run(Run(config, layout, device), force)
    finally:
        torch.set_num_threads(threads)
    print(f"all stages done in {time.perf_counter() - started:.0f} s; report: {layout.report_file}")
    return layout.root
