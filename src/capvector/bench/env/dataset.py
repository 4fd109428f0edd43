"""The benchmark's demonstrations as a torch Dataset, read from any LeRobot v3.0 folder (capvector.bench.env.
lerobot_format): one that `capvector demos` wrote, or one LeRobot wrote with `LeRobotDataset.create`.

Features read (named when missing): observation.images.{scene,wrist} (RGB `image` features), observation.state,
action, task_index and, with depth, observation.depth.{scene,wrist} (`image` features flagged is_depth_map, in
millimetres or metres by their depth_unit); observation.privileged when present. The image size comes from the
features. `capvector demos` also writes meta/capvector.json, the CAPVECTOR_META block: how the data was generated and
the cameras' fields of view and intrinsics, which only the spatial objective needs; other folders may lack it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capvector.bench.env.camera import CAMERAS
from capvector.bench.env.features import ACTION_KEY, PIXELS_KEY, PRIVILEGED_KEY, STATE_KEY
from capvector.bench.env.lerobot_format import Meta, decode_images, read_frames, read_meta, vectors
from capvector.errors import CapvectorError

FORMAT_VERSION = 2  # of CAPVECTOR_META; bump when the capvector-specific parts of the folder change
CAPVECTOR_META = "meta/capvector.json"
DEPTH_SCALE = 1000.0  # stored depth units (millimetres) per metre
HINT = "write one with `capvector demos --out DIR` or LeRobot's LeRobotDataset.create (LeRobot 0.6, format v3.0)"


def image_key(camera: str) -> str:
    return f"observation.images.{camera}"


def depth_key(camera: str) -> str:
    return f"observation.depth.{camera}"


def open_meta(root: str | Path) -> Meta:
    """A dataset folder's meta/, checked (capvector.bench.env.lerobot_format.read_meta)."""
    return read_meta(Path(root), HINT)


def capvector_meta(root: str | Path) -> dict[str, Any] | None:
    """The folder's CAPVECTOR_META block (None when another tool wrote it)."""
    path = Path(root) / CAPVECTOR_META
    return json.loads(path.read_text()) if path.is_file() else None


def height_width(feature: dict) -> tuple[int, int]:
    """An image feature's (height, width): by its names, else channels first when the first axis has 1 or 3."""
    shape, names = feature["shape"], feature.get("names") or []
    if "height" in names and "width" in names:
        return shape[names.index("height")], shape[names.index("width")]
    return (shape[1], shape[2]) if shape[0] in (1, 3) else (shape[0], shape[1])


def image_size(meta: Meta) -> int:
    """The side of the square camera images, from their features."""
    sizes = {height_width(meta.features[image_key(c)]) for c in CAMERAS if image_key(c) in meta.features}
    if len(sizes) != 1 or len(set(*sizes)) != 1:
        raise CapvectorError(
            f"dataset {meta.root}: the benchmark policy needs square camera images of one size, its features give "
            f"(height, width) {sorted(sizes)}"
        )
    return int(next(iter(sizes))[0])


def require_features(meta: Meta, needed: list[str]) -> None:
    missing = [key for key in needed if key not in meta.features]
    if missing:
        raise CapvectorError(
            f"dataset {meta.root} has no feature {missing[0]!r} (its features: {', '.join(meta.features)}); the "
            f"benchmark reads {', '.join(needed)}"
        )


class DemoDataset(torch.utils.data.Dataset):
    """All frames of a dataset folder decoded once into memory; a sample is one frame plus the next `chunk_size`
    actions.

    Samples follow the shared contract: images uint8 (3, H, W), depth float32 (1, H, W) in metres, state
    float32 (4,), task_index int64 (the dataset's own numbering), instruction str, action float32 (chunk_size, 4)
    padded by repeating the episode's last action, action_is_pad bool (chunk_size,). Values are raw; policies
    normalize with `stats`.
    """

    def __init__(self, root: str | Path, chunk_size: int = 8, depth: bool = True):
        self.root = Path(root)
        self.chunk_size = chunk_size
        meta = open_meta(self.root)
        self.info, self.episodes, self.stats = meta.info, meta.episodes, meta.stats
        self.tasks = dict(enumerate(meta.tasks))
        self.generation = capvector_meta(self.root)  # None when another tool wrote the folder
        cameras = (self.generation or {}).get("cameras", {})
        self.camera_fovy = {camera: cameras[camera]["fovy"] for camera in cameras}
        needed = [image_key(c) for c in CAMERAS] + [STATE_KEY, ACTION_KEY, "task_index", "index"]
        needed += [depth_key(c) for c in CAMERAS] if depth else []
        require_features(meta, needed)
        self.image_size = image_size(meta)
        # for oracles and privileged objectives only; datasets other tools wrote have neither
        optional = [key for key in (PRIVILEGED_KEY, PIXELS_KEY) if key in meta.features]
        table = read_frames(meta, needed + optional, HINT)
        if not np.array_equal(table.column("index").to_numpy(), np.arange(len(table))):
            raise CapvectorError(f"dataset {self.root}: its frames' index is not 0..{len(table) - 1} in file order")
        self.images = {c: decode_images(table.column(image_key(c))) for c in CAMERAS}
        self.depth = (
            {c: self._millimetres(meta, c, decode_images(table.column(depth_key(c)))) for c in CAMERAS} if depth else {}
        )
        self.state = vectors(table.column(STATE_KEY), np.float32)
        self.privileged = {key: vectors(table.column(key), np.float32) for key in optional}
        self.action = vectors(table.column(ACTION_KEY), np.float32)
        self.task_index = vectors(table.column("task_index"), np.int64)[:, 0]
        # the last frame of each frame's episode
        ends = np.array([e["dataset_to_index"] - 1 for e in self.episodes])
        starts = np.array([e["dataset_from_index"] for e in self.episodes])
        self.episode_end = np.repeat(ends, ends - starts + 1)
        if len(self.episode_end) != len(table):
            raise CapvectorError(
                f"dataset {self.root}: meta/episodes' frame ranges do not cover its {len(table)} frames"
            )

    @staticmethod
    def _millimetres(meta: Meta, camera: str, depth: np.ndarray) -> np.ndarray:
        """Depth maps as uint16 millimetres (LeRobot records uint16 maps in mm, float ones in m)."""
        unit = (meta.features[depth_key(camera)].get("info") or {}).get("depth_unit", "mm")
        if unit == "mm" and depth.dtype == np.uint16:
            return depth
        scale = DEPTH_SCALE if unit == "m" else 1.0
        return np.clip(np.round(depth.astype(np.float64) * scale), 0, 65535).astype(np.uint16)

    def __len__(self) -> int:
        return len(self.state)

    def __getitem__(self, i: int) -> dict:
        steps = i + np.arange(self.chunk_size)
        is_pad = steps > self.episode_end[i]
        steps = np.minimum(steps, self.episode_end[i])
        task = int(self.task_index[i])
        sample: dict[str, Any] = {image_key(c): torch.from_numpy(self.images[c][i]) for c in CAMERAS}
        for c in self.depth:
            sample[depth_key(c)] = torch.from_numpy(self.depth[c][i].astype(np.float32) / DEPTH_SCALE)
        sample.update(
            {
                STATE_KEY: torch.from_numpy(self.state[i]),
                **{key: torch.from_numpy(values[i]) for key, values in self.privileged.items()},
                "task_index": torch.tensor(task, dtype=torch.int64),
                "instruction": self.tasks[task],
                ACTION_KEY: torch.from_numpy(self.action[steps]),
                "action_is_pad": torch.from_numpy(is_pad),
            }
        )
        return sample
