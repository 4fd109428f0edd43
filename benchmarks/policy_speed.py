"""Training and inference speed of the benchmark policy on this machine's CPU (or GPU when present).

Measures forward+backward+AdamW samples/s at batch 64, plain (SFT) and with the spatial auxiliary
objective (its extra cost), and predict_chunk latency. Baselines from the same run: the SFT step for
the objective's overhead, and a plain float32 matmul for how close the policy runs to the machine's peak
(a busy machine lowers both, the ratio much less).

    python benchmarks/policy_speed.py [--threads N] [--steps N]
"""

import argparse
import os
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from capvector.bench.objectives.spatial import SpatialObjective
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.policy.modeling_policy import Policy
from capvector.training.metrics import synchronize

INSTRUCTIONS = ["pick the puck and place it at the goal", "open the drawer", "push the button down"]


def random_batch(config: PolicyConfig, batch_size: int, device: torch.device) -> dict:
    size = config.image_size
    batch = {
        "instruction": [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch_size)],
        "observation.state": torch.rand(batch_size, config.state_dim),
        "action": torch.rand(batch_size, config.chunk_size, config.action_dim) * 2 - 1,
        "action_is_pad": torch.zeros(batch_size, config.chunk_size, dtype=torch.bool),
    }
    for camera in config.cameras:
        batch[f"observation.images.{camera}"] = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
        batch[f"observation.depth.{camera}"] = 0.3 + torch.rand(batch_size, 1, size, size)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_seconds_per_step(policy, objective, batch, steps: int, device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per optimizer step."""
    modules = [policy] + ([objective] if objective is not None else [])
    optimizer = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=1e-4)
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
        loss = policy(batch)["action"]
        if objective is not None:
            loss = loss + objective.weight * objective(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def matmul_gflops(device, size: int = 512, repeats: int = 20) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = PolicyConfig()
    policy = Policy(config).to(device)
    batch = random_batch(config, args.batch_size, device)
    params = sum(p.numel() for p in policy.parameters())
    with FlopCounterMode(display=False) as counter:
        policy(batch)["action"].backward()
    gflop_per_sample = counter.get_total_flops() / args.batch_size / 1e9

    sft, sft_cpu = train_seconds_per_step(policy, None, batch, args.steps, device)
    objective = SpatialObjective({camera: 45.0 for camera in config.cameras})
    objective.attach(policy)
    objective.to(device)
    aux, _ = train_seconds_per_step(policy, objective, batch, args.steps, device)
    objective.detach()
    peak = matmul_gflops(device)

    observation = {
        key: value[0].cpu().numpy()
        for key, value in batch.items()
        if key.startswith("observation.images") or key == "observation.state"
    }
    observation["instruction"] = batch["instruction"][0]
    policy.eval()
    latencies = []
    for _ in range(30):
        start = time.perf_counter()
        policy.predict_chunk(observation)
        latencies.append(time.perf_counter() - start)
    infer_ms = 1000 * float(np.median(latencies[5:]))

    sft_rate, aux_rate = args.batch_size / sft, args.batch_size / aux
    achieved = gflop_per_sample * sft_rate
    print(
        f"device {device}, threads {torch.get_num_threads()}, parameters {params / 1e6:.2f}M, "
        f"{gflop_per_sample:.3f} GFLOP per training sample"
    )
    print(
        f"training, batch {args.batch_size}: SFT {sft_rate:.0f} samples/s ({1000 * sft:.0f} ms/step), with the "
        f"spatial objective {aux_rate:.0f} samples/s ({1000 * aux:.0f} ms/step): x{aux / sft:.2f} time per step"
    )
    # On a shared machine wall-clock rates fall with the load; CPU time shows the rate on idle cores.
    print(
        f"CPU time: {args.batch_size / sft_cpu:.0f} SFT samples per CPU-second (the rate of one idle core with "
        f"--threads 1); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(f"achieved {achieved:.1f} GFLOP/s against a {peak:.1f} GFLOP/s float32 matmul: {achieved / peak:.2f}")
    print(f"inference: {infer_ms:.1f} ms per chunk of {config.chunk_size} actions (batch 1, median)")
    print(
        f"RESULT params={params} sft_samples_per_s={sft_rate:.1f} aux_samples_per_s={aux_rate:.1f} "
        f"sft_samples_per_cpu_s={args.batch_size / sft_cpu:.1f} aux_time_ratio={aux / sft:.3f} "
        f"gflop_per_sample={gflop_per_sample:.3f} matmul_gflops={peak:.1f} "
        f"peak_fraction={achieved / peak:.3f} infer_ms_per_chunk={infer_ms:.2f} threads={torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
