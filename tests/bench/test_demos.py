import json
import shutil

import numpy as np
import pytest
import torch

from capvector.bench.env.dataset import DemoDataset, open_meta
from capvector.bench.env.demos import generate_demonstrations
from capvector.bench.env.sim import CONTROL_HZ, SimEnv
from capvector.bench.teacher.pretraining import load_frames
from capvector.errors import CapvectorError

TASKS = ["reach-v3", "drawer-open-v3"]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return generate_demonstrations(
        tmp_path_factory.mktemp("demos") / "ds", TASKS, episodes_per_task=2, seed=3, workers=2
    )


def test_samples_follow_the_contract(dataset_dir):
    ds = DemoDataset(dataset_dir, chunk_size=8)
    assert len(ds.episodes) == 4 and len(ds) == sum(e["length"] for e in ds.episodes)
    assert [e["name"] for e in ds.episodes] == [t for t in TASKS for _ in range(2)]
    assert sorted(ds.tasks) == [0, 1] and ds.generation is not None and ds.image_size == 64
    assert ds.camera_fovy["wrist"] == 90.0 and 10 < ds.camera_fovy["scene"] < 90
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert (
        batch["observation.images.scene"].shape == (5, 3, 64, 64)
        and batch["observation.images.scene"].dtype == torch.uint8
    )
    assert (
        batch["observation.depth.wrist"].shape == (5, 1, 64, 64)
        and batch["observation.depth.wrist"].dtype == torch.float32
    )
    assert batch["observation.state"].shape == (5, 4) and batch["action"].shape == (5, 8, 4)
    assert batch["task_index"].dtype == torch.int64 and isinstance(batch["instruction"][0], str)
    for key in ("observation.state", "action", "observation.images.scene", "observation.depth.scene"):
        assert set(ds.stats[key]) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    assert (ds.action >= -1).all() and (ds.action <= 1).all()


def test_action_chunks_pad_past_the_episode_end(dataset_dir):
    ds = DemoDataset(dataset_dir, chunk_size=8, depth=False)
    last = ds.episodes[0]["length"] - 1
    sample = ds[last - 2]
    assert sample["action_is_pad"].tolist() == [False] * 3 + [True] * 5
    assert torch.equal(sample["action"][3:], sample["action"][2].expand(5, 4))
    assert torch.equal(ds[0]["action"], torch.from_numpy(ds.action[:8]))


def test_demonstration_replays_to_success(dataset_dir):
    ds = DemoDataset(dataset_dir, depth=False)
    episode = ds.episodes[2]  # first drawer-open episode
    start = sum(e["length"] for e in ds.episodes[:2])
    env = SimEnv(episode["name"])
    env.reset(episode["placement_seed"])
    assert np.allclose(env.obs[:4], ds.state[start], atol=1e-5)
    successes = [env.step(a)[1] for a in ds.action[start : start + episode["length"]]]
    env.close()
    assert successes[-1] and not any(successes[:-1])


def test_bad_dataset_folders_are_explained(dataset_dir, tmp_path):
    with pytest.raises(CapvectorError, match="does not exist"):
        DemoDataset(tmp_path / "nothing")
    broken = shutil.copytree(dataset_dir, tmp_path / "broken")
    (broken / "data" / "chunk-000" / "file-000.parquet").unlink()
    with pytest.raises(CapvectorError, match="incomplete: 1 data files missing"):
        DemoDataset(broken)
    (broken / "meta" / "stats.json").unlink()
    with pytest.raises(CapvectorError, match="stats.json"):
        DemoDataset(broken)
    old = shutil.copytree(dataset_dir, tmp_path / "old")
    info = json.loads((old / "meta" / "info.json").read_text())
    info["codebase_version"] = "v2.1"
    (old / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(CapvectorError, match="format v2.1, this version reads v3.0.*capvector demos"):
        DemoDataset(old)
    with pytest.raises(CapvectorError, match="already exists"):
        generate_demonstrations(dataset_dir, TASKS, episodes_per_task=1)


def test_a_strided_recording_keeps_every_kth_step_of_the_same_episodes(dataset_dir, tmp_path):
    strided = generate_demonstrations(tmp_path / "strided", TASKS, episodes_per_task=2, seed=3, frame_stride=4)
    full, every4 = DemoDataset(dataset_dir, chunk_size=1), DemoDataset(strided, chunk_size=1)
    assert every4.generation["frame_stride"] == 4 and full.generation["frame_stride"] == 1
    assert open_meta(strided).info["fps"] == CONTROL_HZ // 4
    start, start4 = 0, 0
    for episode, episode4 in zip(full.episodes, every4.episodes, strict=True):
        assert episode4["placement_seed"] == episode["placement_seed"]
        assert episode4["length"] == -(-episode["length"] // 4)  # steps 0, 4, 8, ...
        steps = range(start, start + episode["length"], 4)
        assert np.array_equal(every4.state[start4 : start4 + episode4["length"]], full.state[steps])
        assert np.array_equal(every4.action[start4 : start4 + episode4["length"]], full.action[steps])
        for key in ("observation.images.scene", "observation.depth.wrist"):
            assert torch.equal(every4[start4 + 1][key], full[start + 4][key])
        start, start4 = start + episode["length"], start4 + episode4["length"]
    # the teacher reads a strided recording at multiples of its stride only
    frames = load_frames(strided, ("scene", "wrist"), 8)
    assert len(frames.images) == -(-len(every4) // 2)
    assert torch.equal(frames.images[1, 0], every4[2]["observation.images.scene"])
    with pytest.raises(CapvectorError, match="frame_stride 6 is not a multiple of the stride 4"):
        load_frames(strided, ("scene", "wrist"), 6)
    with pytest.raises(CapvectorError, match="frame_stride 3 must divide the simulator's rate, 80"):
        generate_demonstrations(tmp_path / "three", TASKS, episodes_per_task=1, frame_stride=3)
    assert not (tmp_path / "three").exists()
