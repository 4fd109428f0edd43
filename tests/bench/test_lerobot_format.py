"""The dataset folders are LeRobot v3.0 as LeRobot 0.6.1 writes and reads them (`make interop` checks against the real
LeRobot; tests/fixtures/lerobot_created is a folder it wrote with LeRobotDataset.create), and the training reader
reads any such folder."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capvector.bench import recipe
from capvector.bench.env.dataset import DemoDataset
from capvector.bench.env.demos import frame_features
from capvector.bench.env.lerobot_format import Episode, feature_stats, histogram_stats, pixel_histogram, write_dataset
from capvector.cli import main
from capvector.errors import CapvectorError

LEROBOT_CREATED = Path(__file__).parents[1] / "fixtures" / "lerobot_created"
# meta/info.json's fields: LeRobot 0.6's DatasetInfo, which warns about any other
INFO_FIELDS = {
    "codebase_version", "fps", "features", "total_episodes", "total_frames", "total_tasks", "chunks_size",
    "data_files_size_in_mb", "video_files_size_in_mb", "data_path", "video_path", "robot_type", "splits",
}  # fmt: skip


def synthetic_episodes(size: int, lengths: list[int], tasks: list[str], seed: int = 0) -> list[Episode]:
    rng = np.random.default_rng(seed)
    episodes = []
    for i, (length, task) in enumerate(zip(lengths, tasks)):
        frames = {
            f"observation.images.{c}": rng.integers(0, 256, (length, 3, size, size), np.uint8)
            for c in ("scene", "wrist")
        }
        frames |= {
            f"observation.depth.{c}": rng.integers(0, 65536, (length, 1, size, size)).astype(np.uint16)
            for c in ("scene", "wrist")
        }
        frames |= {
            key: rng.normal(size=(length, dim)).astype(np.float32)
            for key, dim in [
                ("observation.state", 4),
                ("observation.privileged", 6),
                ("observation.privileged_pixels", 12),
                ("action", 4),
            ]
        }
        frames |= {key: np.arange(length) == length - 1 for key in ("next.success", "next.done")}
        episodes.append(Episode(task, frames, {"name": f"task-{task}", "placement_seed": i}))
    return episodes


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list[Episode]]:
    episodes = synthetic_episodes(8, [5, 3, 4], ["open it", "push it", "open it"])
    root = tmp_path_factory.mktemp("lerobot") / "ds"
    write_dataset(root, episodes, frame_features(8), fps=80, robot_type="sawyer")
    return root, episodes


def test_meta_is_lerobot_v30(written):
    root, episodes = written
    info = json.loads((root / "meta" / "info.json").read_text())
    theirs = json.loads((LEROBOT_CREATED / "meta" / "info.json").read_text())
    assert set(info) == set(theirs) == INFO_FIELDS
    assert info["codebase_version"] == "v3.0" and info["fps"] == 80 and isinstance(info["fps"], int)
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, 12, 2)
    for key in ("chunks_size", "data_files_size_in_mb", "video_files_size_in_mb", "data_path", "video_path"):
        assert info[key] == theirs[key], key
    assert info["splits"] == {"train": "0:3"}
    features = info["features"]
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):  # LeRobot's defaults, last
        assert features[key] == theirs["features"][key]
    assert list(features)[-5:] == list(theirs["features"])[-5:]
    assert features["observation.images.scene"] == {
        "dtype": "image",
        "shape": [3, 8, 8],
        "names": ["channels", "height", "width"],
    }
    assert features["observation.depth.wrist"]["info"] == {"is_depth_map": True, "depth_unit": "mm"}
    assert theirs["features"]["observation.depth.wrist"]["info"]["depth_unit"] == "mm"
    assert features["observation.privileged"]["names"] == [
        "object_x",
        "object_y",
        "object_z",
        "goal_x",
        "goal_y",
        "goal_z",
    ]
    assert features["observation.privileged_pixels"]["names"][:4] == [
        "scene_object_u",
        "scene_object_v",
        "scene_object_z",
        "scene_goal_u",
    ]

    tasks = pq.read_table(root / "meta" / "tasks.parquet")
    their_tasks = pq.read_table(LEROBOT_CREATED / "meta" / "tasks.parquet")
    assert tasks.schema.equals(their_tasks.schema, check_metadata=False)
    assert tasks.to_pydict() == {"task_index": [0, 1], "task": ["open it", "push it"]}  # numbered as first seen
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]  # pandas reads "task" as index

    rows = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    their_rows = pq.read_table(LEROBOT_CREATED / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    assert set(their_rows.column_names) <= set(rows.column_names)
    for name in their_rows.column_names:
        if name in rows.column_names and "privileged" not in name:
            assert rows.schema.field(name).type == their_rows.schema.field(name).type, name
    rows = rows.to_pylist()
    assert [(r["dataset_from_index"], r["dataset_to_index"], r["length"]) for r in rows] == [
        (0, 5, 5),
        (5, 8, 3),
        (8, 12, 4),
    ]
    assert [r["tasks"] for r in rows] == [["open it"], ["push it"], ["open it"]]
    assert [r["placement_seed"] for r in rows] == [0, 1, 2]
    assert np.shape(rows[1]["stats/observation.images.scene/mean"]) == (3, 1, 1)
    assert np.allclose(rows[1]["stats/action/mean"], episodes[1].frames["action"].mean(0))

    stats = json.loads((root / "meta" / "stats.json").read_text())
    assert set(stats) == set(features)
    assert set(stats["action"]) == set(json.loads((LEROBOT_CREATED / "meta" / "stats.json").read_text())["action"])
    scene = np.concatenate([e.frames["observation.images.scene"] for e in episodes])
    assert np.shape(stats["observation.images.scene"]["mean"]) == (3, 1, 1) and stats["observation.images.scene"][
        "count"
    ] == [12]
    assert np.allclose(np.ravel(stats["observation.images.scene"]["mean"]), scene.mean(axis=(0, 2, 3)) / 255)
    depth = np.concatenate([e.frames["observation.depth.scene"] for e in episodes])
    assert np.allclose(np.ravel(stats["observation.depth.scene"]["q50"]), np.median(depth))  # millimetres
    assert np.shape(stats["observation.state"]["q99"]) == (4,) and np.shape(stats["task_index"]["max"]) == (1,)


def test_frames_are_png_image_structs_lerobot_decodes(written):
    root, episodes = written
    data = pq.ParquetFile(root / "data" / "chunk-000" / "file-000.parquet")
    theirs = pq.read_schema(LEROBOT_CREATED / "data" / "chunk-000" / "file-000.parquet")
    assert data.metadata.num_row_groups == 3  # one per episode, as LeRobot writes
    for name in theirs.names:
        assert data.schema_arrow.field(name).type == theirs.field(name).type, name
    hf = json.loads(data.schema_arrow.metadata[b"huggingface"])["info"]["features"]
    assert (
        hf["observation.images.scene"]
        == json.loads(theirs.metadata[b"huggingface"])["info"]["features"]["observation.images.scene"]
    )
    assert hf["action"] == {"feature": {"dtype": "float32", "_type": "Value"}, "length": 4, "_type": "List"}
    table = data.read()
    second = table.slice(5, 3)  # episode 1
    for i in range(3):
        rgb = Image.open(io.BytesIO(second.column("observation.images.wrist")[i]["bytes"].as_py()))
        assert rgb.format == "PNG" and rgb.mode == "RGB"
        assert np.array_equal(np.asarray(rgb).transpose(2, 0, 1), episodes[1].frames["observation.images.wrist"][i])
        depth = Image.open(io.BytesIO(second.column("observation.depth.scene")[i]["bytes"].as_py()))
        assert depth.mode == "I;16"  # what LeRobot returns as float32 millimetres
        assert np.array_equal(np.asarray(depth), episodes[1].frames["observation.depth.scene"][i, 0])
    assert table.column("task_index").to_pylist() == [0] * 5 + [1] * 3 + [0] * 4
    assert table.column("index").to_pylist() == list(range(12))
    assert np.allclose(table.column("timestamp").to_numpy()[5:8], [0, 1 / 80, 2 / 80])


def test_histogram_statistics_are_exact():
    images = np.random.default_rng(1).integers(0, 256, (6, 3, 5, 7), np.uint8)
    exact = feature_stats(images.transpose(0, 2, 3, 1).reshape(-1, 3))
    fast = histogram_stats(pixel_histogram(images), len(images), 255.0)
    for name in exact:
        if name != "count":
            assert np.allclose(fast[name][:, 0, 0], exact[name] / 255.0), name


def test_the_reader_gets_back_every_frame(written):
    root, episodes = written
    ds = DemoDataset(root, chunk_size=4)
    assert ds.generation is None and ds.camera_fovy == {} and ds.image_size == 8
    for key in ("scene", "wrist"):
        assert np.array_equal(ds.images[key], np.concatenate([e.frames[f"observation.images.{key}"] for e in episodes]))
        assert np.array_equal(ds.depth[key], np.concatenate([e.frames[f"observation.depth.{key}"] for e in episodes]))
    for key in ("observation.privileged", "observation.privileged_pixels"):
        assert np.array_equal(ds.privileged[key], np.concatenate([e.frames[key] for e in episodes]))
    sample = ds[6]
    assert sample["instruction"] == "push it" and sample["action_is_pad"].tolist() == [False, False, True, True]
    assert torch.equal(sample["action"][1], torch.from_numpy(episodes[1].frames["action"][2]))


def test_a_dataset_lerobot_wrote_trains(tmp_path):
    """LeRobot's conventions: images (H, W, C), depth as TIFF, its task numbering and statistics, no capvector
    block (so the spatial objective needs fovy)."""
    expected = np.load(LEROBOT_CREATED.with_suffix(".npz"))
    ds = DemoDataset(LEROBOT_CREATED)
    assert ds.image_size == 16 and ds.generation is None and ds.privileged == {}
    for key in ("scene", "wrist"):
        assert np.array_equal(ds.images[key], expected[f"images.{key}"])
        assert np.array_equal(ds.depth[key], expected[f"depth.{key}"])
    assert np.array_equal(ds.action, expected["action"])
    assert [ds[i]["instruction"] for i in range(len(ds))] == expected["instructions"].tolist()
    policy = recipe.policy(None, dataset=str(LEROBOT_CREATED), patch_grid=2)
    assert policy.config.image_size == 16
    policy(torch.utils.data.default_collate([ds[i] for i in range(3)]))["action"].backward()
    with pytest.raises(CapvectorError, match="fields of view.*no meta/capvector.json.*auxiliary_args.fovy"):
        recipe.spatial(str(LEROBOT_CREATED))
    assert recipe.spatial(str(LEROBOT_CREATED), fovy={"scene": 40.0, "wrist": 90.0}).fovy["wrist"] == 90.0


def test_a_missing_feature_is_named_and_exits_2(tmp_path):
    features = {k: v for k, v in frame_features(16).items() if k != "observation.images.wrist"}
    episodes = synthetic_episodes(16, [4], ["open it"])
    for e in episodes:
        del e.frames["observation.images.wrist"]
    write_dataset(tmp_path / "ds", episodes, features, fps=80)
    with pytest.raises(CapvectorError, match="has no feature 'observation.images.wrist'"):
        DemoDataset(tmp_path / "ds", depth=False)
    root = str(tmp_path / "ds")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main([
            "train",
            "--set", f"out_dir={tmp_path / 'run'}", "--set", "steps=1", "--set", "device=cpu",
            "--set", "policy=capvector.bench.recipe:policy", "--set", f"policy_args={{dataset: {root}, patch_grid: 2}}",
            "--set", "dataset=capvector.bench.recipe:dataset", "--set", f"dataset_args={{root: {root}}}",
        ])  # fmt: skip
    assert code == 2 and stderr.getvalue().count("\n") == 1, stderr.getvalue()
    assert "no feature 'observation.images.wrist'" in stderr.getvalue()
    assert not (tmp_path / "run").exists()
