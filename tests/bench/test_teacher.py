"""The frozen 3D teacher: what its features carry, its folder, its fit to the policy, and the online alignment."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from capvector.bench import recipe
from capvector.bench.augmentation import random_shift, shift_images
from capvector.bench.env.camera import CAMERAS
from capvector.bench.env.demos import generate_demonstrations
from capvector.bench.env.sim import SimEnv
from capvector.bench.objectives.alignment import TeacherAlignment
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.policy.modeling_policy import Policy
from capvector.bench.teacher.configuration_teacher import TeacherConfig
from capvector.bench.teacher.modeling_teacher import Teacher
from capvector.bench.teacher.pretraining import (
    Frames,
    TeacherPretraining,
    camera_rays,
    check_dataset,
    pretrain_teacher,
    pretraining_loss,
    probe,
    train_teacher,
    with_feature_statistics,
)
from capvector.cli import main
from capvector.errors import CapvectorError

SIZE = 32
TINY = dict(image_size=SIZE, stem_channels=(8, 16), dim=32, heads=2, layers=2, depth_grid=8)
POLICY = dict(image_size=SIZE, stem_channels=(8, 8), dim=16, heads=2, trunk_layers=1)


def sim_frames(tasks, placements, every=20, steps=21):
    """Frames of many placements (a few per expert episode): a linear probe needs many object positions."""
    keys = ("images", "depth", "state", "privileged", "episode")
    out = {key: [] for key in keys}
    for task in tasks:
        env = SimEnv(task, image_size=SIZE)
        expert = env.expert()
        for seed in range(placements):
            obs = env.reset(seed)
            for step in range(steps):
                if step % every == 0:
                    frame = env.observe()
                    out["images"].append(np.stack([frame[f"observation.images.{c}"] for c in CAMERAS]))
                    out["depth"].append(np.stack([frame[f"observation.depth.{c}"] for c in CAMERAS]))
                    out["state"].append(frame["observation.state"])
                    out["privileged"].append(frame["observation.privileged"])
                    out["episode"].append(len(out["episode"]) // (steps // every + 1))
                obs, _ = env.step(np.clip(expert.get_action(obs), -1, 1))
        fovy = env.camera_fovy
        env.close()
    frames = Frames(*(torch.as_tensor(np.stack(out[key])) for key in keys))
    frames.depth = frames.depth.half()
    return frames, fovy


@pytest.fixture(scope="module")
def frames():
    return sim_frames(["button-press-topdown-v3", "plate-slide-v3"], placements=16)


def tiny_teacher(seed=0, **changes):
    torch.manual_seed(seed)
    return Teacher(TeacherConfig(**{**TINY, "fovy": {"scene": 40.0, "wrist": 90.0}, **changes}))


def test_a_pretrained_teacher_carries_object_positions_a_random_one_less(frames):
    """The acceptance probe: the share of the normalized features' variance that object and goal positions explain
    beyond patch and hand position, on held-out placements. The control is the same network untrained: random conv
    features carry some positions already (0.18 here), so pretraining on depth, points and positions must add to
    that. 0.2 is what a tiny teacher clears after 120 steps on 24 placements (0.23; 0.24 with 36 placements and 300
    steps); the full-size teacher's bar is 0.3."""
    frames, fovy = frames
    config = TeacherPretraining(teacher=TeacherConfig(**TINY, fovy=fovy), steps=120, batch_size=32, lr=3e-3, shift=2)
    train = frames.episode % 4 != 3
    torch.manual_seed(config.train_seed)
    untrained = probe(Teacher(config.teacher).eval(), frames, train)
    trained = probe(train_teacher(config, frames, train), frames, train)
    assert abs(trained["patch"]) < 1e-6  # the per-patch mean is removed: patch position alone explains nothing
    assert trained["share"] > 0.2 and trained["share"] > untrained["share"], (trained, untrained)


def test_the_localisation_term_enters_the_loss_with_its_weight(frames):
    frames, fovy = frames
    teacher = tiny_teacher(fovy=fovy)
    rays, index = camera_rays(teacher.config), torch.arange(8)

    def loss(weight):
        return float(pretraining_loss(teacher, frames, index, rays, 2, weight, torch.Generator().manual_seed(0)))

    located = loss(1.0) - loss(0.0)
    assert located > 0 and loss(3.0) - loss(0.0) == pytest.approx(3 * located, rel=1e-4)
    with pytest.raises(CapvectorError, match="locate_weight must be 0 or more"):
        TeacherPretraining(locate_weight=-1.0)


def test_feature_statistics_normalize_the_frames_they_come_from():
    """What a teacher's features are normalized by: on the frames they were set from, each token's features average
    0 over the frames and each channel, over frames and tokens, has standard deviation 1."""
    images = torch.randint(0, 256, (6, 2, 3, SIZE, SIZE), dtype=torch.uint8)
    teacher = with_feature_statistics(tiny_teacher().eval(), images)
    normalized = teacher.normalized(images)
    assert normalized.mean(0).abs().max() < 1e-4
    torch.testing.assert_close(normalized.flatten(0, 1).std(0), torch.ones(normalized.shape[-1]))


def test_save_load_round_trip_keeps_weights_and_feature_statistics(tmp_path):
    teacher = tiny_teacher()
    teacher.feature_mean.normal_()
    teacher.feature_std.uniform_(0.5, 2)
    teacher.save_pretrained(tmp_path / "teacher", record={"note": "test"})
    assert sorted(p.name for p in (tmp_path / "teacher").iterdir()) == [
        "config.json",
        "model.safetensors",
        "pretraining.json",
    ]
    assert "feature_mean" in load_file(tmp_path / "teacher" / "model.safetensors")  # saved with the weights
    loaded = Teacher.from_pretrained(tmp_path / "teacher")
    images = torch.randint(0, 256, (2, 2, 3, SIZE, SIZE), dtype=torch.uint8)
    assert torch.equal(loaded.normalized(images), teacher.eval().normalized(images))
    assert not any(p.requires_grad for p in loaded.parameters())
    (tmp_path / "teacher" / "model.safetensors").unlink()
    with pytest.raises(CapvectorError, match="model.safetensors is missing"):
        Teacher.from_pretrained(tmp_path / "teacher")


def test_heads_lay_patch_blocks_out_as_maps():
    """Each patch's depth block lands where the patch is in the image (row-major patches, cameras apart)."""
    teacher = tiny_teacher()
    with torch.no_grad():
        teacher.depth_head.weight.zero_()
        teacher.depth_head.bias.copy_(torch.arange(4.0))  # the 2x2 cells of each patch: 0 1 / 2 3
    depth = teacher.predict(torch.zeros(1, 2 * 16, 32))["depth"]
    assert depth.shape == (1, 2, 8, 8)
    assert torch.equal(depth[0, 0, :2, :4], torch.tensor([[0.0, 1, 0, 1], [2, 3, 2, 3]]))


@pytest.mark.parametrize(
    "change, named",
    [({"image_size": 64}, "image_size"), ({"cameras": ("scene",)}, "cameras"), ({"patch_grid": 2}, "patch_grid")],
)
def test_a_teacher_that_does_not_fit_the_policy_is_refused(tmp_path, change, named):
    tiny_teacher(**change).save_pretrained(tmp_path / "teacher")
    policy = Policy(PolicyConfig(**POLICY))
    objective = recipe.teacher_alignment(str(tmp_path / "teacher"))
    with pytest.raises(CapvectorError, match=f"pretrained for .*{named}.*pretrain a teacher for this policy"):
        objective.attach(policy)


def synthetic_batch(size=4):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    return {
        "observation.images.scene": images,
        "observation.images.wrist": images.flip(-1),
        "observation.state": torch.rand(size, 4, generator=generator),
        "instruction": ["press the button from the top"] * size,
        "action": torch.rand(size, 8, 4, generator=generator) * 2 - 1,
        "action_is_pad": torch.zeros(size, 8, dtype=torch.bool),
    }


def test_alignment_learns_on_augmented_images_and_never_touches_the_teacher():
    teacher = tiny_teacher()
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    torch.manual_seed(0)
    policy = Policy(PolicyConfig(**POLICY, augment_shift=2))
    objective = TeacherAlignment(teacher)
    objective.attach(policy)
    seen = []
    policy.vision.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    trainable = [p for module in (policy, objective) for p in module.parameters() if p.requires_grad]
    assert not any(p is q for p in trainable for q in teacher.parameters())  # the optimizer never gets it
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    batch = synthetic_batch()
    policy.train(), objective.train()
    losses = []
    for _ in range(30):
        policy(batch)
        images = seen[-1]
        teacher_input = objective._images
        loss = objective(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert teacher_input is images  # the teacher reads what the vision encoder read...
    original = torch.stack([batch["observation.images.scene"], batch["observation.images.wrist"]], dim=1)
    assert not torch.equal(images, original)  # ...shifted images
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[name], value) for name, value in teacher.state_dict().items())
    policy.eval()
    seen.clear()
    policy(batch)
    assert torch.equal(seen[-1], original)  # no augmentation outside training


def test_random_shift_moves_content_and_pads_with_the_border():
    images = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    assert torch.equal(shift_images(images, torch.tensor([[1, 1]]), 1), images)  # the centre offset: no shift
    shifted = shift_images(images, torch.tensor([[2, 0]]), 1)  # content moves up one row and right one column
    assert torch.equal(shifted[0, 0, :3, 1:], images[0, 0, 1:, :3])
    assert torch.equal(shifted[0, 0, :, 0], shifted[0, 0, :, 1])  # replicated border
    batch = torch.randint(0, 256, (8, 2, 3, 8, 8), dtype=torch.uint8)
    assert random_shift(batch, 2).shape == batch.shape and not torch.equal(random_shift(batch, 2), batch)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return generate_demonstrations(
        tmp_path_factory.mktemp("teacher") / "demos", "reach-v3", episodes_per_task=2, image_size=SIZE, workers=1
    )


def test_pretraining_is_a_cached_stage_that_records_its_errors_and_probe(demos, tmp_path):
    config = TeacherPretraining(
        teacher=TeacherConfig(**TINY), dataset=str(demos), steps=3, batch_size=8, frame_stride=8, validation_every=2
    )
    out = tmp_path / "teacher"
    assert pretrain_teacher(config, out) == out
    record = json.loads((out / "pretraining.json").read_text())
    assert set(record["validation"]) >= {"depth_mae_m", "point_error_m", "localisation_error_cm"}
    assert set(record["probe"]) == {"share", "patch", "base", "full"} and record["frames"]["validation"] > 0
    teacher = Teacher.from_pretrained(out)
    assert teacher.config.fovy["wrist"] == 90.0  # the cameras' fields of view come from the dataset
    written = (out / "model.safetensors").stat().st_mtime_ns
    assert pretrain_teacher(config, out) == out and (out / "model.safetensors").stat().st_mtime_ns == written
    with pytest.raises(CapvectorError, match="pretrained with another config"):
        pretrain_teacher(TeacherPretraining(**{**config.__dict__, "steps": 4}), out)


def edited_copy(demos, tmp_path, edit_info=None, edit_seeds=None):
    """A copy of `demos` with meta/info.json's text edited, and the episodes' placement seeds."""
    copy = tmp_path / "edited"
    shutil.copytree(demos, copy)
    if edit_info is not None:
        path = copy / "meta" / "info.json"
        path.write_text(edit_info(path.read_text()))
    if edit_seeds is not None:
        path = copy / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
        table = pq.read_table(path)
        seeds = pa.array(edit_seeds(table.column("placement_seed").to_pylist()), pa.int64())
        pq.write_table(table.set_column(table.schema.get_field_index("placement_seed"), "placement_seed", seeds), path)
    return copy


def test_a_dataset_without_depth_or_positions_or_with_evaluation_placements_is_refused(demos, tmp_path):
    def drop(text):
        info = json.loads(text)
        for key in ("observation.depth.wrist", "observation.privileged"):
            del info["features"][key]
        return json.dumps(info)

    with pytest.raises(CapvectorError, match="has no observation.depth.wrist, observation.privileged; the teacher"):
        check_dataset(edited_copy(demos, tmp_path / "a", edit_info=drop), TeacherConfig(**TINY))
    evaluated = edited_copy(
        demos,
        tmp_path / "b",
        edit_seeds=lambda seeds: [1_000_000_000, *seeds[1:]],
    )
    with pytest.raises(CapvectorError, match="holds evaluation placements"):
        check_dataset(evaluated, TeacherConfig(**TINY))
    with pytest.raises(CapvectorError, match="64px"):
        check_dataset(demos, TeacherConfig(**{**TINY, "image_size": 64}))


def test_training_with_a_misfit_teacher_exits_2_naming_it_and_with_a_fitting_one_runs(demos, tmp_path, capsys):
    tiny_teacher(image_size=64).save_pretrained(tmp_path / "teacher")
    config = {
        "strategy": "aux",
        "out_dir": str(tmp_path / "run"),
        "steps": 2,
        "batch_size": 4,
        "policy": "capvector.bench.recipe:policy",
        "policy_args": {
            "dataset": str(demos),
            "stem_channels": [8, 8],
            "dim": 16,
            "heads": 2,
            "trunk_layers": 1,
            "augment_shift": 2,
        },
        "init_from": None,
        "dataset": "capvector.bench.recipe:dataset",
        "dataset_args": {"root": str(demos), "depth": False},
        "auxiliary": "capvector.bench.recipe:teacher_alignment",
        "auxiliary_args": {"teacher": str(tmp_path / "teacher")},
        "progress": False,
        "tensorboard": False,
    }
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "image_size 64" in said[0] and "image_size 32" in said[0]
    assert not (tmp_path / "run" / "policy").exists()
    tiny_teacher().save_pretrained(tmp_path / "teacher")  # one that fits: the run trains with it online
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["loss/auxiliary"] > 0, logged
    with pytest.raises(CapvectorError, match="augment_shift 16 must be in"):
        PolicyConfig(image_size=SIZE, stem_channels=(8, 8), augment_shift=16)
