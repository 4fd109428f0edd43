"""Simulator throughput: rendered frames/s, demonstration generation time, evaluation time.

Frames/s are for one 64x64 RGB+depth frame of the scene camera: stock mujoco.Renderer on the physics model
(the baseline), our renderer with the full meshes, our renderer with the decimated robot, and the
decimated renderer in two processes. Then the wall time of generating demonstrations and of evaluating
the scripted expert (renders every step) and a constant chunk-8 policy that never succeeds (every
episode runs all 500 steps: the worst case for a learned policy).

    python benchmarks/sim_throughput.py                      # 10 tasks x 50 demos, 10 tasks x 20 evals
    python benchmarks/sim_throughput.py --demos 5 --evals 4  # quick
"""

import argparse
import tempfile
import time
import warnings

import numpy as np

from capvector.bench.env.demos import generate_demonstrations
from capvector.bench.env.evaluation import ExpertPolicy, evaluate
from capvector.bench.env.sim import FastRenderer, SimEnv, mujoco, parallel_map
from capvector.bench.env.tasks import SPLITS

warnings.filterwarnings("ignore", message="Constant")  # Meta-World's experts warn about their own gains


def frames_per_second(renderer: str, seconds: float = 3.0) -> float:
    env = SimEnv("pick-place-v3")
    env.reset(0)
    model, data, camera = env.env.model, env.env.data, env.cameras["scene"]
    if renderer == "stock":
        stock = mujoco.Renderer(model, 64, 64)

        def frame():
            stock.update_scene(data, camera)
            stock.render()
            stock.enable_depth_rendering()
            stock.render()
            stock.disable_depth_rendering()
    else:
        ours = FastRenderer(model, 64, 64, decimate=renderer == "decimated")

        def frame():
            ours.render(model, data, camera)

    frame()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        frame()
        count += 1
    return count / (time.perf_counter() - start)


class ConstantChunk:
    """Eight zero actions per call: never succeeds, so every episode runs the full 500 steps."""

    def reset(self):
        pass

    def predict_chunk(self, observation):
        return np.zeros((8, 4), np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10, help="first N tasks of the pretrain split")
    parser.add_argument("--demos", type=int, default=50, help="demonstrations per task")
    parser.add_argument("--evals", type=int, default=20, help="evaluation episodes per task")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    tasks = SPLITS["pretrain"][: args.tasks]

    fps = {name: frames_per_second(name) for name in ("stock", "full", "decimated")}
    fps["decimated_2proc"] = sum(parallel_map(frames_per_second, [("decimated",)] * 2, 2))
    for name, value in fps.items():
        print(f"render 64x64 rgb+depth, {name:16s}: {value:7.1f} frames/s")
    print(
        f"decimated vs stock: {fps['decimated'] / fps['stock']:.1f}x, "
        f"vs full meshes: {fps['decimated'] / fps['full']:.1f}x"
    )

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_demonstrations(f"{tmp}/ds", tasks, args.demos, seed=0, workers=args.workers)
        demo_s = time.perf_counter() - start
    print(f"demonstrations: {args.demos} x {len(tasks)} tasks in {demo_s:.1f} s ({args.workers} workers)")

    expert = evaluate(ExpertPolicy, tasks, args.evals, workers=args.workers)
    print(f"expert evaluation: {args.evals} x {len(tasks)} in {expert.wall_s:.1f} s, success {expert.success_rate:.3f}")
    worst = evaluate(ConstantChunk, tasks, args.evals, workers=args.workers)
    print(f"chunk-8 policy, all episodes at the 500-step cap: {args.evals} x {len(tasks)} in {worst.wall_s:.1f} s")

    print(
        f"RESULT fps_stock={fps['stock']:.1f} fps_full={fps['full']:.1f} fps_decimated={fps['decimated']:.1f} "
        f"fps_decimated_2proc={fps['decimated_2proc']:.1f} speedup_vs_stock={fps['decimated'] / fps['stock']:.2f} "
        f"demo_s={demo_s:.1f} demo_episodes={args.demos * len(tasks)} eval_expert_s={expert.wall_s:.1f} "
        f"eval_expert_success={expert.success_rate:.3f} eval_chunk8_worst_s={worst.wall_s:.1f} "
        f"eval_episodes={args.evals * len(tasks)}"
    )


if __name__ == "__main__":
    main()
