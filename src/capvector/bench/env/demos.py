"""Scripted-expert demonstrations written as a LeRobot v3.0 dataset folder (capvector.bench.env.lerobot_format),
with the capvector block of capvector.bench.env.dataset.

Each task's episode slot e tries placements demo_placement_seed(seed, e, 0), (seed, e, 1), ... and keeps
the first episode the expert finishes successfully, so the dataset is a pure function of
(tasks, episodes_per_task, seed, image_size, variant) and every episode records its placement seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from capvector.bench.env.camera import CAMERAS, intrinsics
from capvector.bench.env.dataset import CAPVECTOR_META, DEPTH_SCALE, FORMAT_VERSION, depth_key, image_key
from capvector.bench.env.features import (
    ACTION_KEY,
    PIXEL_FIELDS,
    PIXEL_POINTS,
    PIXELS_KEY,
    PRIVILEGED_KEY,
    PRIVILEGED_NAMES,
    STATE_KEY,
)
from capvector.bench.env.lerobot_format import Episode, write_dataset
from capvector.bench.env.sim import (
    ACTION_DIM,
    CONTROL_HZ,
    MAX_ATTEMPTS,
    MAX_EPISODE_STEPS,
    SimEnv,
    demo_placement_seed,
    parallel_map,
    shards,
    when_tasks_finish,
)
from capvector.bench.env.tasks import instruction, resolve_tasks
from capvector.errors import CapvectorError
from capvector.files import atomic_path


def record_episode(env: SimEnv, expert, placement_seed: int, frame_stride: int = 1) -> dict | None:
    """Run the expert from a placement, recording what the cameras see before every `frame_stride`-th action (and
    that action); None on failure. Rendering is most of an episode's cost, so a stride saves most of it."""
    obs = env.reset(placement_seed)
    frames = []
    for step in range(MAX_EPISODE_STEPS):
        frame = env.observe(depth=True) if step % frame_stride == 0 else None
        action = np.clip(expert.get_action(obs), -1.0, 1.0).astype(np.float32)
        obs, success = env.step(action)
        if frame is not None:
            frame["action"] = action
            frames.append(frame)
        if success:
            episode = {key: np.stack([f[key] for f in frames]) for key in frames[0]}
            for camera in CAMERAS:  # stored as uint16 millimetres
                depth = np.round(episode[depth_key(camera)] * DEPTH_SCALE)
                episode[depth_key(camera)] = np.clip(depth, 0, 65535).astype(np.uint16)
            return episode
    return None


def record_shard(
    task: str, episodes: list[int], seed: int, image_size: int, variant: str, placement: str, frame_stride: int
) -> tuple[dict, list[dict]]:
    """Camera facts and successful demonstrations of `task` for the given episode slots (runs in a worker)."""
    env = SimEnv(task, image_size=image_size, variant=variant, placement=placement)
    expert = env.expert()
    out = []
    for episode in episodes:
        for attempt in range(MAX_ATTEMPTS):
            placement_seed = demo_placement_seed(seed, episode, attempt)
            frames = record_episode(env, expert, placement_seed, frame_stride)
            if frames is not None:
                out.append({"name": task, "slot": episode, "placement_seed": placement_seed, "frames": frames})
                break
        else:
            raise CapvectorError(f"the scripted expert failed {MAX_ATTEMPTS} placements in a row on {task}")
    env.close()
    return {"camera_fovy": env.camera_fovy, "fps": 1.0 / env.env.dt}, out


def camera_facts(fovy: float, size: int) -> dict[str, float]:
    """A camera's field of view and pinhole intrinsics (capvector.bench.env.camera) for the capvector block."""
    K = intrinsics(fovy, size, size)
    return {"fovy": fovy, "height": size, "width": size, "cx": K[0, 2], "cy": K[1, 2], "f": K[0, 0]}


def frame_features(image_size: int) -> dict[str, dict[str, Any]]:
    """The recorded features, as LeRobotDataset.create takes them: camera images and millimetre depth maps as
    `image` features, named state, privileged and action dimensions."""
    shape = {"names": ["channels", "height", "width"]}
    features: dict[str, dict[str, Any]] = {
        image_key(c): {"dtype": "image", "shape": [3, image_size, image_size], **shape} for c in CAMERAS
    }
    features |= {
        depth_key(c): {
            "dtype": "image",
            "shape": [1, image_size, image_size],
            **shape,
            "info": {"is_depth_map": True, "depth_unit": "mm"},  # uint16, clipped at 65.535 m
        }
        for c in CAMERAS
    }
    vector = {
        STATE_KEY: ["hand_x", "hand_y", "hand_z", "gripper"],
        PRIVILEGED_KEY: list(PRIVILEGED_NAMES),
        PIXELS_KEY: [f"{c}_{p}_{f}" for c in CAMERAS for p in PIXEL_POINTS for f in PIXEL_FIELDS],
        ACTION_KEY: ["dx", "dy", "dz", "gripper"],
    }
    features |= {key: {"dtype": "float32", "shape": [len(names)], "names": names} for key, names in vector.items()}
    assert len(vector[ACTION_KEY]) == ACTION_DIM
    return features | {key: {"dtype": "bool", "shape": [1], "names": None} for key in ("next.success", "next.done")}


def write_demonstrations(root: Path, recorded: list[dict], image_size: int, fps: int, block: dict[str, Any]) -> None:
    """The dataset folder `root`: the recorded episodes in LeRobot v3.0 and `block` as its CAPVECTOR_META."""
    episodes = []
    for e in recorded:
        last = np.arange(len(e["frames"][ACTION_KEY])) == len(e["frames"][ACTION_KEY]) - 1
        frames = {**e["frames"], "next.success": last, "next.done": last}
        extra = {"name": e["name"], "placement_seed": e["placement_seed"]}
        episodes.append(Episode(instruction(e["name"]), frames, extra))
    write_dataset(root, episodes, frame_features(image_size), fps, robot_type="sawyer")
    (root / CAPVECTOR_META).write_text(json.dumps(block, indent=1))


def generate_demonstrations(
    out_dir: str | Path,
    tasks: str | list[str] = "pretrain",
    episodes_per_task: int = 50,
    seed: int = 0,
    image_size: int = 64,
    workers: int = 2,
    variant: str = "default",
    placement: str = "default",
    overwrite: bool = False,
    on_task: Callable[[str, int, int], None] | None = None,
    frame_stride: int = 1,
) -> Path:
    """Record `episodes_per_task` successful expert demonstrations per task into the dataset folder `out_dir`.

    `frame_stride` k > 1 records every k-th control step only (a dataset at 1/k of the simulator's rate, for readers
    of observations alone, such as the teacher's pretraining: its actions are those of the recorded steps); k must
    divide the simulator's rate (80 Hz), as LeRobot's fps is an integer.

    `tasks`: task or split names (list or comma-separated). Written to a temporary folder beside
    `out_dir` and renamed at the end; an existing `out_dir` is replaced only with `overwrite`. `on_task(task,
    episodes, frames)` is called as each task's demonstrations are recorded.
    """
    out_dir = Path(out_dir)
    tasks = resolve_tasks(tasks)
    if episodes_per_task < 1:
        raise CapvectorError(f"episodes_per_task must be at least 1, got {episodes_per_task}")
    if frame_stride < 1 or CONTROL_HZ % frame_stride:
        raise CapvectorError(f"frame_stride {frame_stride} must divide the simulator's rate, {CONTROL_HZ} steps/s")
    if out_dir.exists() and not overwrite:
        raise CapvectorError(f"{out_dir} already exists; choose another folder or pass overwrite")
    jobs = [
        (task, slots, seed, image_size, variant, placement, frame_stride)
        for task, slots in shards(tasks, episodes_per_task, workers)
    ]
    done = on_task and when_tasks_finish(
        [job[0] for job in jobs],
        lambda task, parts: on_task(
            task, sum(len(e) for _, e in parts), sum(len(x["frames"]["action"]) for _, e in parts for x in e)
        ),
    )
    results = parallel_map(record_shard, jobs, workers, done)
    facts = results[0][0]
    recorded = [e for _, shard in results for e in shard]
    order = {task: i for i, task in enumerate(tasks)}
    recorded.sort(key=lambda e: (order[e["name"]], e["slot"]))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    block = {
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "placement": placement,
        "seed": seed,
        "tasks": tasks,
        "frame_stride": frame_stride,
        "source": "metaworld scripted experts (metaworld.policies), successful episodes only",
        "cameras": {c: camera_facts(facts["camera_fovy"][c], image_size) for c in CAMERAS},
    }
    assert abs(facts["fps"] - CONTROL_HZ) < 1e-6, facts["fps"]
    fps = CONTROL_HZ // frame_stride
    with atomic_path(out_dir) as temporary:
        write_demonstrations(temporary, recorded, image_size, fps, block)
    return out_dir
