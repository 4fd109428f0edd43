"""Configuration of the frozen 3D teacher, stored as config.json next to its weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from capvector.bench.env.camera import CAMERAS
from capvector.errors import CapvectorError


@dataclass
class TeacherConfig:
    # Inputs, as the policy gets them: "observation.images.<camera>", uint8 (3, image_size, image_size). One
    # encoder reads each camera's frame on its own (a learned camera embedding tells them apart).
    cameras: tuple[str, ...] = CAMERAS
    image_size: int = 64
    # The policy's patch grid, so that the teacher's patch features align 1:1 with the policy's visual tokens.
    patch_grid: int = 4
    # A small hybrid ViT (the policy's vision encoder design: stride-2 conv stem, patchify, transformer).
    stem_channels: tuple[int, ...] = (16, 32, 64)
    dim: int = 128
    heads: int = 4
    layers: int = 4
    mlp_ratio: int = 2
    # Dense heads predict depth and camera-frame points on a depth_grid x depth_grid map per camera.
    depth_grid: int = 16
    max_depth: float = 3.0  # metres; farther depth (the background) is clipped
    locate_scale: float = 0.1  # object and goal positions relative to the hand are predicted in these metres
    # Vertical field of view per camera (degrees), from the dataset it was pretrained on: the point-map targets.
    fovy: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.cameras = tuple(self.cameras)
        self.stem_channels = tuple(self.stem_channels)
        if self.image_size % self.depth_grid or self.depth_grid % self.patch_grid:
            raise CapvectorError(
                f"teacher config: depth_grid {self.depth_grid} must divide image_size {self.image_size} and be a "
                f"multiple of patch_grid {self.patch_grid}"
            )
        if self.dim % self.heads:
            raise CapvectorError(f"teacher config: dim {self.dim} is not divisible by heads {self.heads}")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> TeacherConfig:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CapvectorError(f"teacher config: cannot read {path}: {error}") from error
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CapvectorError(f"teacher config: {path} has unknown fields {unknown}; it is not a capvector teacher")
        return cls(**values)

    def check_fits(self, cameras: tuple[str, ...], image_size: int, patch_grid: int, where: str) -> None:
        """Refuse, in one line, a teacher built for other cameras, another image size or another patch grid."""
        mine = (tuple(self.cameras), self.image_size, self.patch_grid)
        theirs = (tuple(cameras), image_size, patch_grid)
        if mine != theirs:
            raise CapvectorError(
                f"teacher {where}: it was pretrained for cameras {list(mine[0])}, image_size {mine[1]}, patch_grid "
                f"{mine[2]}, but the policy has cameras {list(theirs[0])}, image_size {theirs[1]}, patch_grid "
                f"{theirs[2]}; pretrain a teacher for this policy (capvector.bench.teacher.pretraining)"
            )
