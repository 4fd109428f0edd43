"""The demonstration dataset: its on-disk format, its statistics, and a torch Dataset that reads it.

Layout (LeRobot v2.1 style, so other data can be converted into it):
    meta/info.json        codebase_version "v2.1", fps, features, counts, plus a "capvector" block with the
                          format version, cameras (fovy, intrinsics) and how the data was generated
    meta/tasks.jsonl      {"task_index", "task" (the instruction), "name" (Meta-World task)}
    meta/episodes.jsonl   {"episode_index", "tasks", "length", "name", "placement_seed"}
    meta/stats.json       feature -> {min, max, mean, std, q01, q99} (lists of floats)
    data/chunk-000/episode_000000.parquet   one row per frame
Frame columns: observation.images.{scene,wrist} (raw uint8 bytes of a (3, H, W) image),
observation.depth.{scene,wrist} (raw uint16 bytes of a (1, H, W) depth map in millimetres, clipped at
65.535 m), observation.state (4 float32), action (4 float32), timestamp, frame_index, episode_index, index,
task_index, next.success, next.done.
Images are stored as raw bytes in zstd-compressed parquet rather than PNG: encoding a 64x64 PNG costs
~1 ms here and decoding ~0.5 ms, which would double generation time and make loading a 40k-frame dataset
take about a minute; raw bytes are lossless and load at memory speed. Image statistics are per channel
in [0, 1] (LeRobot's convention); depth statistics are in metres.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from capvector.bench.env.camera import CAMERAS
from capvector.bench.env.features import PRIVILEGED_DIM, PRIVILEGED_KEY
from capvector.errors import CapvectorError

CODEBASE_VERSION = "v2.1"
FORMAT_VERSION = 1  # bump when the capvector-specific parts of the layout change
CHUNKS_SIZE = 1000
DEPTH_SCALE = 1000.0  # stored depth units per metre
REGENERATE = "regenerate it with `capvector demos --out DIR` (or capvector.bench.env.demos.generate_demonstrations)"


def episode_path(episode_index: int) -> str:
    return f"data/chunk-{episode_index // CHUNKS_SIZE:03d}/episode_{episode_index:06d}.parquet"


def feature_stats(values: np.ndarray, axis: tuple[int, ...]) -> dict[str, list[float]]:
    """min/max/mean/std and 1st/99th percentiles over `axis`, as lists of floats (LeRobot's stats.json)."""
    values = values.astype(np.float64)
    return {
        "min": values.min(axis=axis),
        "max": values.max(axis=axis),
        "mean": values.mean(axis=axis),
        "std": values.std(axis=axis),
        "q01": np.quantile(values, 0.01, axis=axis),
        "q99": np.quantile(values, 0.99, axis=axis),
    }


def dataset_stats(
    vectors: dict[str, np.ndarray],
    images: dict[str, np.ndarray],
    depth: dict[str, np.ndarray],
    max_image_frames: int = 2000,
) -> dict:
    """Statistics per feature: `vectors` (feature -> (frames, dim)) over every frame; image and depth statistics
    over an evenly spaced subset of frames."""
    stats = {key: feature_stats(values, (0,)) for key, values in vectors.items()}
    for camera in images:
        step = max(1, len(images[camera]) // max_image_frames)
        pixels = images[camera][::step].transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
        stats[f"observation.images.{camera}"] = feature_stats(pixels, (1,))
        metres = depth[camera][::step].reshape(1, -1) / DEPTH_SCALE
        stats[f"observation.depth.{camera}"] = feature_stats(metres, (1,))
    return {feature: {k: np.atleast_1d(v).tolist() for k, v in s.items()} for feature, s in stats.items()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_meta(root: Path) -> tuple[dict, list[dict], list[dict], dict]:
    """info, tasks, episodes and stats of a dataset folder, with a clear error when it is not a usable one."""
    if not root.is_dir():
        raise CapvectorError(f"dataset folder {root} does not exist; {REGENERATE}")
    missing = [
        name
        for name in ("info.json", "tasks.jsonl", "episodes.jsonl", "stats.json")
        if not (root / "meta" / name).is_file()
    ]
    if missing:
        raise CapvectorError(
            f"dataset folder {root} is incomplete: meta/{', meta/'.join(missing)} missing; {REGENERATE}"
        )
    info = json.loads((root / "meta" / "info.json").read_text())
    ours = info.get("capvector", {})
    if info.get("codebase_version") != CODEBASE_VERSION or ours.get("format_version") != FORMAT_VERSION:
        raise CapvectorError(
            f"dataset {root} has format {info.get('codebase_version')}/capvector {ours.get('format_version')}, "
            f"this version reads {CODEBASE_VERSION}/capvector {FORMAT_VERSION}; {REGENERATE}"
        )
    episodes = read_jsonl(root / "meta" / "episodes.jsonl")
    absent = [
        episode_path(e["episode_index"]) for e in episodes if not (root / episode_path(e["episode_index"])).is_file()
    ]
    if len(episodes) != info["total_episodes"] or absent:
        raise CapvectorError(
            f"dataset {root} is incomplete: {len(episodes)} of {info['total_episodes']} episodes "
            f"listed, {len(absent)} episode files missing (e.g. {absent[:1]}); {REGENERATE}"
        )
    return (
        info,
        read_jsonl(root / "meta" / "tasks.jsonl"),
        episodes,
        json.loads((root / "meta" / "stats.json").read_text()),
    )


def column_array(table, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size binary or fixed-size list column as an array of `shape` per row."""
    column = table.column(name).combine_chunks()
    size = int(np.prod(shape))
    if pa.types.is_fixed_size_binary(column.type):  # the data buffer holds the rows back to back
        flat = np.frombuffer(column.buffers()[1], dtype=dtype)[
            column.offset * size : (column.offset + len(column)) * size
        ]
    else:  # fixed-size list
        flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(dtype, copy=False).reshape(len(column), *shape)


class DemoDataset(torch.utils.data.Dataset):
    """All frames of a dataset folder in memory; a sample is one frame plus the next `chunk_size` actions.

    Samples follow the shared contract: images uint8 (3, H, W), depth float32 (1, H, W) in metres, state
    float32 (4,), task_index int64, instruction str, action float32 (chunk_size, 4) padded by repeating
    the episode's last action, action_is_pad bool (chunk_size,). Values are raw; policies normalize
    with `stats`.
    """

    def __init__(self, root: str | Path, chunk_size: int = 8, depth: bool = True):
        self.root = Path(root)
        self.chunk_size = chunk_size
        self.info, tasks, self.episodes, self.stats = read_meta(self.root)
        ours = self.info["capvector"]
        self.tasks = {t["task_index"]: t["task"] for t in tasks}
        self.task_names = {t["task_index"]: t["name"] for t in tasks}
        self.camera_fovy = {camera: ours["cameras"][camera]["fovy"] for camera in CAMERAS}
        self.image_size = ours["image_size"]
        size = self.image_size
        tables = [pq.read_table(self.root / episode_path(e["episode_index"])) for e in self.episodes]
        self.images = {
            c: np.concatenate([column_array(t, f"observation.images.{c}", np.uint8, (3, size, size)) for t in tables])
            for c in CAMERAS
        }
        self.depth = (
            {
                c: np.concatenate(
                    [column_array(t, f"observation.depth.{c}", np.uint16, (1, size, size)) for t in tables]
                )
                for c in CAMERAS
            }
            if depth
            else {}
        )
        self.state = np.concatenate([column_array(t, "observation.state", np.float32, (4,)) for t in tables])
        # privileged simulator facts: for oracles and privileged objectives only (absent in older datasets)
        has_privileged = all(PRIVILEGED_KEY in t.column_names for t in tables)
        self.privileged = (
            np.concatenate([column_array(t, PRIVILEGED_KEY, np.float32, (PRIVILEGED_DIM,)) for t in tables])
            if has_privileged
            else None
        )
        self.action = np.concatenate([column_array(t, "action", np.float32, (4,)) for t in tables])
        self.task_index = np.concatenate([t.column("task_index").to_numpy() for t in tables]).astype(np.int64)
        lengths = np.array([len(t) for t in tables])
        self.episode_end = np.repeat(np.cumsum(lengths) - 1, lengths)  # last frame of each frame's episode

    def __len__(self) -> int:
        return len(self.state)

    def __getitem__(self, i: int) -> dict:
        steps = i + np.arange(self.chunk_size)
        is_pad = steps > self.episode_end[i]
        steps = np.minimum(steps, self.episode_end[i])
        task = int(self.task_index[i])
        sample = {f"observation.images.{c}": torch.from_numpy(self.images[c][i]) for c in CAMERAS}
        for c in self.depth:
            sample[f"observation.depth.{c}"] = torch.from_numpy(self.depth[c][i].astype(np.float32) / DEPTH_SCALE)
        sample.update(
            {
                "observation.state": torch.from_numpy(self.state[i]),
                **({PRIVILEGED_KEY: torch.from_numpy(self.privileged[i])} if self.privileged is not None else {}),
                "task_index": torch.tensor(task, dtype=torch.int64),
                "instruction": self.tasks[task],
                "action": torch.from_numpy(self.action[steps]),
                "action_is_pad": torch.from_numpy(is_pad),
            }
        )
        return sample
