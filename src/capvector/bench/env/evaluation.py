"""Closed-loop evaluation: success rate per task on placements never used for training.

A policy implements `reset()` and `predict_chunk(observation) -> (k, 4)` actions in [-1, 1]; the harness
executes the k actions before it renders again, and ends an episode at success or after 500 steps.
The observation has the dataset's keys as numpy arrays ("observation.images.scene"/"wrist" uint8
(3, H, W), "observation.state" (4,), "task_index", "instruction") plus "observation.environment_state",
Meta-World's full 39-d observation, which only the scripted expert reads (a learned policy must not).
Episode e of a task starts from placement eval_placement_seed(seed, e) >= 10^9, while demonstrations use
seeds below 10^9 (capvector.bench.env.sim). Workers build the policy from a picklable zero-argument factory.
"""

from __future__ import annotations

import math
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from capvector.bench.env.camera import CAMERAS
from capvector.bench.env.sim import (
    ACTION_DIM,
    CONTROL_HZ,
    MAX_EPISODE_STEPS,
    SimEnv,
    eval_placement_seed,
    parallel_imap,
)
from capvector.bench.env.tasks import TASKS, instruction, resolve_tasks, task_index
from capvector.bench.statistics import wilson_interval
from capvector.errors import CapvectorError

GIF_STRIDE = 4  # simulator steps per GIF frame: 50 ms at Meta-World's 80 Hz
GIF_PIXELS = 192  # about how tall a camera view is shown in a GIF
CAPTION_PIXELS = 28  # a label strip (two lines) above each column of a side-by-side GIF
CAPTION_CHAR_PIXELS = 7  # at most this wide is a character of Pillow's default font
COLUMN_GAP = 6  # white pixels between the columns of a side-by-side GIF


@dataclass
class TaskResult:
    task: str
    episodes: int
    successes: int
    success_rate: float
    ci_low: float
    ci_high: float
    mean_steps: float  # steps per episode, failures counted at the 500-step cap
    placement_seeds: list[int]


@dataclass
class EvalResult:
    variant: str
    seed: int
    tasks: list[TaskResult]
    success_rate: float  # mean of the per-task rates
    wall_s: float
    gifs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class ExpertPolicy:
    """Meta-World's scripted experts behind the policy interface (one action per chunk), to check the harness.

    The class is its own picklable factory: `evaluate(ExpertPolicy, ...)`.
    """

    def reset(self) -> None:
        pass

    def predict_chunk(self, observation: dict) -> np.ndarray:
        from metaworld.policies import ENV_POLICY_MAP

        task = list(TASKS)[int(observation["task_index"])]
        expert = cast(Any, ENV_POLICY_MAP[task])()  # the map's classes are concrete
        action = expert.get_action(observation["observation.environment_state"])
        return np.clip(action, -1.0, 1.0)[None]


def check_policy(policy, env: SimEnv) -> None:
    """Compare what a policy declares in its `config` (if anything) with this benchmark's actions and cameras."""
    config = getattr(policy, "config", None)
    declared_dim = getattr(config, "action_dim", ACTION_DIM)
    if declared_dim != ACTION_DIM:
        raise CapvectorError(
            f"policy predicts {declared_dim}-d actions; Meta-World needs {ACTION_DIM}-d (dx, dy, dz, gripper)"
        )
    cameras = getattr(config, "cameras", None)
    if cameras is not None and not set(cameras) <= set(CAMERAS):
        raise CapvectorError(f"policy expects cameras {list(cameras)}; this benchmark renders {list(CAMERAS)}")
    size = getattr(config, "image_size", env.image_size)
    if size != env.image_size:
        raise CapvectorError(f"policy was trained on {size}x{size} images; evaluate with image_size={size}")


def check_chunk(chunk, task: str) -> np.ndarray:
    chunk = np.asarray(chunk, dtype=np.float32)
    if chunk.ndim != 2 or chunk.shape[1] != ACTION_DIM or len(chunk) == 0:
        raise CapvectorError(
            f"policy returned actions of shape {chunk.shape} on {task}; "
            f"predict_chunk must return (k, {ACTION_DIM}) with k >= 1"
        )
    if not np.isfinite(chunk).all():
        raise CapvectorError(f"policy returned non-finite actions on {task}")
    return chunk


def run_episode(
    env: SimEnv, policy, placement_seed: int, record: bool, max_steps: int = MAX_EPISODE_STEPS
) -> tuple[bool, int, list[np.ndarray]]:
    """One closed-loop episode of at most `max_steps`; renders only when the current action chunk is used up (and,
    when `record`, every GIF_STRIDE steps for a GIF that plays at the simulator's rate). torch's random draws are
    seeded by the placement, so that a policy that draws (a noisy oracle) repeats its episodes."""
    raw = env.reset(placement_seed)
    torch.manual_seed(placement_seed)
    policy.reset()
    queue: list[np.ndarray] = []
    frames: list[np.ndarray] = []
    for step in range(max_steps):
        observation: dict[str, Any] = {}
        if not queue:
            observation |= env.observe(depth=False)
            observation |= {
                "observation.environment_state": raw,
                "task_index": np.int64(task_index(env.task)),
                "instruction": instruction(env.task),
            }
            queue = list(check_chunk(policy.predict_chunk(observation), env.task))
        if record and step % GIF_STRIDE == 0:
            observation = observation or env.observe(depth=False)
            frames.append(np.concatenate([observation[f"observation.images.{c}"] for c in CAMERAS], axis=2))
        raw, success = env.step(queue.pop(0))
        if success:
            return True, step + 1, frames
    return False, max_steps, frames


def run_episodes(
    env: SimEnv, policy, episodes: Iterable[int], seed: int, gif_below: int = 0, max_steps: int = MAX_EPISODE_STEPS
) -> list[tuple]:
    """(task, episode, placement seed, success, steps, frames) per episode of `policy` in `env`; the frames of
    episodes numbered below `gif_below` are kept."""
    check_policy(policy, env)
    rows = []
    for episode in episodes:
        placement_seed = eval_placement_seed(seed, episode)
        success, steps, frames = run_episode(env, policy, placement_seed, episode < gif_below, max_steps)
        rows.append((env.task, episode, placement_seed, success, steps, frames))
    return rows


def evaluate_shard(
    policy_factories: Sequence[Callable[[], Any]],
    task: str,
    episodes: list[int],
    seed: int,
    image_size: int,
    variant: str,
    gif_below: int = 0,
    placement: str = "default",
    decoy: bool = False,
    max_steps: int = MAX_EPISODE_STEPS,
) -> list[list[tuple]]:
    """run_episodes' rows for each policy in turn, on the same placements of one simulator (one job of
    evaluate_many, in a worker process; building a simulator costs more than a few episodes). `placement`, `decoy`:
    SimEnv's."""
    import torch

    env = SimEnv(task, image_size=image_size, variant=variant, placement=placement, decoy=decoy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 inference of a small model: extra threads only wait on each other (5x here)
    try:
        return [run_episodes(env, factory(), episodes, seed, gif_below, max_steps) for factory in policy_factories]
    finally:
        torch.set_num_threads(threads)
        env.close()


def task_result(task: str, rows: list[tuple]) -> TaskResult:
    """The success rate of `task` over its rows (evaluate_shard's), with its 95% Wilson interval."""
    mine = sorted((r for r in rows if r[0] == task), key=lambda r: r[1])
    wins = sum(r[3] for r in mine)
    low, high = wilson_interval(wins, len(mine))
    mean_steps = float(np.mean([r[4] for r in mine]))
    return TaskResult(task, len(mine), wins, wins / len(mine), low, high, mean_steps, [r[2] for r in mine])


def evaluation_jobs(
    policies: int, tasks: list[str], episodes: int, workers: int
) -> list[tuple[list[int], str, list[int]]]:
    """(policy indices, task, episodes) per job: one simulator per job, not per policy, and about two jobs per worker
    (fewer simulators to build, yet the load balances), or one per task for a single worker; a task's episodes are
    split only when policies and tasks are too few to keep every worker busy."""
    pairs = policies * len(tasks)
    per_job = max(1, policies if workers <= 1 else math.ceil(pairs / (2 * workers)))
    parts = max(1, min(episodes, math.ceil(workers / max(1, pairs))))
    return [
        (list(range(first, min(first + per_job, policies))), task, list(range(episodes))[part::parts])
        for task in tasks
        for first in range(0, policies, per_job)
        for part in range(parts)
    ]


def own_placements(training_seed: int, episodes: int) -> int:
    """The first episode of training seed `training_seed`'s own placements among a placement seed's: every training
    seed is evaluated on `episodes` placements of each task of its own (episodes training_seed * episodes onwards),
    every method of one seed on the same ones. So differences stay paired by (seed, task), and a bootstrap over seeds
    samples the placements too, not only the training runs: with one set of placements for every seed, the
    intervals said how a method does on those few placements alone (5 per task in `full`), which moved the oracle's
    lead there from +38 points on the test placements to +15 on the validation ones."""
    return training_seed * episodes


def evaluate_many(
    policy_factories: Sequence[Callable[[], Any]],
    tasks: str | list[str],
    episodes: int,
    seed: int = 0,
    workers: int = 2,
    variant: str = "default",
    image_size: int = 64,
    placement: str = "default",
    decoy: bool = False,
    max_steps: int = MAX_EPISODE_STEPS,
    gif_episodes: int = 0,
    first_episode: int = 0,
) -> Iterator[tuple[int, str, list[tuple]]]:
    """Every policy on the same `episodes` placements of every task: `(policy index, task, rows)` as each pair is
    done (run_episodes' rows, in episode order), so that a caller can save as it goes. The one evaluation path:
    `evaluate`, `capvector reproduce` and `capvector headroom` go through it; a policy's rows do not depend on the
    others evaluated with it. Arguments as `evaluate`'s; `gif_episodes`: frames of the first episodes are kept;
    `first_episode`: the placements are those of episodes first_episode, first_episode + 1, ... of `seed` (so that
    disjoint ranges give disjoint placements of the same seed)."""
    tasks = resolve_tasks(tasks)
    if episodes < 1:
        raise CapvectorError(f"episodes must be at least 1, got {episodes}")
    jobs = [
        (indices, task, [first_episode + e for e in eps])
        for indices, task, eps in evaluation_jobs(len(policy_factories), tasks, episodes, workers)
    ]
    common = (seed, image_size, variant, first_episode + gif_episodes, placement, decoy, max_steps)
    arguments = [([policy_factories[i] for i in indices], task, eps, *common) for indices, task, eps in jobs]
    left = Counter((i, task) for indices, task, _ in jobs for i in indices)  # jobs each (policy, task) waits for
    rows: dict[tuple[int, str], list[tuple]] = defaultdict(list)
    for job, per_policy in parallel_imap(evaluate_shard, arguments, workers):
        indices, task, _ = jobs[job]
        for i, policy_rows in zip(indices, per_policy):
            rows[(i, task)] += policy_rows
            left[(i, task)] -= 1
            if not left[(i, task)]:
                yield i, task, sorted(rows.pop((i, task)), key=lambda row: row[1])


def evaluate(
    policy_factory,
    tasks: str | list[str] = "pretrain",
    episodes: int = 20,
    seed: int = 0,
    workers: int = 2,
    variant: str = "default",
    gif_dir: str | Path | None = None,
    gifs_per_task: int = 1,
    image_size: int = 64,
    placement: str = "default",
    decoy: bool = False,
    max_steps: int = MAX_EPISODE_STEPS,
    on_task: Callable[[TaskResult], None] | None = None,
) -> EvalResult:
    """Success rate per task over `episodes` held-out placements, with 95% Wilson intervals.

    `policy_factory`: picklable zero-argument callable returning a policy (e.g. functools.partial(load, path)),
    or `ExpertPolicy` to evaluate the scripted experts. `variant`: "default" or "new_env" (another
    camera pose, lighting and table colour). `placement`: the placement ranges (capvector.bench.env.sim.PLACEMENTS);
    `decoy`: an oracle's privileged positions come from another placement; `max_steps`: an episode's cap (failures
    cost the most time; Meta-World's is 500, the scripted experts need under 230 on the headroom tasks). GIFs of
    the first `gifs_per_task` episodes per task go to `gif_dir`. `on_task(result)` is called as each task finishes.
    """
    start = time.time()
    tasks = resolve_tasks(tasks)
    done = {}
    for _, task, rows in evaluate_many(
        [policy_factory],
        tasks,
        episodes,
        seed,
        workers,
        variant,
        image_size,
        placement,
        decoy,
        max_steps,
        gif_episodes=gifs_per_task if gif_dir is not None else 0,
    ):
        done[task] = rows
        if on_task is not None:
            on_task(task_result(task, rows))
    results = [task_result(task, done[task]) for task in tasks]
    gifs = []
    if gif_dir is not None:
        Path(gif_dir).mkdir(parents=True, exist_ok=True)
        for task in tasks:
            for _, episode, _, success, _, frames in done[task][:gifs_per_task]:
                path = Path(gif_dir) / f"{variant}_{task}_ep{episode}_{'success' if success else 'fail'}.gif"
                save_gif(path, [enlarge(frame) for frame in frames])
                gifs.append(str(path))
    return EvalResult(
        variant, seed, results, float(np.mean([r.success_rate for r in results])), time.time() - start, gifs
    )


# ---- GIFs -----------------------------------------------------------------------------------------------------------


def enlarge(frame: np.ndarray, size: int = GIF_PIXELS) -> np.ndarray:
    """A recorded frame (3, H, W), cameras side by side, as an (h, w, 3) image about `size` pixels tall per camera
    view (a 32- or 64-pixel camera frame is too small to watch)."""
    zoom = max(1, round(size / frame.shape[1]))
    return frame.transpose(1, 2, 0).repeat(zoom, axis=0).repeat(zoom, axis=1)


def caption(text: str, width: int) -> np.ndarray:
    """A white (CAPTION_PIXELS, width, 3) strip with `text` in black, wrapped on two lines if it needs them."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, CAPTION_PIXELS), "white")
    lines = textwrap.wrap(text, max(1, (width - 8) // CAPTION_CHAR_PIXELS))
    ImageDraw.Draw(strip).multiline_text((4, 2), "\n".join(lines[:2]), fill="black", spacing=2)
    return np.asarray(strip)


def side_by_side(episodes: Sequence[Sequence[np.ndarray]], labels: Sequence[str]) -> list[np.ndarray]:
    """One image per recorded time step with each episode's frame in a column under its label, left to right: the
    cameras of a frame stacked, enlarged, a white gap between columns. An episode that ended (success) holds its
    last frame until the longest one ends, so that a column's frame t is the same moment in every column."""
    if len(episodes) != len(labels) or not episodes or not all(episodes):
        raise CapvectorError("side_by_side needs one label per episode and at least one frame in each")
    length = max(len(frames) for frames in episodes)
    columns = []
    for frames, label in zip(episodes, labels):
        images = [np.concatenate(np.split(enlarge(f), len(CAMERAS), axis=1)) for f in frames]
        images += [images[-1]] * (length - len(images))
        top = caption(label, images[0].shape[1])
        columns.append([np.concatenate([top, image]) for image in images])
    gap = np.full((*columns[0][0].shape[:1], COLUMN_GAP, 3), 255, dtype=np.uint8)
    return [
        np.concatenate([part for column in columns for part in (gap, column[t])][1:], axis=1) for t in range(length)
    ]


def save_gif(path: Path, images: list[np.ndarray]) -> None:
    """(h, w, 3) images taken every GIF_STRIDE steps, each shown for as long as those steps take (real time)."""
    from PIL import Image

    images = [*images, *[images[-1]] * 10]  # hold the last frame for half a second
    # one palette for the whole GIF, from its first, middle and last images: quantizing every frame on its own (as
    # imageio did here before) took 8x longer: 120 frames of 984 x 412, 44 s against 5.6 s on the loaded 2-core VM
    sample = np.concatenate([images[0], images[len(images) // 2], images[-1]])
    palette = Image.fromarray(sample).quantize(256, method=Image.Quantize.MEDIANCUT)
    frames = [Image.fromarray(image).quantize(palette=palette, dither=Image.Dither.NONE) for image in images]
    # GIF delays are whole centiseconds, and viewers slow anything under 20 ms down: hence a frame every GIF_STRIDE
    # steps rather than every step; identical frames in a row are stored once with their delays added
    delay = 1000 * GIF_STRIDE // CONTROL_HZ
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=delay, loop=0)
