"""Configuration of the benchmark's small VLA policy, stored as config.json next to the weights.

The normalization statistics live here rather than in the weights file, so model.safetensors holds only
trained parameters and capability vectors (differences of weights) never touch them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from capvector.bench.env.camera import CAMERAS
from capvector.bench.env.features import ACTION_KEY, PRIVILEGED_KEY, STATE_KEY
from capvector.errors import CapvectorError


@dataclass
class PolicyConfig:
    # Inputs: cameras are read from "observation.images.<camera>", uint8 (3, image_size, image_size).
    cameras: tuple[str, ...] = CAMERAS
    image_size: int = 64
    state_dim: int = 4
    # An oracle's extra input: the simulator's object and goal positions ("observation.privileged"), one more token.
    # 0 for every real policy; only the oracles set it (capvector headroom's oracle arm, reproduce's oracle method).
    privileged_dim: int = 0
    # An oracle reads its positions with this much Gaussian noise (metres, each coordinate, drawn at every read, in
    # training and at evaluation): how precisely must a policy know where things are for it to help?
    privileged_noise: float = 0.0
    # Or with a systematic error of this size (metres RMS per coordinate over placements): a fixed smooth function of
    # where each thing is (modeling_policy.position_bias), the same at every read of the same scene, as a learned
    # estimate's error is; averaging over reads, which removes fresh noise, does not remove it.
    privileged_bias: float = 0.0
    action_dim: int = 4
    chunk_size: int = 8
    # Vision: a conv stem downsamples each image to a patch_grid x patch_grid map of patch tokens.
    patch_grid: int = 4
    stem_channels: tuple[int, ...] = (16, 32, 64)
    vision_layers: int = 1
    # Training images are shifted at random by up to this many pixels (DrQ; capvector.bench.augmentation) in
    # forward, never at evaluation. It lives here so that every finetune of a policy augments as its pretraining
    # did, whatever the method; the teacher alignment objective reads the shifted images. 0: off.
    augment_shift: int = 0
    # Instruction: words are hashed into a fixed table, so any instruction (also a held-out task's) has
    # tokens and the table's shape never depends on the task set; capability vectors need equal shapes.
    text_buckets: int = 4096  # no collisions among the benchmark's 47 words
    max_words: int = 10
    text_layers: int = 1
    # Trunk over [instruction, visual, state, action queries]. Sized for speed on 2 CPU cores (~0.23 GFLOP
    # per training sample): 4x4 patches per camera, a narrow MLP and 4 layers keep the token count and width low.
    dim: int = 128
    heads: int = 4
    trunk_layers: int = 4
    mlp_ratio: int = 2
    # Normalization to [-1, 1] by the 1st/99th percentiles; the defaults are Meta-World's action box and
    # a rough bound of the hand's workspace, replaced by the dataset's statistics in from_dataset_stats.
    state_q01: list[float] = field(default_factory=lambda: [-0.5, 0.3, 0.0, 0.0])
    state_q99: list[float] = field(default_factory=lambda: [0.5, 1.0, 0.4, 1.0])
    action_q01: list[float] = field(default_factory=lambda: [-1.0, -1.0, -1.0, -1.0])
    action_q99: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    privileged_q01: list[float] = field(default_factory=list)
    privileged_q99: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.cameras = tuple(self.cameras)
        self.stem_channels = tuple(self.stem_channels)
        if self.image_size % self.patch_grid:
            raise CapvectorError(
                f"policy config: image_size {self.image_size} is not a multiple of patch_grid {self.patch_grid}"
            )
        if 2 ** len(self.stem_channels) * self.patch_grid > self.image_size:
            raise CapvectorError(
                f"policy config: {len(self.stem_channels)} stride-2 stem convolutions shrink a {self.image_size}px "
                f"image below patch_grid {self.patch_grid}; use fewer stem_channels or a smaller patch_grid"
            )
        for name in ("privileged_noise", "privileged_bias"):
            if getattr(self, name) < 0:
                raise CapvectorError(f"policy config: {name} {getattr(self, name)} must be >= 0 metres")
        if not 0 <= self.augment_shift < self.image_size // 2:
            raise CapvectorError(
                f"policy config: augment_shift {self.augment_shift} must be in [0, {self.image_size // 2}) pixels"
            )
        if self.dim % self.heads:
            raise CapvectorError(f"policy config: dim {self.dim} is not divisible by heads {self.heads}")
        for name, size in [
            ("state_q01", self.state_dim),
            ("state_q99", self.state_dim),
            ("action_q01", self.action_dim),
            ("action_q99", self.action_dim),
            ("privileged_q01", self.privileged_dim),
            ("privileged_q99", self.privileged_dim),
        ]:
            if len(getattr(self, name)) != size:
                raise CapvectorError(f"policy config: {name} has {len(getattr(self, name))} values, expected {size}")

    @property
    def hook_layer(self) -> str:
        """The trunk layer at about 2/3 depth, where Spatial Forcing reads the visual tokens."""
        return f"trunk.layers.{max(round(2 * self.trunk_layers / 3) - 1, 0)}"

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> PolicyConfig:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CapvectorError(f"policy config: cannot read {path}: {error}") from error
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CapvectorError(f"policy config: {path} has unknown fields {unknown}; it is not a capvector policy")
        return cls(**values)

    @classmethod
    def from_dataset_stats(cls, stats: Mapping[str, Mapping[str, list]], **overrides) -> PolicyConfig:
        """A config whose normalization comes from a dataset's stats (feature -> stat -> values)."""
        features = [(STATE_KEY, "state"), (ACTION_KEY, "action")]
        if overrides.get("privileged_dim"):
            features.append((PRIVILEGED_KEY, "privileged"))
        return cls(**{**normalization_bounds(stats, features), **overrides})


def normalization_bounds(
    stats: Mapping[str, Mapping[str, list]], features: list[tuple[str, str]]
) -> dict[str, list[float]]:
    """{"<prefix>_q01": [...], "<prefix>_q99": [...]} of each (dataset key, config prefix) in `features`."""
    bounds = {}
    for key, prefix in features:
        for stat in ("q01", "q99"):
            try:
                bounds[f"{prefix}_{stat}"] = [float(v) for v in stats[key][stat]]
            except KeyError as error:
                raise CapvectorError(
                    f"dataset stats: missing '{key}' -> '{stat}'; regenerate the dataset's meta/stats.json"
                ) from error
    return bounds


def with_privileged(config: PolicyConfig, stats: Mapping[str, Mapping[str, list]], privileged_dim: int) -> PolicyConfig:
    """`config` made an oracle's: told the object and goal positions (`privileged_dim` values, normalized by the
    dataset `stats`) as one more token."""
    bounds = normalization_bounds(stats, [(PRIVILEGED_KEY, "privileged")])
    return dataclasses.replace(
        config,
        privileged_dim=privileged_dim,
        privileged_q01=bounds["privileged_q01"],
        privileged_q99=bounds["privileged_q99"],
    )


def policy_config(policy: object, user: str) -> PolicyConfig:
    """The benchmark policy's config; `user` (an auxiliary objective) is named when the policy is another kind."""
    config = getattr(policy, "config", None)
    if not isinstance(config, PolicyConfig):
        raise CapvectorError(
            f"{user}: the policy has no PolicyConfig; it works with capvector.bench.policy.modeling_policy.Policy"
        )
    return config
