"""What a run reports: metrics.jsonl, TensorBoard (when installed) and a progress bar, written by the first process.

Each line of metrics.jsonl averages the steps since the previous line: loss terms, grad norm, learning rate,
steps per second and the milliseconds per step spent in each part (data, forward, auxiliary, backward,
regularizer, optimizer).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from capvector.training.config import TrainConfig

METRICS_FILE = "metrics.jsonl"


class Stopwatch:
    """Seconds spent in named parts, accumulated between log lines (on CUDA each lap waits for the device)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.sync = enabled and device.type == "cuda"
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.last = time.perf_counter()

    def lap(self, part: str) -> None:
        if not self.enabled:
            return
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[part] += now - self.last
        self.last = now

    def restart(self) -> None:
        self.last = time.perf_counter()


def step_of(line: str) -> float:
    """A metrics line's step; a line cut short by a kill counts as past any checkpoint."""
    try:
        step: float = json.loads(line)["step"]
        return step
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def tensorboard_writer(out_dir: Path, start: int) -> Any:
    """A SummaryWriter continuing after step `start`, or None without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"), purge_step=start + 1)


class Metrics:
    """Averages over each log interval, written as one line of metrics.jsonl (lines past `start` from an
    interrupted run are dropped first) and to TensorBoard; `active` false (processes other than the first):
    nothing is written."""

    def __init__(self, out_dir: Path, start: int, config: TrainConfig, stopwatch: Stopwatch, active: bool):
        self.config, self.stopwatch, self.active = config, stopwatch, active
        self.sums: dict[str, float] = defaultdict(float)
        self.steps, self.since = 0, time.perf_counter()
        self.bar = tqdm(total=config.steps, initial=start, disable=not (active and config.progress), dynamic_ncols=True)
        self.file, self.writer = None, None
        if active:
            path = out_dir / METRICS_FILE
            if path.exists():
                kept = [line for line in path.read_text().splitlines() if step_of(line) <= start]
                path.write_text("".join(line + "\n" for line in kept))
            self.file = path.open("a")
            self.writer = tensorboard_writer(out_dir, start) if config.tensorboard else None

    def add(self, step: int, lr: float, losses: dict[str, float], grad_norm: float | None) -> None:
        """One finished step; writes a line every log_every steps and at the last."""
        for name, value in losses.items():
            self.sums[f"loss/{name}"] += value
        self.sums["loss"] += sum(losses.values())
        if grad_norm is not None:
            self.sums["grad_norm"] += grad_norm
        self.steps += 1
        self.bar.update(1)
        if step % self.config.log_every == 0 or step == self.config.steps:
            self.write(step, lr)

    def write(self, step: int, lr: float) -> None:
        record = {"step": step, "lr": lr, "steps_per_s": self.steps / (time.perf_counter() - self.since)}
        record |= {k: v / self.steps for k, v in self.sums.items()}
        record |= {f"time/{k}_ms": 1000 * v / self.steps for k, v in self.stopwatch.seconds.items()}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)
        self.bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
        self.sums.clear()
        self.stopwatch.seconds.clear()
        self.steps, self.since = 0, time.perf_counter()

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
