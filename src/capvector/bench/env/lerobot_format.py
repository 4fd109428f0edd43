"""LeRobot v3.0 dataset folders (LeRobot 0.6's format), written with pyarrow and Pillow and read back.

Layout, as `LeRobotDataset.create` + `save_episode` write it:
    meta/info.json        codebase_version "v3.0", integer fps, features (dtype, shape, names, info), counts,
                          chunks_size, files_size_in_mb, data_path/video_path templates, splits
    meta/tasks.parquet    one row per task: its string (the pandas index "task") and task_index 0..N-1, numbered
                          in order of first appearance
    meta/episodes/chunk-000/file-000.parquet   one row per episode: episode_index, tasks, length,
                          data/chunk_index, data/file_index, dataset_from_index, dataset_to_index,
                          stats/<feature>/<stat>, meta/episodes/chunk_index, meta/episodes/file_index (and any
                          extra columns the writer is given)
    meta/stats.json       feature -> min, max, mean, std, count, q01, q10, q50, q90, q99
    data/chunk-000/file-000.parquet            one row per frame, one row group per episode; a file holds
                          episodes until it reaches data_files_size_in_mb
An `image` feature is a struct {bytes: PNG, path} column (the `datasets` Image feature, declared in the schema's
"huggingface" metadata): lossless, so every frame reads back bit-exact. RGB statistics are per channel in [0, 1]
with shape (C, 1, 1); a depth map (feature info is_depth_map, depth_unit) keeps its stored unit.

Written without LeRobot, which cannot share the project's environment (the README says why); `make interop` checks
this module against the real LeRobot in an environment of its own.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capvector.errors import CapvectorError

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk folder
DATA_FILES_SIZE_IN_MB = 100
VIDEO_FILES_SIZE_IN_MB = 200
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
TASKS_PATH = "meta/tasks.parquet"
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
# added to every dataset's features, after the user's (LeRobot's DEFAULT_FEATURES)
DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    key: {"dtype": dtype, "shape": [1], "names": None}
    for key, dtype in [
        ("timestamp", "float32"),
        ("frame_index", "int64"),
        ("episode_index", "int64"),
        ("index", "int64"),
        ("task_index", "int64"),
    ]
}
PNG_COMPRESS_LEVEL = 1  # lossless at any level; faster to encode than LeRobot's 6, files a little larger


@dataclass
class Episode:
    """One episode to write: its task (a natural-language string) and its frames, feature -> (length, *shape)
    arrays in the feature's shape (images channels first, uint8 RGB or uint16 depth); `extra`: more columns of its
    row in meta/episodes."""

    task: str
    frames: dict[str, np.ndarray]
    extra: dict[str, Any] = field(default_factory=dict)


def is_depth(feature: dict) -> bool:
    return bool((feature.get("info") or {}).get("is_depth_map", False))


def encode_png(image: np.ndarray) -> bytes:
    """A (C, H, W) uint8 (C = 3) or uint16 (C = 1) image as PNG bytes."""
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def feature_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """LeRobot's statistics of a (frames, dim) array per dimension: min, max, mean, std, the QUANTILES (exact here;
    LeRobot estimates them from histograms) and count (frames)."""
    values = values.astype(np.float64)
    stats = {"min": values.min(0), "max": values.max(0), "mean": values.mean(0), "std": values.std(0)}
    stats |= dict(zip(QUANTILES, np.quantile(values, list(QUANTILES.values()), axis=0)))
    return {**stats, "count": np.array([len(values)])}


def pixel_histogram(images: np.ndarray) -> np.ndarray:
    """(C, levels) counts of each value per channel of (frames, C, H, W) uint8 or uint16 images."""
    levels = np.iinfo(images.dtype).max + 1
    return np.stack([np.bincount(images[:, c].ravel(), minlength=levels) for c in range(images.shape[1])])


def histogram_stats(counts: np.ndarray, frames: int, scale: float) -> dict[str, np.ndarray]:
    """Image statistics per channel from a pixel_histogram, divided by `scale`, in LeRobot's (C, 1, 1) shape: exact
    (quantiles interpolated between order statistics as np.quantile does), and cheap enough for every frame."""
    levels = np.arange(counts.shape[1], dtype=np.float64)
    n = counts.sum(axis=1)
    cumulative = counts.cumsum(axis=1)

    def order_statistic(k: np.ndarray) -> np.ndarray:  # the k-th smallest value of each channel (k from 0)
        return np.array([np.searchsorted(c, i, side="right") for c, i in zip(cumulative, k)], dtype=np.float64)

    mean = counts @ levels / n
    stats = {
        "min": order_statistic(np.zeros_like(n)),
        "max": order_statistic(n - 1),
        "mean": mean,
        "std": np.sqrt((counts * (levels[None] - mean[:, None]) ** 2).sum(axis=1) / n),
    }
    for name, q in QUANTILES.items():
        position = q * (n - 1)
        below = np.floor(position).astype(np.int64)
        low, high = order_statistic(below), order_statistic(np.minimum(below + 1, n - 1))
        stats[name] = low + (position - below) * (high - low)
    out = {name: (value / scale)[:, None, None] for name, value in stats.items()}
    return {**out, "count": np.array([frames])}


def image_scale(feature: dict) -> float:
    """What an image feature's statistics are divided by: RGB to [0, 1], a depth map kept in its stored unit."""
    return 1.0 if is_depth(feature) else 255.0


def listed(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, list]]:
    return {key: {name: value.tolist() for name, value in s.items()} for key, s in stats.items()}


def arrow_column(values: np.ndarray, feature: dict) -> pa.Array:
    """A feature's column as LeRobot stores it: images as {bytes, path} PNG structs, (1,) features as scalars,
    vectors as fixed-size lists."""
    if feature["dtype"] == "image":
        names = [f"frame-{i:06d}.png" for i in range(len(values))]  # LeRobot keeps its staging file's name
        return pa.StructArray.from_arrays(
            [pa.array([encode_png(v) for v in values], pa.binary()), pa.array(names, pa.string())],
            names=["bytes", "path"],
        )
    kind = pa.from_numpy_dtype(np.dtype(feature["dtype"]))
    if list(feature["shape"]) == [1]:
        return pa.array(values.reshape(-1), kind)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), kind), int(np.prod(feature["shape"])))


def hf_features(features: dict[str, dict]) -> dict[str, dict]:
    """The `datasets` feature types (the parquet schema's "huggingface" metadata) of LeRobot's features."""
    out: dict[str, dict] = {}
    for key, ft in features.items():
        if ft["dtype"] == "image":
            out[key] = {"_type": "Image"}
        elif list(ft["shape"]) == [1]:
            out[key] = {"dtype": ft["dtype"], "_type": "Value"}
        else:
            out[key] = {"feature": {"dtype": ft["dtype"], "_type": "Value"}, "length": ft["shape"][0], "_type": "List"}
    return out


def next_file(chunk_index: int, file_index: int) -> tuple[int, int]:
    return (chunk_index + 1, 0) if file_index == CHUNKS_SIZE - 1 else (chunk_index, file_index + 1)


def tasks_table(tasks: list[str]) -> pa.Table:
    """meta/tasks.parquet as pandas writes a DataFrame indexed by "task" (LeRobot reads it with pandas)."""
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [
            {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object", "metadata": None}
        ],
        "columns": [
            {"name": name, "field_name": name, "pandas_type": kind, "numpy_type": numpy, "metadata": None}
            for name, kind, numpy in [("task_index", "int64", "int64"), ("task", "unicode", "object")]
        ],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.3.3",  # the pandas that wrote LeRobot 0.6.1's (tests/fixtures/lerobot_created)
    }
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    return table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})


def write_dataset(
    root: Path, episodes: list[Episode], features: dict[str, dict], fps: int, robot_type: str | None = None
) -> None:
    """Write `episodes` as the LeRobot v3.0 dataset folder `root` (created; it must not exist).

    `features`: the frames' features as LeRobotDataset.create takes them, without the default ones (images, scalars
    and vectors). Statistics, per episode and in meta/stats.json, are over every frame.
    """
    features = {**features, **DEFAULT_FEATURES}
    images = [key for key, ft in features.items() if ft["dtype"] == "image"]
    tasks = list(dict.fromkeys(e.task for e in episodes))
    schema = {"huggingface": json.dumps({"info": {"features": hf_features(features)}})}
    rows: list[dict[str, Any]] = []
    histograms: dict[str, np.ndarray] = {}  # image key -> pixel histogram over every frame so far
    vectors_so_far: dict[str, list[np.ndarray]] = {key: [] for key in features if key not in images}
    chunk_index, file_index, file_bytes, writer = 0, 0, 0, None
    first = 0
    try:
        for episode_index, episode in enumerate(episodes):
            length = len(next(iter(episode.frames.values())))
            steps = np.arange(length)
            frames = {
                **episode.frames,
                "timestamp": (steps / fps).astype(np.float32),
                "frame_index": steps,
                "episode_index": np.full(length, episode_index),
                "index": first + steps,
                "task_index": np.full(length, tasks.index(episode.task)),
            }
            table = pa.table({key: arrow_column(frames[key], ft) for key, ft in features.items()})
            if writer is not None and file_bytes + table.nbytes > DATA_FILES_SIZE_IN_MB * 2**20:
                writer.close()
                writer, file_bytes = None, 0
                chunk_index, file_index = next_file(chunk_index, file_index)
            if writer is None:
                path = root / DATA_PATH.format(chunk_index=chunk_index, file_index=file_index)
                path.parent.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(path, table.schema.with_metadata(schema), compression="snappy")
            writer.write_table(table)  # one row group per episode
            file_bytes += table.nbytes

            stats = {}
            for key in images:
                counts = pixel_histogram(frames[key])
                histograms[key] = histograms[key] + counts if key in histograms else counts
                stats[key] = histogram_stats(counts, length, image_scale(features[key]))
            for key in vectors_so_far:
                vectors_so_far[key].append(frames[key].reshape(length, -1))
                stats[key] = feature_stats(vectors_so_far[key][-1])
            rows.append(
                {
                    "episode_index": episode_index,
                    "tasks": [episode.task],
                    "length": length,
                    "data/chunk_index": chunk_index,
                    "data/file_index": file_index,
                    "dataset_from_index": first,
                    "dataset_to_index": first + length,
                    **{f"stats/{key}/{name}": stats[key][name].tolist() for key in features for name in stats[key]},
                    "meta/episodes/chunk_index": 0,
                    "meta/episodes/file_index": 0,
                    **episode.extra,
                }
            )
            first += length
    finally:
        if writer is not None:
            writer.close()

    episodes_path = root / EPISODES_PATH.format(chunk_index=0, file_index=0)
    episodes_path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), episodes_path, compression="snappy")
    pq.write_table(tasks_table(tasks), root / TASKS_PATH, compression="snappy")
    total = {key: histogram_stats(histograms[key], first, image_scale(features[key])) for key in images}
    total |= {key: feature_stats(np.concatenate(values)) for key, values in vectors_so_far.items()}
    (root / "meta" / "stats.json").write_text(json.dumps(listed({key: total[key] for key in features}), indent=4))
    info = {
        "codebase_version": CODEBASE_VERSION,
        "fps": fps,
        "features": features,
        "total_episodes": len(episodes),
        "total_frames": first,
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": DATA_FILES_SIZE_IN_MB,
        "video_files_size_in_mb": VIDEO_FILES_SIZE_IN_MB,
        "data_path": DATA_PATH,
        "video_path": None,
        "robot_type": robot_type,
        "splits": {"train": f"0:{len(episodes)}"},
    }
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))


@dataclass
class Meta:
    """A dataset folder's meta/: info.json, the tasks (task_index -> string), the episodes' rows (without their
    stats/ columns) in episode order, and stats.json."""

    root: Path
    info: dict[str, Any]
    tasks: list[str]
    episodes: list[dict[str, Any]]
    stats: dict[str, dict[str, list]]

    @property
    def features(self) -> dict[str, dict]:
        return self.info["features"]


def read_meta(root: Path, hint: str) -> Meta:
    """The meta/ of the LeRobot v3.0 folder `root`; a missing or unreadable part is named, with `hint` (how to get
    a readable folder)."""
    if not root.is_dir():
        raise CapvectorError(f"dataset folder {root} does not exist; {hint}")
    missing = [name for name in ("meta/info.json", TASKS_PATH, "meta/stats.json") if not (root / name).is_file()]
    episode_files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    if not episode_files:
        missing.append("meta/episodes/chunk-*/file-*.parquet")
    if missing:
        raise CapvectorError(f"dataset folder {root} is incomplete: {', '.join(missing)} missing; {hint}")
    info = json.loads((root / "meta" / "info.json").read_text())
    if info.get("codebase_version") != CODEBASE_VERSION:
        raise CapvectorError(
            f"dataset {root} is in LeRobot format {info.get('codebase_version')}, this version reads "
            f"{CODEBASE_VERSION} (LeRobot 0.6); {hint}"
        )
    tasks = pq.read_table(root / TASKS_PATH).sort_by("task_index")
    if tasks.column("task_index").to_pylist() != list(range(len(tasks))):
        raise CapvectorError(f"dataset {root}: {TASKS_PATH} does not number its tasks 0..{len(tasks) - 1}; {hint}")
    table = pa.concat_tables([pq.read_table(path) for path in episode_files])
    table = table.select([name for name in table.column_names if not name.startswith("stats/")])
    episodes = sorted(table.to_pylist(), key=lambda e: e["episode_index"])
    if len(episodes) != info["total_episodes"]:
        raise CapvectorError(
            f"dataset {root} is incomplete: meta/episodes lists {len(episodes)} of {info['total_episodes']} "
            f"episodes; {hint}"
        )
    return Meta(
        root, info, tasks.column("task").to_pylist(), episodes, json.loads((root / "meta/stats.json").read_text())
    )


def read_frames(meta: Meta, columns: list[str], hint: str) -> pa.Table:
    """The `columns` of every frame, in index order, from the data files the episodes name."""
    files = dict.fromkeys((e["data/chunk_index"], e["data/file_index"]) for e in meta.episodes)
    paths = [meta.root / meta.info["data_path"].format(chunk_index=c, file_index=f) for c, f in files]
    absent = [str(path.relative_to(meta.root)) for path in paths if not path.is_file()]
    if absent:
        raise CapvectorError(
            f"dataset {meta.root} is incomplete: {len(absent)} data files missing (e.g. {absent[0]}); {hint}"
        )
    table = pa.concat_tables([pq.read_table(path, columns=columns) for path in paths])
    if len(table) != meta.info["total_frames"]:
        raise CapvectorError(
            f"dataset {meta.root} is incomplete: {len(table)} of {meta.info['total_frames']} frames in its data files; "
            f"{hint}"
        )
    return table


def decode_images(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An image column ({bytes, path} structs of PNG or any format Pillow reads) as (frames, C, H, W) arrays of the
    images' own dtype (uint8 RGB, uint16 depth); decoded once, by Pillow."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = column.field("bytes").to_pylist()
    first = np.asarray(Image.open(io.BytesIO(encoded[0])))
    out = np.empty((len(encoded), *(first.shape[2:] or (1,)), *first.shape[:2]), dtype=first.dtype)
    for i, data in enumerate(encoded):
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        out[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return out


def vectors(column: pa.ChunkedArray, dtype: type) -> np.ndarray:
    """A scalar or (fixed-size) list column as a (frames, dim) array."""
    column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or pa.types.is_large_list(column.type):
        flat = column.flatten().to_numpy(zero_copy_only=False)
    else:
        flat = column.to_numpy(zero_copy_only=False)
    return np.array(flat, dtype=dtype).reshape(len(column), -1)  # a writable copy (torch warns on read-only ones)
