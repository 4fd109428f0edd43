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


# "new_env" is the out-of-domain variant: the scene camera moved, dimmer light, a plain grey-green table.
VARIANTS = {
    "default": Look(),
    "new_env": Look(azimuth=170.0, elevation=-34.0, distance=1.15, light_scale=0.7, table_rgba=(0.42, 0.48, 0.4, 1.0)),
}


def intrinsics(fovy: float, height: int, width: int) -> np.ndarray:
    """3x3 pinhole matrix K (OpenCV axes) for a camera with vertical field of view `fovy` degrees."""
    f = (height / 2) / math.tan(math.radians(fovy) / 2)
    return np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]])


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
