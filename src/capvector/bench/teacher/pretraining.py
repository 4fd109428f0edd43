"""Pretraining the frozen 3D teacher once, on rendered frames of many tasks: a stage the experiment caches.

Data. By default the teacher sees demonstration frames of the pretraining split only (12 tasks). The extraction
and downstream tasks' scenes are not in it, so like VGGT, which never saw the benchmark it is used on, it meets
those scenes first when it teaches (several of their objects, a faucet, a button, a plate, a handle, do appear in
pretraining scenes). Demonstration placements have seeds below 10^9 and evaluation placements seeds from 10^9 on
(capvector.bench.env.sim), and a dataset holding any evaluation placement is refused, so no evaluated placement
is ever in the teacher's data. Whole episodes (every `validation_every`-th) are held out for validation.

Training. Frames are shifted at random as the policy's are (capvector.bench.augmentation), with their depth and
point targets shifted alike, so the teacher is at home on the augmented images it reads online. Loss: L1 of depth
and of camera-frame points (depth times the pixel's ray, capvector.bench.env.camera) on the depth grid, in units
of 10 cm, plus the mean squared error of the object's and goal's positions relative to the hand predicted from
every patch (the positive control's target, capvector.bench.objectives.privileged), weighted by locate_weight.

    teacher_dir = pretrain_teacher(TeacherPretraining(dataset="runs/demos/pretrain"), "runs/teacher")
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from capvector.bench.augmentation import shift_images, shift_offsets
from capvector.bench.env.camera import pixel_rays
from capvector.bench.env.dataset import CAPVECTOR_META, DemoDataset, capvector_meta, image_size, open_meta
from capvector.bench.env.features import PRIVILEGED_KEY, STATE_KEY
from capvector.bench.env.sim import EVAL_SEED_OFFSET
from capvector.bench.env.tasks import resolve_tasks
from capvector.bench.objectives.privileged import relative_positions
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.probe import feature_statistics, position_share
from capvector.bench.teacher.configuration_teacher import TeacherConfig
from capvector.bench.teacher.modeling_teacher import RECORD_NAME, Teacher
from capvector.errors import CapvectorError
from capvector.files import read_json

LOSS_UNIT = 0.1  # metres: depth and point errors enter the loss in the localisation's units
# TeacherPretraining fields an experiment sets from its own regime (the frames' folder, their placements, the
# processes that record them); its config's teacher settings may set every other field.
SET_BY_EXPERIMENT = ("dataset", "placement", "workers")
RECORD_SUMMARY = ("frames", "validation", "probe", "probe_untrained")  # what pretraining_summary keeps of the record


@dataclass
class TeacherPretraining:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dataset: str | None = None  # a `capvector demos` folder; None: record one beside the teacher (<out>-frames)
    tasks: str = "pretrain"  # what to record when `dataset` is None
    # Localisation generalizes across placements only with many of them (a tiny teacher on 24 placements learned
    # none): more episodes, fewer frames of each. 16 x 12 tasks: ~19k frames read, ~6k kept.
    episodes_per_task: int = 16
    seed: int = 0  # demonstration seed of the recording (placements below 10^9)
    placement: str = "default"
    workers: int = 2
    # Every n-th control step of an episode: neighbouring frames are nearly the same image. The frames the teacher
    # records for itself are rendered at this stride (rendering is most of a recording's cost); a given dataset
    # recorded at a stride (its capvector block's frame_stride) must be read at a multiple of it.
    frame_stride: int = 4
    validation_every: int = 5  # every 5th episode is held out
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    shift: int = 4  # random shift in pixels, as the policy's augment_shift
    # The localisation term's weight against depth and points. Depth and points describe the view, which a moving
    # camera changes in every episode; weighting localisation up gives where the objects are a larger share of the
    # features (the acceptance probe), at some cost in depth error.
    locate_weight: float = 1.0
    train_seed: int = 0

    def __post_init__(self):
        if isinstance(self.teacher, dict):
            self.teacher = TeacherConfig(**self.teacher)
        for name in ("episodes_per_task", "frame_stride", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise CapvectorError(f"teacher pretraining: {name} must be at least 1, got {getattr(self, name)}")
        if not self.locate_weight >= 0:
            raise CapvectorError(f"teacher pretraining: locate_weight must be 0 or more, got {self.locate_weight}")
        if self.validation_every < 2:
            raise CapvectorError("teacher pretraining: validation_every must be at least 2 (some episodes train)")


@dataclass
class Frames:
    """Frames of a dataset as tensors: images uint8 (N, cameras, 3, H, W), depth (N, cameras, 1, H, W) metres
    (float16), state (N, 4), privileged (N, 6), episode (N,)."""

    images: torch.Tensor
    depth: torch.Tensor
    state: torch.Tensor
    privileged: torch.Tensor
    episode: torch.Tensor


def check_dataset(root: Path, config: TeacherConfig) -> dict:
    """The dataset's capvector block (capvector.bench.env.dataset), after refusing one that lacks what pretraining
    needs or holds evaluation placements."""
    meta = open_meta(root)
    needed = [f"observation.images.{c}" for c in config.cameras] + [f"observation.depth.{c}" for c in config.cameras]
    missing = [key for key in [*needed, STATE_KEY, PRIVILEGED_KEY] if key not in meta.features]
    block = capvector_meta(root)
    if missing or block is None:
        raise CapvectorError(
            f"teacher pretraining: dataset {root} has no {', '.join(missing) or CAPVECTOR_META}; the teacher learns "
            "from depth maps, the cameras' fields of view and the simulator's object and goal positions: record the "
            "frames with `capvector demos`"
        )
    if image_size(meta) != config.image_size:
        raise CapvectorError(
            f"teacher pretraining: dataset {root} has {image_size(meta)}px frames, the teacher config "
            f"asks for {config.image_size}px; record the frames at that size or change teacher.image_size"
        )
    episodes = meta.episodes
    evaluated = [e["episode_index"] for e in episodes if e["placement_seed"] >= EVAL_SEED_OFFSET]
    if evaluated:
        raise CapvectorError(
            f"teacher pretraining: dataset {root} holds evaluation placements (episodes {evaluated[:5]}); a teacher "
            "must never see them: record it with `capvector demos` (placement seeds below 10^9)"
        )
    return block


def load_frames(root: Path, cameras: tuple[str, ...], stride: int) -> Frames:
    """The frames of every `stride`-th control step of the dataset (recorded at a divisor of it), through the
    dataset reader."""
    recorded = (capvector_meta(root) or {}).get("frame_stride", 1)
    if stride % recorded:
        raise CapvectorError(
            f"teacher pretraining: frame_stride {stride} is not a multiple of the stride {recorded} that {root} was "
            f"recorded at; use {recorded} or a multiple of it"
        )
    dataset = DemoDataset(root, chunk_size=1, depth=True)
    lengths = [e["length"] for e in dataset.episodes]
    episode = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths))
    keep = range(0, len(dataset), stride // recorded)
    samples = [dataset[i] for i in keep]
    stack = lambda key: torch.stack([s[key] for s in samples])  # noqa: E731
    return Frames(
        images=torch.stack([stack(f"observation.images.{c}") for c in cameras], dim=1),
        depth=torch.stack([stack(f"observation.depth.{c}") for c in cameras], dim=1).half(),
        state=stack(STATE_KEY),
        privileged=stack(PRIVILEGED_KEY),
        episode=episode[list(keep)],
    )


def camera_rays(config: TeacherConfig) -> torch.Tensor:
    """(cameras, 3, H, W) pixel rays: depth times ray is the camera-frame point."""
    size = config.image_size
    rays = [torch.as_tensor(pixel_rays(config.fovy[c], size, size), dtype=torch.float32) for c in config.cameras]
    return torch.stack(rays).permute(0, 3, 1, 2)


def dense_targets(
    depth: torch.Tensor, rays: torch.Tensor, offsets: torch.Tensor, config: TeacherConfig, shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth (B, cameras, g, g) and camera-frame points (B, cameras, 3, g, g) averaged over the depth grid's
    cells, after shifting the full-resolution maps by the images' `offsets` (B * cameras, 2)."""
    metres = depth.float().clamp(0, config.max_depth)
    maps = torch.cat([metres, rays * metres], dim=2).flatten(0, 1)
    pooled = F.adaptive_avg_pool2d(shift_images(maps, offsets, shift), config.depth_grid)
    pooled = pooled.unflatten(0, depth.shape[:2])
    return pooled[:, :, 0], pooled[:, :, 1:]


def pretraining_loss(
    teacher: Teacher,
    frames: Frames,
    index: torch.Tensor,
    rays: torch.Tensor,
    shift: int,
    locate_weight: float,
    generator: torch.Generator,
) -> torch.Tensor:
    config = teacher.config
    images = frames.images[index]
    offsets = shift_offsets(images.shape[0] * images.shape[1], shift, generator)
    images = shift_images(images.flatten(0, 1), offsets, shift).view_as(images)
    depth, points = dense_targets(frames.depth[index], rays, offsets, config, shift)
    located = relative_positions(frames.privileged[index], frames.state[index], config.locate_scale)
    predicted = teacher.predict(teacher(images))
    return (
        F.l1_loss(predicted["depth"], depth) / LOSS_UNIT
        + F.l1_loss(predicted["points"], points) / LOSS_UNIT
        + locate_weight * F.mse_loss(predicted["locate"], located.unsqueeze(1).expand_as(predicted["locate"]))
    )


@torch.no_grad()
def encode(teacher: Teacher, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([teacher(images[i : i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def validation_errors(teacher: Teacher, frames: Frames, rays: torch.Tensor) -> dict[str, float]:
    """Held-out errors without augmentation: depth (mean absolute, m), points (mean distance, m), object and goal
    positions (mean distance in cm of the patches' average prediction; beside it, predicting the mean)."""
    config = teacher.config
    features = encode(teacher, frames.images)
    predicted = teacher.predict(features)
    no_shift = torch.zeros(frames.depth.shape[0] * frames.depth.shape[1], 2, dtype=torch.long)
    depth, points = dense_targets(frames.depth, rays, no_shift, config, 0)
    located = relative_positions(frames.privileged, frames.state, config.locate_scale)
    guess = predicted["locate"].mean(1)
    distance = lambda a, b: (a - b).unflatten(-1, (2, 3)).norm(dim=-1).mean() * config.locate_scale * 100  # noqa: E731
    return {
        "depth_mae_m": float((predicted["depth"] - depth).abs().mean()),
        "point_error_m": float((predicted["points"] - points).norm(dim=2).mean()),
        "localisation_error_cm": float(distance(guess, located)),
        "localisation_error_cm_predicting_the_mean": float(distance(located.mean(0), located)),
    }


def training_frames(frames: Frames, validation_every: int) -> torch.Tensor:
    """Which frames a teacher trains on (N,): all but those of every `validation_every`-th episode, held out."""
    return frames.episode % validation_every != validation_every - 1


def probe(teacher: Teacher, frames: Frames, train: torch.Tensor) -> dict[str, float]:
    """The acceptance probe on the teacher's normalized features (statistics from the training frames)."""
    features = encode(teacher, frames.images)
    mean, std = feature_statistics(features[train])
    hand = frames.state[:, :3]
    return position_share((features - mean) / std, hand, frames.privileged, train)


def train_teacher(config: TeacherPretraining, frames: Frames, train: torch.Tensor) -> Teacher:
    """A teacher trained on the `train` frames, its feature statistics set from them (un-augmented)."""
    torch.manual_seed(config.train_seed)
    teacher = Teacher(config.teacher)
    rays = camera_rays(config.teacher)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(config.train_seed)
    pool = train.nonzero()[:, 0]
    teacher.train()
    for _ in range(config.steps):
        index = pool[torch.randint(len(pool), (config.batch_size,), generator=generator)]
        loss = pretraining_loss(teacher, frames, index, rays, config.shift, config.locate_weight, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    teacher.eval()
    return with_feature_statistics(teacher, frames.images[train]).requires_grad_(False)


def with_feature_statistics(teacher: Teacher, images: torch.Tensor) -> Teacher:
    """`teacher` with the statistics its features are normalized by (per-patch mean, per-channel std) set from
    `images` (un-augmented)."""
    mean, std = feature_statistics(encode(teacher, images))
    teacher.feature_mean.copy_(mean)
    teacher.feature_std.copy_(std)
    return teacher


def record_frames(
    config: TeacherPretraining, root: Path, tasks: list[str], variant: str = "default", overwrite: bool = False
) -> None:
    """Record the teacher's frames into `root`: config.episodes_per_task episodes of each of `tasks` in the look
    `variant`, on config's placements, seed, image size and frame stride."""
    from capvector.bench.env.demos import generate_demonstrations  # the simulator, only when recording

    generate_demonstrations(
        root,
        tasks,
        config.episodes_per_task,
        seed=config.seed,
        image_size=config.teacher.image_size,
        workers=config.workers,
        variant=variant,
        placement=config.placement,
        overwrite=overwrite,
        frame_stride=config.frame_stride,
    )


def frames_folder(config: TeacherPretraining, out_dir: Path) -> Path:
    """The dataset to pretrain on: config.dataset, or the frames recorded beside `out_dir` (recorded once)."""
    if config.dataset is not None:
        return Path(config.dataset)
    root = out_dir.parent / f"{out_dir.name}-frames"
    tasks = resolve_tasks(config.tasks)
    recorded = read_json(root / "meta" / "info.json") or {}
    block = capvector_meta(root) or {}  # absent in a folder of an older format: recorded anew
    reusable = (
        recorded.get("total_episodes") == len(tasks) * config.episodes_per_task
        and (block.get("seed"), block.get("placement"), block.get("frame_stride", 1))
        == (config.seed, config.placement, config.frame_stride)
        and image_size(open_meta(root)) == config.teacher.image_size
    )
    if not reusable:
        record_frames(config, root, tasks, overwrite=True)
    return root


def pretrain_teacher(config: TeacherPretraining, out_dir: str | Path) -> Path:
    """Pretrain the teacher into `out_dir` (model.safetensors, config.json, pretraining.json with the validation
    errors and the probe) and return it; a folder already pretrained with this config is returned as it is."""
    out_dir = Path(out_dir)
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))
    record = read_json(out_dir / RECORD_NAME)
    if record is not None:
        if record.get("pretraining") == wanted:
            return out_dir
        raise CapvectorError(
            f"teacher pretraining: {out_dir} holds a teacher pretrained with another config; choose another "
            "folder or delete it"
        )
    start = time.perf_counter()
    root = frames_folder(config, out_dir)
    block = check_dataset(root, config.teacher)
    fovy = {c: float(block["cameras"][c]["fovy"]) for c in config.teacher.cameras}
    config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, fovy=fovy))
    frames = load_frames(root, config.teacher.cameras, config.frame_stride)
    train = training_frames(frames, config.validation_every)
    torch.manual_seed(config.train_seed)
    untrained = probe(Teacher(config.teacher).eval(), frames, train)
    teacher = train_teacher(config, frames, train)
    held_out = Frames(*(getattr(frames, f.name)[~train] for f in dataclasses.fields(Frames)))
    result = {
        "pretraining": wanted,
        "dataset": str(root),
        "frames": {"train": int(train.sum()), "validation": int((~train).sum())},
        "validation": validation_errors(teacher, held_out, camera_rays(config.teacher)),
        "probe": probe(teacher, frames, train),
        "probe_untrained": untrained,
        "seconds": time.perf_counter() - start,
    }
    teacher.save_pretrained(out_dir, record=result)
    return out_dir


def experiment_teacher(
    settings: dict[str, Any], image_size: int, policy: dict[str, Any], where: str, **regime: Any
) -> TeacherPretraining:
    """The teacher an experiment pretrains: its config's `settings` (TeacherPretraining fields, "teacher" a dict of
    TeacherConfig fields), for the image size and patch grid of its policy (PolicyConfig fields `policy`), so that
    the teacher's patch features match the visual tokens, with the SET_BY_EXPERIMENT fields from `regime`. `where`
    names the config in messages."""
    open_fields = {f.name for f in dataclasses.fields(TeacherPretraining)} - set(SET_BY_EXPERIMENT)
    unknown = sorted(set(settings) - open_fields)
    if unknown:
        raise CapvectorError(
            f"{where}: teacher fields {unknown} are not TeacherPretraining settings it may set; valid: "
            f"{', '.join(sorted(open_fields))}"
        )
    settings = dict(settings)
    teacher = settings.pop("teacher", {})
    unknown = sorted(set(teacher) - {f.name for f in dataclasses.fields(TeacherConfig)})
    if unknown:
        raise CapvectorError(f"{where}: teacher.teacher fields {unknown} are not TeacherConfig fields")
    teacher |= {"image_size": image_size, "patch_grid": PolicyConfig(image_size=image_size, **policy).patch_grid}
    return TeacherPretraining(teacher=teacher, **settings, **regime)


def pretraining_summary(teacher_dir: Path) -> dict[str, Any]:
    """What an experiment keeps of a pretrained teacher's record: its frames, validation errors and probes."""
    record = json.loads((teacher_dir / RECORD_NAME).read_text())
    return {key: record[key] for key in RECORD_SUMMARY}


def describe_teacher(pretraining: dict[str, Any]) -> str:
    """The teacher's pretraining figures and its acceptance probe (pretraining_summary's), in one line."""
    errors, share = pretraining["validation"], pretraining["probe"]["share"]
    return (
        f"The teacher, on {pretraining['frames']['validation']} held-out frames of its pretraining episodes: depth "
        f"error {100 * errors['depth_mae_m']:.1f} cm, camera-frame points {100 * errors['point_error_m']:.1f} cm, "
        f"object/goal localisation {errors['localisation_error_cm']:.1f} cm (predicting the mean: "
        f"{errors['localisation_error_cm_predicting_the_mean']:.1f}). Share of its normalized features' variance that "
        f"object and goal positions explain beyond patch and hand position: {share:.3f} (untrained "
        f"{pretraining['probe_untrained']['share']:.3f}; the issue's bar: 0.30)."
    )
