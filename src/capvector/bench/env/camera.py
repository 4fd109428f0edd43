"""The benchmark's cameras: their names, how the scene is shown in each environment variant, and the pinhole model.

Nothing here imports MuJoCo, so the training process (the spatial objective, the dataset) uses the same camera
model as the simulator without loading it.

Cameras (images are (H, W, 3) uint8, row 0 at the top; depth is metres along the camera axis):
- "scene": a fixed free camera looking at the table from the robot's right, slightly behind it, so the
  sides of objects that face the robot (buttons, handles, locks) show, narrow enough that objects are
  several pixels wide at 64x64 (the model's corner cameras are upside down and too wide).
- "wrist": the model's `gripperPOV` camera on the gripper.
Pinhole model (OpenCV axes, x right, y down, z forward): u = f * x / z + cx, v = f * y / z + cy with
f = (H / 2) / tan(fovy / 2), cx = (W - 1) / 2, cy = (H - 1) / 2 (pixel centres at integer u, v).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

CAMERAS = ("scene", "wrist")


@dataclass(frozen=True)
class Look:
    """How a scene is shown: scene camera pose and field of view, lighting and table colour."""

    lookat: tuple[float, float, float] = (0.0, 0.7, 0.05)
    distance: float = 1.1
    azimuth: float = 150.0  # degrees, MuJoCo free-camera convention (90: from behind the robot, -90: from the front)
    elevation: float = -40.0
    fovy: float = 40.0
    light_scale: float = 1.0  # multiplies the diffuse light of the headlight and the model's lights
    table_rgba: tuple[float, float, float, float] | None = None  # None keeps the model's
    # Per-episode viewpoint: azimuth and elevation (degrees) and distance (a fraction of it) drawn uniformly within
    # +- these of the values above, from the episode's placement seed (so every policy sees the same views).
    azimuth_jitter: float = 0.0
    elevation_jitter: float = 0.0
    distance_jitter: float = 0.0

    def for_episode(self, placement_seed: int) -> Look:
        """The look of one episode: this one, its scene camera moved within the jitter ranges."""
        if not (self.azimuth_jitter or self.elevation_jitter or self.distance_jitter):
            return self
        u = np.random.default_rng([VIEW_STREAM, int(placement_seed)]).uniform(-1.0, 1.0, size=3)
        return dataclasses.replace(
            self,
            azimuth=self.azimuth + u[0] * self.azimuth_jitter,
            elevation=self.elevation + u[1] * self.elevation_jitter,
            distance=self.distance * (1.0 + u[2] * self.distance_jitter),
        )


VIEW_STREAM = 7  # the random stream of per-episode views, apart from the simulator's placement draws


# "new_env" is the out-of-domain variant: the scene camera moved, dimmer light, a plain grey-green table.
# "random_view": the default look with the scene camera moved in every episode (azimuth +-40 degrees, elevation
# +-10, distance +-15%), so that where an object is on the table must be read through a changing projection.
VARIANTS = {
    "default": Look(),
    "new_env": Look(azimuth=170.0, elevation=-34.0, distance=1.15, light_scale=0.7, table_rgba=(0.42, 0.48, 0.4, 1.0)),
    "random_view": Look(azimuth_jitter=40.0, elevation_jitter=10.0, distance_jitter=0.15),
}


def intrinsics(fovy: float, height: int, width: int) -> np.ndarray:
    """3x3 pinhole matrix K (OpenCV axes) for a camera with vertical field of view `fovy` degrees."""
    f = (height / 2) / math.tan(math.radians(fovy) / 2)
    return np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]])


def project(points: np.ndarray, position: np.ndarray, rotation: np.ndarray, fovy: float, size: int) -> np.ndarray:
    """(N, 3) pixel column u, row v and depth z (metres along the camera axis) of world points (N, 3), seen by a
    camera at `position` with `rotation` (OpenCV axes as columns) in a size x size image."""
    camera_frame = (np.asarray(points, np.float64) - position) @ rotation
    z = camera_frame[:, 2]
    K = intrinsics(fovy, size, size)
    safe = np.where(np.abs(z) < 1e-9, 1e-9, z)  # a point in the camera's plane: u, v meaningless, z says so
    u = K[0, 0] * camera_frame[:, 0] / safe + K[0, 2]
    v = K[1, 1] * camera_frame[:, 1] / safe + K[1, 2]
    return np.stack([u, v, z], axis=1)


def pixel_rays(fovy: float, height: int, width: int, stride: int = 1) -> np.ndarray:
    """(h, w, 3) rays ((u - cx) / f, (v - cy) / f, 1) at pixels (v, u) on a grid of step `stride` starting at
    stride // 2; a ray times the pixel's depth is its camera-frame point."""
    K = intrinsics(fovy, height, width)
    v = (np.arange(stride // 2, height, stride) - K[1, 2]) / K[1, 1]
    u = (np.arange(stride // 2, width, stride) - K[0, 2]) / K[0, 0]
    rays = np.ones((len(v), len(u), 3))
    rays[..., 0], rays[..., 1] = u[None, :], v[:, None]
    return rays


def depth_to_points(depth: np.ndarray, fovy: float) -> np.ndarray:
    """Camera-frame 3D points (H, W, 3) from a depth map (H, W) in metres (OpenCV axes)."""
    return pixel_rays(fovy, *depth.shape) * depth[..., None]
