"""`make interop`: capvector's dataset folders against the real LeRobot 0.6, in both directions.

LeRobot 0.6 needs Python >= 3.12 and torch < 2.12, so it lives in an environment of its own (.venv-interop); this
script runs in both environments, one step each (the Makefile runs them in order):

    ours        (project .venv)  `capvector demos` writes DIR/ours; the frames capvector reads are saved to
                                 DIR/ours.npz
    lerobot     (.venv-interop)  LeRobotDataset opens DIR/ours and must give back the same frames bit-exact, with
                                 no warning logged or raised while it loads and reads every frame; then
                                 LeRobotDataset.create writes DIR/theirs (no capvector block, LeRobot's own image
                                 shapes and TIFF depth maps) and the frames it was given go to DIR/theirs.npz
    theirs      (project .venv)  capvector's training reader opens DIR/theirs and must read those frames back, and
                                 a benchmark policy normalized by its statistics takes a training step on it
(tests/fixtures/lerobot_created holds one such DIR/theirs, so `make test` checks that direction without LeRobot.)

Every step ends with a `RESULT key=value ...` line; any mismatch exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

CAMERAS = ("scene", "wrist")
TASKS = ["reach-v3", "drawer-open-v3"]


def ours(folder: Path) -> None:
    from capvector.bench.env.dataset import DemoDataset
    from capvector.bench.env.demos import generate_demonstrations

    shutil.rmtree(folder / "ours", ignore_errors=True)
    root = generate_demonstrations(folder / "ours", TASKS, episodes_per_task=2, seed=0, image_size=32, workers=2)
    ds = DemoDataset(root)
    arrays = {f"images.{c}": ds.images[c] for c in CAMERAS} | {f"depth.{c}": ds.depth[c] for c in CAMERAS}
    arrays |= {"state": ds.state, "action": ds.action, "task_index": ds.task_index}
    np.savez(folder / "ours.npz", instructions=np.array([ds.tasks[int(t)] for t in ds.task_index]), **arrays)
    print(f"RESULT step=ours frames={len(ds)} episodes={len(ds.episodes)}")


def lerobot(folder: Path) -> None:
    from importlib.metadata import version

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    expected = np.load(folder / "ours.npz")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        # no videos to decode: pyav, so that LeRobot does not probe torchcodec (which warns where FFmpeg is missing)
        ds = LeRobotDataset("capvector/ours", root=folder / "ours", video_backend="pyav")
        frames = [ds[i] for i in range(len(ds))]
    logging.getLogger().removeHandler(handler)
    problems = [f"log {r.name}: {r.getMessage()}" for r in records] + [f"warning: {w.message}" for w in raised]
    if problems:
        sys.exit("LeRobot warned while reading capvector's dataset:\n" + "\n".join(problems))

    def same(name: str, got: list, want: np.ndarray) -> None:
        got_array = np.stack([np.asarray(g) for g in got])
        if got_array.shape != want.shape or not np.array_equal(got_array, want):
            sys.exit(f"LeRobot read {name} differently: shape {got_array.shape} vs {want.shape}")

    for c in CAMERAS:
        # LeRobot returns images as float32 in [0, 1] (uint8 / 255): exact after * 255 and rounding
        rgb = [np.round(f[f"observation.images.{c}"].numpy() * 255).astype(np.uint8) for f in frames]
        same(f"images.{c}", rgb, expected[f"images.{c}"])
        # LeRobot returns depth maps as float32 in millimetres (its default depth_output_unit)
        same(
            f"depth.{c}",
            [f[f"observation.depth.{c}"].numpy().astype(np.uint16) for f in frames],
            expected[f"depth.{c}"],
        )
    same("state", [f["observation.state"].numpy() for f in frames], expected["state"])
    same("action", [f["action"].numpy() for f in frames], expected["action"])
    same("task_index", [f["task_index"].numpy() for f in frames], expected["task_index"])
    if [f["task"] for f in frames] != expected["instructions"].tolist():
        sys.exit("LeRobot read other task strings")
    print(f"RESULT step=lerobot lerobot={version('lerobot')} frames={len(frames)} same_frames=1 warnings=0")
    write_theirs(folder)


def write_theirs(folder: Path) -> None:
    """A dataset as LeRobot writes it, with the features the benchmark reads, in LeRobot's own conventions."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    size = 16
    hwc = {"names": ["height", "width", "channels"]}
    features = {f"observation.images.{c}": {"dtype": "image", "shape": (size, size, 3), **hwc} for c in CAMERAS}
    features |= {
        f"observation.depth.{c}": {"dtype": "image", "shape": (size, size, 1), **hwc, "info": {"is_depth_map": True}}
        for c in CAMERAS
    }
    features |= {
        "observation.state": {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "gripper"]},
        "action": {"dtype": "float32", "shape": (4,), "names": ["dx", "dy", "dz", "gripper"]},
    }
    root = folder / "theirs"
    shutil.rmtree(root, ignore_errors=True)
    ds = LeRobotDataset.create(
        "capvector/theirs", fps=10, features=features, root=root, use_videos=False, video_backend="pyav"
    )
    rng = np.random.default_rng(0)
    given: dict[str, list] = {key: [] for key in ["state", "action", "instructions"]}
    given |= {f"images.{c}": [] for c in CAMERAS} | {f"depth.{c}": [] for c in CAMERAS}
    for episode, task in enumerate(["pick the cube", "open the drawer", "pick the cube"]):
        for _ in range(4 + episode):
            frame = {"task": task}
            for c in CAMERAS:
                image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                depth = rng.integers(200, 3000, (size, size, 1)).astype(np.uint16)
                frame |= {f"observation.images.{c}": image, f"observation.depth.{c}": depth}
                given[f"images.{c}"].append(image.transpose(2, 0, 1))
                given[f"depth.{c}"].append(depth.transpose(2, 0, 1))
            frame |= {key: rng.normal(size=4).astype(np.float32) for key in ("observation.state", "action")}
            given["state"].append(frame["observation.state"])
            given["action"].append(frame["action"])
            given["instructions"].append(task)
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    np.savez(folder / "theirs.npz", **{key: np.array(values) for key, values in given.items()})
    print(f"RESULT step=lerobot_create frames={len(given['state'])}")


def theirs(folder: Path) -> None:
    from capvector.bench.env.dataset import DemoDataset

    expected = np.load(folder / "theirs.npz")
    ds = DemoDataset(folder / "theirs")
    for key, got in [
        *((f"images.{c}", ds.images[c]) for c in CAMERAS),
        *((f"depth.{c}", ds.depth[c]) for c in CAMERAS),
        ("state", ds.state),
        ("action", ds.action),
    ]:
        if not np.array_equal(got, expected[key]):
            sys.exit(f"capvector read {key} of LeRobot's dataset differently")
    if [ds[i]["instruction"] for i in range(len(ds))] != expected["instructions"].tolist():
        sys.exit("capvector read other task strings")
    # and a new benchmark policy normalized by LeRobot's statistics trains on it
    import torch

    from capvector.bench import recipe

    policy = recipe.policy(None, dataset=str(folder / "theirs"), patch_grid=2)  # 16px images
    loss = policy(torch.utils.data.default_collate([ds[i] for i in range(4)]))["action"]
    loss.backward()
    print(f"RESULT step=theirs frames={len(ds)} same_frames=1 image_size={ds.image_size} loss={loss.item():.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["ours", "lerobot", "theirs"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    {"ours": ours, "lerobot": lerobot, "theirs": theirs}[args.step](args.folder)
