"""Time per training step of the benchmark policy: SFT, auxiliary SFT with the frozen teacher run online, and
CapVector (SFT + the orthogonal regularizer), all on the same randomly shifted images (augment_shift).

The auxiliary step pays for the teacher's forward pass on every batch (Spatial Forcing's cost); CapVector's step
pays only for the regularizer. Each repeat times `--steps` optimizer steps of every method, the methods' order
rotating between repeats so that a change in the machine's load falls on all of them; the figures are the median
over repeats and its range. The teacher's weights are random (its cost does not depend on them). The policy and the
teacher are those of a `capvector reproduce` preset (`--preset`, default full: the experiment's sizes, image shift as
the preset sets it), and so is the batch unless `--batch-size` is given. On CUDA (the default when present, as in
training) the forward passes run under bf16 autocast, as the training engine runs them, and each timing ends with a
device sync.

    python benchmarks/teacher_step_cost.py [--preset full] [--threads N] [--steps 10] [--repeats 5] [--batch-size N]
                                           [--device auto] [--tiny]
"""

import argparse
import contextlib
import copy
import statistics
import time
from pathlib import Path

import torch

from capvector.bench.experiment.layout import RunLayout
from capvector.bench.experiment.protocol import PRESETS, teacher_pretraining
from capvector.bench.objectives.alignment import TeacherAlignment
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.policy.modeling_policy import Policy
from capvector.bench.teacher.configuration_teacher import TeacherConfig
from capvector.bench.teacher.modeling_teacher import Teacher
from capvector.training.metrics import synchronize
from capvector.training.orthogonal import build_regularizer
from capvector.training.preflight import pick_device

TINY_POLICY = dict(image_size=32, stem_channels=(8, 8), dim=16, heads=2, trunk_layers=1, augment_shift=2)
TINY_TEACHER = dict(image_size=32, stem_channels=(8, 16), dim=32, heads=2, layers=2, depth_grid=8)


def random_batch(config: PolicyConfig, batch_size: int, device: torch.device) -> dict:
    size = config.image_size
    batch = {
        "instruction": ["press the button from the top"] * batch_size,
        "observation.state": torch.rand(batch_size, config.state_dim),
        "action": torch.rand(batch_size, config.chunk_size, config.action_dim) * 2 - 1,
        "action_is_pad": torch.zeros(batch_size, config.chunk_size, dtype=torch.bool),
    }
    for camera in config.cameras:
        batch[f"observation.images.{camera}"] = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Method:
    """One method's policy copy, optimizer and step."""

    def __init__(self, name: str, policy: Policy, teacher: Teacher, orth_lambda: float = 10.0):
        self.name, self.policy = name, copy.deepcopy(policy).train()
        self.objective = TeacherAlignment(teacher) if name == "aux" else None
        if self.objective is not None:
            self.objective.attach(self.policy)
        params = list(self.policy.parameters())
        params += list(self.objective.projector.parameters()) if self.objective is not None else []
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        gamma = {name: 1e-3 * torch.randn_like(p) for name, p in self.policy.named_parameters()}
        self.regularizer = build_regularizer(self.policy, gamma) if name == "capvector" else None
        self.orth_lambda = orth_lambda

    def step(self, batch: dict, device: torch.device) -> None:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        with autocast:
            loss = self.policy(batch)["action"]
            if self.objective is not None:
                loss = loss + self.objective.weight * self.objective(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.regularizer is not None:
            self.regularizer.add_grad_(self.orth_lambda)
        self.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS), help="whose policy and teacher (full)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks that the script runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preset = PRESETS[args.preset]
    policy_config = PolicyConfig(image_size=preset.image_size, **preset.policy)
    teacher_config = teacher_pretraining(preset, RunLayout(Path("."))).teacher
    device = pick_device(args.device)
    policy = Policy(PolicyConfig(**TINY_POLICY) if args.tiny else policy_config).to(device)
    teacher = Teacher(TeacherConfig(**TINY_TEACHER) if args.tiny else teacher_config).to(device)
    batch_size = args.batch_size or preset.batch_size
    batch = random_batch(policy.config, batch_size, device)
    methods = [Method(name, policy, teacher) for name in ("sft", "aux", "capvector")]
    for method in methods:  # warm-up
        method.step(batch, device)
    seconds: dict[str, list[float]] = {method.name: [] for method in methods}
    for repeat in range(args.repeats):
        for method in methods[repeat % 3 :] + methods[: repeat % 3]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                method.step(batch, device)
            synchronize(device)
            seconds[method.name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    for name, values in seconds.items():
        print(
            f"{name:10s} {1000 * median[name]:8.1f} ms/step (range {1000 * min(values):.1f}-{1000 * max(values):.1f})"
            f"  {median[name] / median['sft']:.2f}x SFT"
        )
    print(
        f"RESULT sft_ms={1000 * median['sft']:.1f} aux_ms={1000 * median['aux']:.1f} "
        f"capvector_ms={1000 * median['capvector']:.1f} aux_ratio={median['aux'] / median['sft']:.3f} "
        f"capvector_ratio={median['capvector'] / median['sft']:.3f} batch_size={batch_size} preset={args.preset} "
        f"threads={torch.get_num_threads()} device={device.type} tiny={int(args.tiny)}"
    )


if __name__ == "__main__":
    main()
