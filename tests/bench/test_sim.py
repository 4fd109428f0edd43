import numpy as np
import pytest

from capvector.bench.env.camera import VARIANTS, depth_to_points, intrinsics
from capvector.bench.env.sim import SimEnv
from capvector.bench.env.tasks import SPLITS, TASKS, resolve_tasks
from capvector.errors import CapvectorError


@pytest.fixture(scope="module")
def env():
    env = SimEnv("pick-place-v3")
    env.reset(7)
    yield env
    env.close()


def project(env, camera, world_point):
    pos, rot = env.camera_pose(camera)
    point = rot.T @ (world_point - pos)
    uv = intrinsics(env.camera_fovy[camera], env.image_size, env.image_size) @ point
    return point, np.round(uv[:2] / uv[2]).astype(int)


def test_unknown_task_lists_valid_ones():
    with pytest.raises(CapvectorError, match="pick-place-v3"):
        SimEnv("pick-place-v9")
    with pytest.raises(CapvectorError, match="unknown task"):
        resolve_tasks("pretrain,nope-v3")


def test_splits_are_disjoint_and_known():
    names = [t for tasks in SPLITS.values() for t in tasks]
    assert len(names) == len(set(names)) and set(names) <= set(TASKS)
    assert resolve_tasks("extract") == SPLITS["extract"]


def test_images_not_blank_and_cameras_differ(env):
    obs = env.observe()
    scene, wrist = obs["observation.images.scene"], obs["observation.images.wrist"]
    assert scene.shape == wrist.shape == (3, 64, 64) and scene.dtype == np.uint8
    assert scene.std() > 20 and wrist.std() > 10
    assert np.abs(scene.astype(int) - wrist).mean() > 20
    assert obs["observation.depth.scene"].shape == (1, 64, 64)
    assert obs["observation.state"].shape == (4,)


def test_depth_and_points_agree_with_camera_model(env):
    goal = env.env.data.site("goal").xpos.copy()  # a visible sphere of radius 2 cm
    rgb, depth = env.render("scene")
    point, (u, v) = project(env, "scene", goal)
    assert 0 <= u < 64 and 0 <= v < 64
    assert rgb[v, u, 2] > 150 and rgb[v, u, 0] < 80  # the goal is blue
    assert abs(depth[v, u] - (point[2] - 0.02)) < 0.015  # its near surface
    pos, rot = env.camera_pose("scene")
    world = rot @ depth_to_points(depth, env.camera_fovy["scene"])[v, u] + pos
    assert np.linalg.norm(world - goal) < 0.035

    top = env.env.data.body("obj").xpos + np.array([0, 0, 0.02])  # top face of the puck, seen from the wrist
    _, depth = env.render("wrist")
    point, (u, v) = project(env, "wrist", top)
    assert 0 <= u < 64 and 0 <= v < 64
    assert abs(depth[v, u] - point[2]) < 0.01


def test_decimated_renders_same_scene_as_full_model(env):
    before = env.render("scene")[0]
    full = SimEnv("pick-place-v3", decimate=False)
    full.reset(7)
    for camera in ("scene", "wrist"):
        a = env.render(camera)[0].astype(float)
        b = full.render(camera)[0].astype(float)
        assert np.abs(a - b).mean() < 4.0
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.97
    full.close()
    assert (env.render("scene")[0] == before).all()  # closing another renderer leaves this one intact
    assert env.renderer.render_model.mesh_facenum.sum() < 0.2 * env.env.model.mesh_facenum.sum()


def test_new_environment_variant_looks_different(env):
    other = SimEnv("pick-place-v3", variant="new_env")
    other.reset(7)
    assert np.abs(other.render("scene")[0].astype(int) - env.render("scene")[0]).mean() > 15
    other.close()
    with pytest.raises(CapvectorError, match="new_env"):
        SimEnv("pick-place-v3", variant="mars")


def test_random_view_moves_the_scene_camera_per_episode_reproducibly():
    """random_view: each placement seed has its own scene view, the same on every reset with that seed (so every
    policy is evaluated through the same views), within the jitter ranges; the wrist camera does not move."""
    look = VARIANTS["random_view"]
    views = [look.for_episode(seed) for seed in range(200)]
    assert look.for_episode(3) == views[3]
    azimuths = np.array([v.azimuth for v in views])
    assert np.ptp(azimuths) > look.azimuth_jitter  # they vary...
    assert np.all(np.abs(azimuths - look.azimuth) <= look.azimuth_jitter)  # ...within the range
    assert all(abs(v.elevation - look.elevation) <= look.elevation_jitter for v in views)
    assert VARIANTS["default"].for_episode(3) == VARIANTS["default"]
    moving = SimEnv("button-press-v3", variant="random_view")
    images = {}
    for seed in (5, 6, 5):
        moving.reset(seed)
        assert moving.cameras["scene"].azimuth == pytest.approx(look.for_episode(seed).azimuth)
        images.setdefault(seed, []).append({c: moving.render(c, depth=False)[0] for c in ("scene", "wrist")})
    assert np.array_equal(images[5][0]["scene"], images[5][1]["scene"])
    moving.reset(6)
    fixed = SimEnv("button-press-v3")
    fixed.reset(6)
    assert np.abs(moving.render("scene")[0].astype(int) - fixed.render("scene")[0]).mean() > 5
    assert np.array_equal(moving.render("wrist")[0], fixed.render("wrist")[0])
    moving.close()
    fixed.close()
