"""The Spatial Forcing analog: align intermediate visual tokens with a 3D teacher signal from depth.

Spatial Forcing aligns the policy's visual tokens at an intermediate layer with a frozen 3D foundation
model's features by a cosine loss. The simulator gives 3D for free: each pixel's depth and the camera's
field of view give its 3D point in the camera frame. The teacher feature of a patch token is the kernel
mean embedding of the patch's points: the average over the patch's pixels of a fixed random Fourier
feature lift [sin(W p), cos(W p)] of each point p (metres), with frequencies at length scales from 1 cm
(well above the stored depth's 1 mm steps) to 20 cm. A bare 3D point would make a poor cosine target
(its direction is the pixel's ray, the same in every scene); the lifted average describes where the
patch's surfaces are and how they are spread (depth edges, object heights), so the token has to encode
the scene's geometry to match it. Much of the target is still constant per patch (a fixed camera sees a
mostly static table); that part is fit early from position embeddings, and the cosine's gradient then
comes from what moves: the arm, the objects and their depth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from capvector.bench.env.camera import pixel_rays
from capvector.bench.objectives.tokens import TokenObjective
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.errors import CapvectorError


def patch_point_features(points: torch.Tensor, frequencies: torch.Tensor, grid: int) -> torch.Tensor:
    """Camera-frame points (B, h, w, 3) -> (B, grid * grid, 2F) mean Fourier features per patch (row-major)."""
    phase = points @ frequencies.T
    lifted = torch.cat([phase.sin(), phase.cos()], dim=-1).permute(0, 3, 1, 2)
    return F.adaptive_avg_pool2d(lifted, grid).flatten(2).transpose(1, 2)


def cosine_alignment_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity over tokens."""
    return 1 - F.cosine_similarity(prediction, target, dim=-1).mean()


class SpatialObjective(TokenObjective):
    """Hooks `layer` (default: the trunk layer at ~2/3 depth) and aligns its visual tokens with depth geometry.

    `fovy` maps each camera to its vertical field of view in degrees (the dataset's meta has it). The rays and the
    projector's sizes come from the policy, so they are built in `attach` (before the optimizer is made).
    """

    LAYOUT = ("cameras", "image_size", "patch_grid", "dim")  # what the projector and rays were built for
    frequencies: torch.Tensor

    def __init__(
        self,
        fovy: Mapping[str, float],
        layer: str | None = None,
        weight: float = 0.5,
        num_frequencies: int = 64,
        scales: tuple[float, float] = (0.01, 0.2),
        samples_per_patch: int = 4,
        max_depth: float = 3.0,
        seed: int = 0,
    ):
        super().__init__(layer or "", weight, "spatial objective", hidden_ratio=2)
        self.fovy = {camera: float(value) for camera, value in fovy.items()}
        self.samples_per_patch = samples_per_patch
        self.max_depth = max_depth
        generator = torch.Generator().manual_seed(seed)
        scale = torch.logspace(math.log10(scales[0]), math.log10(scales[1]), num_frequencies)
        frequencies = torch.randn(num_frequencies, 3, generator=generator) / scale[:, None]
        self.register_buffer("frequencies", frequencies, persistent=False)
        self.config: PolicyConfig | None = None

    def prepare(self, config: PolicyConfig) -> int:
        """The rays of every camera at the sampled pixels; the targets' width."""
        if self.config is not None:
            if any(getattr(config, name) != getattr(self.config, name) for name in self.LAYOUT):
                raise CapvectorError(f"spatial objective: it was built for another policy; its {self.LAYOUT} differ")
            return 2 * len(self.frequencies)
        missing = [camera for camera in config.cameras if camera not in self.fovy]
        if missing:
            raise CapvectorError(
                f"spatial objective: no field of view for cameras {missing}; pass fovy per camera "
                "(degrees), as in the dataset's meta"
            )
        self.config = config
        size, grid = config.image_size, config.patch_grid
        # Points at a few pixels per patch side: the patch statistics barely change, the cost drops ~16x.
        self.stride = max(size // (grid * self.samples_per_patch), 1)
        for camera in config.cameras:
            rays = torch.as_tensor(pixel_rays(self.fovy[camera], size, size, self.stride), dtype=torch.float32)
            self.register_buffer(f"rays_{camera}", rays.to(self.frequencies.device), persistent=False)
        return 2 * len(self.frequencies)

    @torch.no_grad()
    def targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """(B, cameras * grid**2, 2F) teacher features, in the order of the policy's visual tokens."""
        if self.config is None:
            raise CapvectorError("spatial objective: attach it to the policy (attach(policy)) before using it")
        config, per_camera = self.config, []
        start = self.stride // 2
        for camera in config.cameras:
            key = f"observation.depth.{camera}"
            if key not in batch:
                raise CapvectorError(
                    f"spatial objective: the batch has no '{key}'; the dataset must include depth "
                    "maps for the spatial objective"
                )
            depth = batch[key].to(self.frequencies.device)[:, 0, start :: self.stride, start :: self.stride]
            points = getattr(self, f"rays_{camera}") * depth.clamp(0, self.max_depth).unsqueeze(-1)
            per_camera.append(patch_point_features(points, self.frequencies, config.patch_grid))
        return torch.cat(per_camera, dim=1)

    def compute(self, features: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        return cosine_alignment_loss(self.project(features), self.targets(batch))
