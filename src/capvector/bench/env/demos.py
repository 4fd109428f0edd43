"""Scripted-expert demonstrations written as a dataset folder (format: capvector.bench.env.dataset).

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
import pyarrow as pa
import pyarrow.parquet as pq

from capvector.bench.env import dataset as fmt
from capvector.bench.env.camera import CAMERAS, intrinsics
from capvector.bench.env.features import ACTION_KEY, PRIVILEGED_KEY, PRIVILEGED_NAMES, STATE_KEY
from capvector.bench.env.sim import (
    ACTION_DIM,
    MAX_ATTEMPTS,
    MAX_EPISODE_STEPS,
    SimEnv,
    demo_placement_seed,
    parallel_map,
    shards,
    when_tasks_finish,
)
from capvector.bench.env.tasks import instruction, resolve_tasks, task_index
from capvector.errors import CapvectorError
from capvector.files import atomic_path


def record_episode(env: SimEnv, expert, placement_seed: int) -> dict | None:
    """Run the expert from a placement, recording what the cameras see before each action; None on failure."""
    obs = env.reset(placement_seed)
    frames = []
    for _ in range(MAX_EPISODE_STEPS):
        frame = env.observe(depth=True)
        action = np.clip(expert.get_action(obs), -1.0, 1.0).astype(np.float32)
        obs, success = env.step(action)
        frame["action"] = action
        frames.append(frame)
        if success:
            episode = {key: np.stack([f[key] for f in frames]) for key in frames[0]}
            for camera in CAMERAS:  # stored as uint16 millimetres
                depth = episode.pop(f"observation.depth.{camera}")
                episode[f"observation.depth.{camera}"] = np.clip(np.round(depth * fmt.DEPTH_SCALE), 0, 65535).astype(
                    np.uint16
                )
            return episode
    return None


def record_shard(
    task: str, episodes: list[int], seed: int, image_size: int, variant: str, placement: str
) -> tuple[dict, list[dict]]:
    """Camera facts and successful demonstrations of `task` for the given episode slots (runs in a worker)."""
    env = SimEnv(task, image_size=image_size, variant=variant, placement=placement)
    expert = env.expert()
    out = []
    for episode in episodes:
        for attempt in range(MAX_ATTEMPTS):
            placement_seed = demo_placement_seed(seed, episode, attempt)
            frames = record_episode(env, expert, placement_seed)
            if frames is not None:
                out.append({"name": task, "slot": episode, "placement_seed": placement_seed, "frames": frames})
                break
        else:
            raise CapvectorError(f"the scripted expert failed {MAX_ATTEMPTS} placements in a row on {task}")
    env.close()
    return {"camera_fovy": env.camera_fovy, "fps": 1.0 / env.env.dt}, out


def frame_table(frames: dict, episode_index: int, first_index: int, task: int, fps: float) -> pa.Table:
    length = len(frames["action"])
    columns = {}
    for key in sorted(k for k in frames if k.startswith(("observation.images", "observation.depth"))):
        rows = frames[key].reshape(length, -1)
        columns[key] = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(rows.strides[0]), length, [None, pa.py_buffer(np.ascontiguousarray(rows).tobytes())]
        )
    for key in (STATE_KEY, ACTION_KEY, PRIVILEGED_KEY):
        columns[key] = pa.FixedSizeListArray.from_arrays(
            pa.array(frames[key].reshape(-1), pa.float32()), frames[key].shape[1]
        )
    steps = np.arange(length)
    columns.update(
        {
            "timestamp": pa.array((steps / fps).astype(np.float32)),
            "frame_index": pa.array(steps),
            "episode_index": pa.array(np.full(length, episode_index)),
            "index": pa.array(first_index + steps),
            "task_index": pa.array(np.full(length, task)),
            "next.success": pa.array(steps == length - 1),
            "next.done": pa.array(steps == length - 1),
        }
    )
    return pa.table(columns)


def camera_facts(fovy: float, size: int) -> dict[str, float]:
    """A camera's field of view and pinhole intrinsics (capvector.bench.env.camera) for meta/info.json."""
    K = intrinsics(fovy, size, size)
    return {"fovy": fovy, "height": size, "width": size, "cx": K[0, 2], "cy": K[1, 2], "f": K[0, 0]}


def info_json(
    episodes: list[dict],
    tasks: list[str],
    image_size: int,
    seed: int,
    variant: str,
    placement: str,
    camera_fovy: dict[str, float],
    fps: float,
) -> dict:
    size = image_size
    features: dict[str, dict[str, Any]] = {
        f"observation.images.{c}": {
            "dtype": "uint8",
            "shape": [3, size, size],
            "names": ["channels", "height", "width"],
        }
        for c in CAMERAS
    }
    features |= {
        f"observation.depth.{c}": {
            "dtype": "uint16",
            "shape": [1, size, size],
            "names": ["channels", "height", "width"],
            "info": {"unit": "mm", "clip": 65535},
        }
        for c in CAMERAS
    }
    features |= {
        "observation.state": {"dtype": "float32", "shape": [4], "names": ["hand_x", "hand_y", "hand_z", "gripper"]},
        PRIVILEGED_KEY: {"dtype": "float32", "shape": [len(PRIVILEGED_NAMES)], "names": list(PRIVILEGED_NAMES)},
        "action": {"dtype": "float32", "shape": [ACTION_DIM], "names": ["dx", "dy", "dz", "gripper"]},
        "timestamp": {"dtype": "float32", "shape": [1]},
        "frame_index": {"dtype": "int64", "shape": [1]},
        "episode_index": {"dtype": "int64", "shape": [1]},
        "index": {"dtype": "int64", "shape": [1]},
        "task_index": {"dtype": "int64", "shape": [1]},
        "next.success": {"dtype": "bool", "shape": [1]},
        "next.done": {"dtype": "bool", "shape": [1]},
    }
    total_frames = sum(len(e["frames"]["action"]) for e in episodes)
    return {
        "codebase_version": fmt.CODEBASE_VERSION,
        "robot_type": "sawyer",
        "fps": fps,
        "total_episodes": len(episodes),
        "total_frames": total_frames,
        "total_tasks": len(tasks),
        "total_chunks": (len(episodes) - 1) // fmt.CHUNKS_SIZE + 1,
        "chunks_size": fmt.CHUNKS_SIZE,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": None,
        "features": features,
        "capvector": {
            "format_version": fmt.FORMAT_VERSION,
            "image_size": size,
            "variant": variant,
            "placement": placement,
            "seed": seed,
            "source": "metaworld scripted experts (metaworld.policies), successful episodes only",
            "cameras": {c: camera_facts(camera_fovy[c], size) for c in CAMERAS},
        },
    }


def write_dataset(root: Path, episodes: list[dict], tasks: list[str], info: dict[str, Any]) -> None:
    """The dataset folder: the episodes' frames and meta/ with `info` (info_json's) as meta/info.json."""
    fps = info["fps"]
    (root / "meta").mkdir(parents=True)
    first = 0
    rows = []
    for episode_index, episode in enumerate(episodes):
        path = root / fmt.episode_path(episode_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = frame_table(episode["frames"], episode_index, first, task_index(episode["name"]), fps)
        pq.write_table(table, path, compression="zstd")
        first += len(table)
        rows.append(
            {
                "episode_index": episode_index,
                "tasks": [instruction(episode["name"])],
                "length": len(table),
                "name": episode["name"],
                "placement_seed": episode["placement_seed"],
            }
        )
    frames = {key: np.concatenate([e["frames"][key] for e in episodes]) for key in episodes[0]["frames"]}
    stats = fmt.dataset_stats(
        {key: frames[key] for key in (STATE_KEY, ACTION_KEY, PRIVILEGED_KEY)},
        {c: frames[f"observation.images.{c}"] for c in CAMERAS},
        {c: frames[f"observation.depth.{c}"] for c in CAMERAS},
    )
    meta = root / "meta"
    (meta / "stats.json").write_text(json.dumps(stats, indent=1))
    (meta / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": task_index(t), "task": instruction(t), "name": t}) + "\n" for t in tasks)
    )
    (meta / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (meta / "info.json").write_text(json.dumps(info, indent=1))


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
) -> Path:
    """Record `episodes_per_task` successful expert demonstrations per task into the dataset folder `out_dir`.

    `tasks`: task or split names (list or comma-separated). Written to a temporary folder beside
    `out_dir` and renamed at the end; an existing `out_dir` is replaced only with `overwrite`. `on_task(task,
    episodes, frames)` is called as each task's demonstrations are recorded.
    """
    out_dir = Path(out_dir)
    tasks = resolve_tasks(tasks)
    if episodes_per_task < 1:
        raise CapvectorError(f"episodes_per_task must be at least 1, got {episodes_per_task}")
    if out_dir.exists() and not overwrite:
        raise CapvectorError(f"{out_dir} already exists; choose another folder or pass overwrite")
    jobs = [
        (task, slots, seed, image_size, variant, placement) for task, slots in shards(tasks, episodes_per_task, workers)
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
    with atomic_path(out_dir) as temporary:
        info = info_json(recorded, tasks, image_size, seed, variant, placement, facts["camera_fovy"], facts["fps"])
        write_dataset(temporary, recorded, tasks, info)
    return out_dir
