"""The frozen 3D teacher: a small hybrid ViT over one camera frame with depth, point-map and localisation heads.

VGGT's role in Spatial Forcing: pretrained once on rendered frames of many Meta-World tasks to predict each
patch's depth and camera-frame 3D points and where the manipulated object and the goal are, then frozen; its
last-layer patch features are the alignment target. The heads are linear on those features, so everything
they predict has to be linearly readable from them: geometry and object positions, per patch.

The features are used normalized: `feature_mean` (per camera and patch position, over the pretraining frames) is
removed and each channel divided by `feature_std`, so that what is left describes the scene rather than where
the patch sits. Both statistics are buffers saved in model.safetensors with the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from capvector.bench.env.features import PRIVILEGED_DIM
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.policy.modeling_policy import (
    CONFIG_NAME,
    VisionEncoder,
    load_weights,
    require_folder,
    save_folder,
)
from capvector.bench.teacher.configuration_teacher import TeacherConfig

RECORD_NAME = "pretraining.json"


def blocks_to_map(values: torch.Tensor, grid: int, channels: int) -> torch.Tensor:
    """Per-patch blocks (B, cameras, grid**2, channels * s * s), row-major patches -> maps (B, cameras, channels,
    grid * s, grid * s)."""
    batch, cameras = values.shape[:2]
    side = round((values.shape[-1] // channels) ** 0.5)
    blocks = values.view(batch, cameras, grid, grid, channels, side, side)
    return blocks.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, cameras, channels, grid * side, grid * side)


class Teacher(nn.Module):
    """`teacher(images)`: uint8 (B, cameras, 3, H, W) -> last-layer patch features (B, cameras * patch_grid**2, dim),
    cameras in config order, patches row-major: the order of the policy's visual tokens."""

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, config: TeacherConfig):
        super().__init__()
        self.config = config
        self.encoder = VisionEncoder(
            PolicyConfig(
                cameras=config.cameras,
                image_size=config.image_size,
                patch_grid=config.patch_grid,
                stem_channels=config.stem_channels,
                vision_layers=config.layers,
                dim=config.dim,
                heads=config.heads,
                mlp_ratio=config.mlp_ratio,
            )
        )
        self.norm = nn.LayerNorm(config.dim)
        cells = (config.depth_grid // config.patch_grid) ** 2
        self.depth_head = nn.Linear(config.dim, cells)
        self.point_head = nn.Linear(config.dim, 3 * cells)
        self.locate_head = nn.Linear(config.dim, PRIVILEGED_DIM)
        tokens = len(config.cameras) * config.patch_grid**2
        self.register_buffer("feature_mean", torch.zeros(tokens, config.dim))
        self.register_buffer("feature_std", torch.ones(config.dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(images))

    def normalized(self, images: torch.Tensor) -> torch.Tensor:
        """The alignment target: features with the per-patch mean removed, each channel standardized."""
        return (self(images) - self.feature_mean) / self.feature_std

    def predict(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads: depth (B, cameras, g, g) and camera-frame points (B, cameras, 3, g, g) in metres on the
        depth grid g, and from every patch the object's and goal's positions relative to the hand (B, tokens, 6)
        in units of locate_scale."""
        grid = self.config.patch_grid
        per_camera = features.unflatten(1, (len(self.config.cameras), grid**2))
        return {
            "depth": blocks_to_map(self.depth_head(per_camera), grid, 1)[:, :, 0],
            "points": blocks_to_map(self.point_head(per_camera), grid, 3),
            "locate": self.locate_head(features),
        }

    def save_pretrained(self, directory: str | Path, record: dict[str, Any] | None = None) -> None:
        """model.safetensors (weights and feature statistics) + config.json (+ `record` as pretraining.json: how
        it was made and what it scored), written together atomically."""
        save_folder(self, self.config, directory, {} if record is None else {RECORD_NAME: record})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Teacher:
        """The frozen teacher in `directory` (eval mode, no gradients)."""
        folder = Path(directory)
        require_folder(folder, "teacher", "capvector.bench.teacher.pretraining.pretrain_teacher")
        teacher = cls(TeacherConfig.from_json(folder / CONFIG_NAME))
        load_weights(teacher, folder, "teacher")
        return teacher.requires_grad_(False).eval().to(device)
