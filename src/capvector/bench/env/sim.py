"""Meta-World v3 environments with a fast off-screen renderer for small camera images.

Stock MuJoCo rendering of Meta-World runs at ~30 frames/s whatever the image size: the Sawyer arm has
~62k triangles and the off-screen buffer is 4x multisampled. `FastRenderer` renders from a copy of the
model in which only the robot's meshes are decimated to ~10% of their faces, with multisampling,
shadows, reflections, skybox and haze off and the buffer sized to the image. The scene is still built
from the physics model and data (`mjv_updateScene`), so goals, camera and colour edits made to the
physics model show; only mesh geometry and GL settings come from the render copy.

The cameras, their looks per variant and the pinhole model are in capvector.bench.env.camera.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capvector.bench.env.camera import CAMERAS, VARIANTS, Look, project
from capvector.bench.env.features import PIXELS_KEY, PRIVILEGED_KEY, PRIVILEGED_NAMES
from capvector.errors import CapvectorError

ACTION_DIM = 4
STATE_DIM = 4  # hand xyz and gripper opening: Meta-World obs[0:4]
# Object and goal placement ranges: Meta-World's own ("default") or its x/y spans scaled about their centres
# ("wide": 2.5x, e.g. button-press-topdown's box over 50 x 25 cm instead of 20 x 10 cm), so that where things are
# varies enough that seeing them matters. The scripted experts succeed on the wide ranges of the tasks that use it.
PLACEMENTS = {"default": 1.0, "wide": 2.5}
# A decoy placement for the oracle's test: privileged positions taken from this many placement seeds further on.
DECOY_SEED_OFFSET = 500_000
MAX_EPISODE_STEPS = 500
CONTROL_HZ = 80  # Meta-World v3 steps per second of simulated time (frame_skip 5 x 2.5 ms)
WRIST_CAMERA = "gripperPOV"
ROBOT_ROOT_BODY = "base"  # every mesh under this body is the Sawyer arm


def select_gl_backend() -> str:
    """Pick MUJOCO_GL before mujoco loads: the user's choice, else EGL, else OSMesa, else a clear error."""
    os.environ.setdefault("LP_NUM_THREADS", "1")  # Mesa llvmpipe: threads only add overhead at 64x64
    backend = os.environ.get("MUJOCO_GL", "").lower()
    if backend:
        return backend
    if ctypes.util.find_library("EGL"):
        backend = "egl"
    elif ctypes.util.find_library("OSMesa"):
        backend = "osmesa"
    else:
        raise CapvectorError(
            "no off-screen OpenGL library found for MuJoCo rendering: install EGL "
            "(Debian/Ubuntu: apt-get install libegl1) or OSMesa (apt-get install libosmesa6), "
            "or set MUJOCO_GL to a working backend"
        )
    os.environ["MUJOCO_GL"] = backend
    os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


GL_BACKEND = select_gl_backend()
import mujoco  # noqa: E402  (MUJOCO_GL must be set before mujoco is imported)


def gl_context(width: int, height: int):
    """An off-screen GL context for the selected backend, with an install hint if it cannot start."""
    try:
        if GL_BACKEND == "egl":
            from mujoco.egl import GLContext
        elif GL_BACKEND == "osmesa":
            from mujoco.osmesa import GLContext
        else:
            from mujoco.glfw import GLContext
        return GLContext(width, height)
    except Exception as exc:  # the GL bindings raise many types (ImportError, RuntimeError, GLError)
        raise CapvectorError(
            f"could not create an off-screen OpenGL context with MUJOCO_GL={GL_BACKEND} ({exc}); "
            "install libegl1 (for MUJOCO_GL=egl) or libosmesa6 and run with MUJOCO_GL=osmesa"
        ) from exc


def robot_mesh_ids(model: mujoco.MjModel) -> list[int]:
    root = model.body(ROBOT_ROOT_BODY).id
    meshes = {
        int(model.geom_dataid[g])
        for g in range(model.ngeom)
        if model.geom_type[g] == mujoco.mjtGeom.mjGEOM_MESH and model.body_rootid[model.geom_bodyid[g]] == root
    }
    return sorted(meshes)


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted smooth normals per vertex."""
    face_normals = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    normals = np.zeros_like(verts)
    for corner in range(3):
        np.add.at(normals, faces[:, corner], face_normals)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def decimated_render_model(model: mujoco.MjModel, keep: float = 0.1) -> mujoco.MjModel:
    """A copy of `model` whose robot meshes keep ~`keep` of their faces, edited in place in the copy's arrays.

    Decimating in the compiled mesh frame and writing into the same slots keeps every mesh's frame, so the
    physics model's geom poses place the decimated meshes exactly where the full ones were.
    """
    import fast_simplification

    render = model.__copy__()
    for mesh in robot_mesh_ids(model):
        va, nv = model.mesh_vertadr[mesh], model.mesh_vertnum[mesh]
        fa, nf = model.mesh_faceadr[mesh], model.mesh_facenum[mesh]
        na = model.mesh_normaladr[mesh]
        verts, faces = fast_simplification.simplify(
            model.mesh_vert[va : va + nv].astype(np.float64), model.mesh_face[fa : fa + nf], target_reduction=1 - keep
        )
        render.mesh_vert[va : va + len(verts)] = verts
        render.mesh_vertnum[mesh] = len(verts)
        render.mesh_face[fa : fa + len(faces)] = faces
        render.mesh_facenum[mesh] = len(faces)
        render.mesh_normal[na : na + len(verts)] = vertex_normals(verts, faces)
        render.mesh_normalnum[mesh] = len(verts)
        render.mesh_facenormal[fa : fa + len(faces)] = faces
    return render


class FastRenderer:
    """One GL context per environment, reused for every camera; RGB and depth come from the same pass.

    `decimate=False` keeps the full robot meshes (same GL settings otherwise), for comparisons.
    """

    def __init__(self, model: mujoco.MjModel, height: int, width: int, decimate: bool = True):
        self.height, self.width = height, width
        render = decimated_render_model(model) if decimate else model.__copy__()
        render.vis.quality.offsamples = 0
        render.vis.quality.numslices = 12  # coarser spheres and cylinders
        render.vis.quality.numstacks = 8
        render.vis.global_.offwidth, render.vis.global_.offheight = width, height
        self.render_model = render
        self._gl = gl_context(width, height)
        self._gl.make_current()
        self._context = mujoco.MjrContext(render, mujoco.mjtFontScale.mjFONTSCALE_50)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._context.readDepthMap = mujoco.mjtDepthMap.mjDEPTH_ZEROFAR
        self._scene = mujoco.MjvScene(render, maxgeom=1000)
        for flag in (
            mujoco.mjtRndFlag.mjRND_SHADOW,
            mujoco.mjtRndFlag.mjRND_REFLECTION,
            mujoco.mjtRndFlag.mjRND_SKYBOX,
            mujoco.mjtRndFlag.mjRND_HAZE,
        ):
            self._scene.flags[flag] = 0
        self._option = mujoco.MjvOption()
        self._rect = mujoco.MjrRect(0, 0, width, height)
        self._rgb = np.empty((height, width, 3), np.uint8)
        self._depth = np.empty((height, width), np.float32)

    def render(
        self, model: mujoco.MjModel, data: mujoco.MjData, camera: mujoco.MjvCamera, depth: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB (H, W, 3) uint8 and depth (H, W) float32 metres (or None) of the physics state from `camera`."""
        self._gl.make_current()
        mujoco.mjv_updateScene(model, data, self._option, None, camera, mujoco.mjtCatBit.mjCAT_ALL, self._scene)
        mujoco.mjr_render(self._rect, self._scene, self._context)
        mujoco.mjr_readPixels(self._rgb, self._depth if depth else None, self._rect, self._context)
        rgb = np.flipud(self._rgb).copy()  # OpenGL rows start at the bottom
        if not depth:
            return rgb, None
        return rgb, linear_depth(np.flipud(self._depth), model)

    def camera_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """World position (3,) and rotation (3, 3) of the last rendered camera; columns are OpenCV axes."""
        cam = mujoco.mjv_averageCamera(self._scene.camera[0], self._scene.camera[1])  # the two stereo eyes
        forward, up = np.array(cam.forward), np.array(cam.up)
        return np.array(cam.pos), np.stack([np.cross(forward, up), -up, forward], axis=1)

    def close(self) -> None:
        if self._gl is not None:
            self._gl.make_current()  # MjrContext.free deletes GL objects of whichever context is current
            self._context.free()
            self._gl.free()
            self._gl = None

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter exit the EGL display may already be gone
            self.close()


def linear_depth(zbuffer: np.ndarray, model: mujoco.MjModel) -> np.ndarray:
    """Metres along the camera axis from MuJoCo's [0, 1] depth buffer (same formula as mujoco.Renderer)."""
    near = model.vis.map.znear * model.stat.extent
    far = model.vis.map.zfar * model.stat.extent
    c = -0.5 * (-(far + near) / (far - near)) - 0.5
    d = -0.5 * (-(2 * far * near) / (far - near))
    return (d / (zbuffer.astype(np.float64) + c)).astype(np.float32)


@dataclass
class SimEnv:
    """A Meta-World v3 task with a new placement per reset, two cameras, depth and the scripted expert."""

    task: str
    image_size: int = 64
    variant: str = "default"
    decimate: bool = True
    placement: str = "default"
    decoy: bool = False  # privileged positions from another placement (moved as the real ones move)
    env: Any = field(init=False, repr=False)  # Meta-World's environment (untyped)

    def __post_init__(self) -> None:
        from capvector.bench.env.tasks import check_task

        check_task(self.task)
        if self.variant not in VARIANTS:
            raise CapvectorError(f"unknown environment variant {self.variant!r}; valid: {', '.join(VARIANTS)}")
        import metaworld

        benchmark = metaworld.MT1(self.task, seed=0)
        self.env = benchmark.train_classes[self.task]()
        self.env.set_task(benchmark.train_tasks[0])
        self.env._freeze_rand_vec = False  # new object and goal placement at every reset...
        self.env.seeded_rand_vec = True  # ...drawn from env.seed(s), so placements are reproducible
        self.env.max_path_length = MAX_EPISODE_STEPS
        if self.placement not in PLACEMENTS:
            raise CapvectorError(f"unknown placement range {self.placement!r}; valid: {', '.join(PLACEMENTS)}")
        widen_placements(self.env, PLACEMENTS[self.placement])
        self._decoy_shift = np.zeros(len(PRIVILEGED_NAMES))
        self.look = VARIANTS[self.variant]
        apply_look(self.env.model, self.look)
        self.cameras = {"scene": scene_camera(self.look), "wrist": fixed_camera(self.env.model, WRIST_CAMERA)}
        self.camera_fovy = {"scene": self.look.fovy, "wrist": float(self.env.model.cam(WRIST_CAMERA).fovy[0])}
        self.renderer = FastRenderer(self.env.model, self.image_size, self.image_size, decimate=self.decimate)
        self.obs: Any = None  # Meta-World's 39-d observation after the last reset or step

    def reset(self, placement_seed: int) -> np.ndarray:
        """Reset to the placement drawn from `placement_seed`; returns Meta-World's 39-d observation."""
        if self.decoy:
            self.env.seed(int(placement_seed) + DECOY_SEED_OFFSET)
            self.obs, _ = self.env.reset()
            decoy = self.privileged()
        self.env.seed(int(placement_seed))
        self.obs, _ = self.env.reset()
        self.cameras["scene"] = scene_camera(self.look.for_episode(placement_seed))
        if self.decoy:
            self._decoy_shift = decoy - self.privileged()
        return self.obs

    def privileged(self) -> np.ndarray:
        """Object and goal xyz now (PRIVILEGED_NAMES), as the simulator knows them."""
        return np.concatenate([self.obs[4:7], self.obs[36:39]])

    def step(self, action: np.ndarray) -> tuple[np.ndarray, bool]:
        self.obs, _, _, _, info = self.env.step(np.clip(np.asarray(action, np.float32), -1.0, 1.0))
        return self.obs, bool(info["success"])

    def render(self, camera: str, depth: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        return self.renderer.render(self.env.model, self.env.data, self.cameras[camera], depth=depth)

    def observe(self, depth: bool = True) -> dict[str, np.ndarray]:
        """The current observation with the dataset's keys: images (3, H, W) uint8, depth (1, H, W), state (4,),
        privileged positions (6,) and their pixels in each camera (PIXELS_KEY; the true ones, also for a decoy)."""
        out = {
            "observation.state": self.obs[:STATE_DIM].astype(np.float32),
            PRIVILEGED_KEY: (self.privileged() + self._decoy_shift).astype(np.float32),
        }
        points = self.privileged().reshape(2, 3)
        pixels = []
        for camera in CAMERAS:
            rgb, dep = self.render(camera, depth=depth)
            out[f"observation.images.{camera}"] = np.ascontiguousarray(rgb.transpose(2, 0, 1))
            if dep is not None:  # rendered when `depth`
                out[f"observation.depth.{camera}"] = dep[None]
            pose = self.renderer.camera_pose()
            pixels.append(project(points, *pose, self.camera_fovy[camera], self.image_size))
        out[PIXELS_KEY] = np.concatenate(pixels, axis=None).astype(np.float32)
        return out

    def camera_pose(self, camera: str) -> tuple[np.ndarray, np.ndarray]:
        """World position and rotation (OpenCV axes as columns) of `camera` in the current state."""
        self.render(camera, depth=False)
        return self.renderer.camera_pose()

    def expert(self):
        """Meta-World's scripted expert for this task: `expert.get_action(obs)`."""
        from metaworld.policies import ENV_POLICY_MAP

        return ENV_POLICY_MAP[self.task]()

    def close(self) -> None:
        self.renderer.close()
        self.env.close()


def widen_placements(env, scale: float) -> None:
    """Scale the x/y spans of a Meta-World env's object and goal placement box about their centres (z is kept)."""
    if scale == 1.0:
        return
    space = env._random_reset_space
    centre, half = (space.low + space.high) / 2, (space.high - space.low) / 2
    planar = np.arange(len(centre)) % 3 < 2  # the box stacks xyz triples (object, then goal where it has one)
    half = np.where(planar, half * scale, half)
    space.low[:], space.high[:] = centre - half, centre + half


def scene_camera(look: Look) -> mujoco.MjvCamera:
    camera = mujoco.MjvCamera()
    camera.type = mujoco.mjtCamera.mjCAMERA_FREE
    camera.lookat[:] = look.lookat
    camera.distance, camera.azimuth, camera.elevation = look.distance, look.azimuth, look.elevation
    return camera


def fixed_camera(model: mujoco.MjModel, name: str) -> mujoco.MjvCamera:
    camera = mujoco.MjvCamera()
    camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
    camera.fixedcamid = model.cam(name).id
    return camera


def apply_look(model: mujoco.MjModel, look: Look) -> None:
    """Edit the physics model's visual-only fields (free-camera fovy, lights, table colour); physics is unchanged."""
    model.vis.global_.fovy = look.fovy  # the free (scene) camera's vertical field of view
    model.vis.headlight.diffuse[:] = model.vis.headlight.diffuse * look.light_scale
    model.light_diffuse[:] = model.light_diffuse * look.light_scale
    if look.table_rgba is not None:
        for g in range(model.ngeom):
            if model.body(model.geom_bodyid[g]).name == "tablelink":
                model.geom_rgba[g] = look.table_rgba
                model.geom_matid[g] = -1  # a material's colour and texture would override geom_rgba


# Placement seeds. Demonstrations use seeds below 10^9 and evaluation seeds from 10^9 up, so no evaluated
# placement was ever trained on, whatever seeds the user picks for each.
EVAL_SEED_OFFSET = 1_000_000_000
MAX_ATTEMPTS = 100  # placements tried per demonstration slot before giving up


def demo_placement_seed(seed: int, episode: int, attempt: int) -> int:
    """Seed of the `attempt`-th placement tried for demonstration `episode` (of one task) under `seed`."""
    if not (0 <= seed < 1000 and 0 <= episode < 10_000 and 0 <= attempt < MAX_ATTEMPTS):
        raise CapvectorError(
            f"demonstration seed must be in [0, 1000) and episodes per task below 10000, "
            f"got seed={seed}, episode={episode}"
        )
    return seed * 1_000_000 + episode * MAX_ATTEMPTS + attempt


def eval_placement_seed(seed: int, episode: int) -> int:
    if not (0 <= seed < 1000 and 0 <= episode < 1_000_000):
        raise CapvectorError(f"evaluation seed must be in [0, 1000) and episodes below 10^6, got seed={seed}")
    return EVAL_SEED_OFFSET + seed * 1_000_000 + episode


def single_threaded_worker() -> None:
    """Worker-process setup: one rendering thread (llvmpipe) and one torch thread per process; on Linux the worker
    is ended with its parent (a killed `reproduce` must not leave training workers running on its folder)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    os.environ["LP_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def call_indexed(item: tuple[Any, int, tuple]) -> tuple[int, Any]:
    fn, index, job = item
    return index, fn(*job)


def parallel_imap(fn, jobs: list[tuple], workers: int) -> Iterator[tuple[int, Any]]:
    """`(i, fn(*jobs[i]))` for every job, as each finishes, over `workers` spawned processes (in this process, in
    order, when workers <= 1), so that a caller can save results as they come.

    Spawned, not forked: a forked child would inherit the parent's GL and torch thread state.
    """
    if workers <= 1 or len(jobs) <= 1:
        for index, job in enumerate(jobs):
            yield index, fn(*job)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=single_threaded_worker) as pool:
        yield from pool.imap_unordered(call_indexed, [(fn, i, job) for i, job in enumerate(jobs)], chunksize=1)


def parallel_map(fn, jobs: list[tuple], workers: int, done: Callable[[int, Any], None] | None = None) -> list:
    """`[fn(*job) for job in jobs]` over `workers` spawned processes (parallel_imap's, in the jobs' order);
    `done(i, result)` is called here as each job finishes, in the order they finish."""
    results: list[Any] = [None] * len(jobs)
    for i, result in parallel_imap(fn, jobs, workers):
        results[i] = result
        if done is not None:
            done(i, result)
    return results


def when_tasks_finish(job_tasks: list[str], on_task: Callable[[str, list], None]) -> Callable[[int, Any], None]:
    """A parallel_map `done` that calls on_task(task, its jobs' results) once every job of that task (job i is
    of task job_tasks[i]) has finished."""
    left = Counter(job_tasks)
    results: dict[str, list] = defaultdict(list)

    def done(i: int, result: Any) -> None:
        task = job_tasks[i]
        results[task].append(result)
        left[task] -= 1
        if not left[task]:
            on_task(task, results[task])

    return done


def shards(tasks: list[str], episodes: int, workers: int) -> list[tuple[str, list[int]]]:
    """Split `episodes` per task into jobs: whole tasks when there are enough to keep every worker busy."""
    parts = max(1, min(episodes, -(-workers // len(tasks))))
    return [(task, list(range(episodes))[p::parts]) for task in tasks for p in range(parts)]
