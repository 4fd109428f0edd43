"""What a run reports, from the first process: metrics.jsonl, TensorBoard (when installed), Weights & Biases
(offline, when asked for) and progress on stderr: a bar on a terminal, a plain line per metrics line elsewhere
(logs, CI).

Each line of metrics.jsonl averages the steps since the previous line: loss terms, grad norm, learning rate,
steps per second and the milliseconds per step spent in each part (data, forward, auxiliary, backward,
regularizer, optimizer). An evaluation (TrainConfig.eval) adds a line of its own: eval/<name> and eval/seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from capvector.training.config import TrainConfig

METRICS_FILE = "metrics.jsonl"


def synchronize(device: torch.device) -> None:
    """Wait until `device` has run the work queued on it (CUDA runs it asynchronously); nothing to wait for on the
    CPU. Timings of device work are taken after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds spent in named parts, accumulated between log lines (on CUDA each lap waits for the device)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device = device
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.last = time.perf_counter()

    def lap(self, part: str) -> None:
        if not self.enabled:
            return
        synchronize(self.device)
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


def wandb_run(out_dir: Path, config: TrainConfig) -> Any:
    """A Weights & Biases run written to out_dir/wandb, offline whatever WANDB_MODE says (nothing goes over the
    network; `wandb sync out_dir/wandb/offline-run-*` uploads it later)."""
    import wandb  # an optional extra; check_inputs made sure it is installed

    return wandb.init(
        project=config.wandb_project,
        name=out_dir.name,
        dir=out_dir,
        config=dataclasses.asdict(config),
        mode="offline",
        settings=wandb.Settings(mode="offline", console="off"),  # console off: stderr stays ours (is it a tty?)
    )


def progress_line(record: dict[str, Any], total: int) -> str:
    """A metrics line as one line of text, for logs where a bar would be a mess of carriage returns."""
    step = record["step"]
    if "loss" not in record:  # an evaluation
        values = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step")
        return f"step {step}/{total}  {values}"
    rate = record["steps_per_s"]
    left = round((total - step) / rate) if rate > 0 else 0
    return (
        f"step {step}/{total}  loss {record['loss']:.4g}  lr {record['lr']:.3g}  {rate:.3g} steps/s  "
        f"eta {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
    )


class Metrics:
    """Averages over each log interval, written as one line of metrics.jsonl (lines past `start` from an
    interrupted run are dropped first), to TensorBoard and W&B and as progress; `active` false (processes other
    than the first): nothing is written."""

    def __init__(self, out_dir: Path, start: int, config: TrainConfig, stopwatch: Stopwatch, active: bool):
        self.config, self.stopwatch, self.active = config, stopwatch, active
        self.sums: dict[str, float] = defaultdict(float)
        self.steps, self.since = 0, time.perf_counter()
        self.stream = sys.stderr  # progress goes where tqdm puts it; stdout keeps what a command prints at the end
        show, terminal = active and config.progress, self.stream.isatty()
        self.bar = (
            tqdm(total=config.steps, initial=start, file=self.stream, dynamic_ncols=True) if show and terminal else None
        )
        self.lines = show and not terminal
        self.file, self.writer, self.wandb = None, None, None
        if active:
            path = out_dir / METRICS_FILE
            if path.exists():
                kept = [line for line in path.read_text().splitlines() if step_of(line) <= start]
                path.write_text("".join(line + "\n" for line in kept))
            self.file = path.open("a")
            self.writer = tensorboard_writer(out_dir, start) if config.tensorboard else None
            self.wandb = wandb_run(out_dir, config) if config.wandb else None

    def add(self, step: int, lr: float, losses: dict[str, float], grad_norm: float | None) -> None:
        """One finished step; writes a line every log_every steps and at the last."""
        for name, value in losses.items():
            self.sums[f"loss/{name}"] += value
        self.sums["loss"] += sum(losses.values())
        if grad_norm is not None:
            self.sums["grad_norm"] += grad_norm
        self.steps += 1
        if self.bar is not None:
            self.bar.update(1)
        if step % self.config.log_every == 0 or step == self.config.steps:
            self.write(step, lr)

    def write(self, step: int, lr: float) -> None:
        record = {"step": step, "lr": lr, "steps_per_s": self.steps / (time.perf_counter() - self.since)}
        record |= {k: v / self.steps for k, v in self.sums.items()}
        record |= {f"time/{k}_ms": 1000 * v / self.steps for k, v in self.stopwatch.seconds.items()}
        self.record(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
        self.sums.clear()
        self.stopwatch.seconds.clear()
        self.steps, self.since = 0, time.perf_counter()

    def add_eval(self, step: int, values: dict[str, float], seconds: float) -> None:
        """An evaluation's numbers after `step`, on a line of their own; its time stays out of steps_per_s."""
        self.record({"step": step} | {f"eval/{k}": v for k, v in values.items()} | {"eval/seconds": seconds})
        self.since += seconds

    def record(self, record: dict[str, Any]) -> None:
        """One line to metrics.jsonl, TensorBoard, W&B and (off a terminal) the progress lines."""
        step = record["step"]
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        text = progress_line(record, self.config.steps)
        if self.lines:
            print(text, file=self.stream, flush=True)
        elif self.bar is not None and "loss" not in record:  # evaluations stay on screen above the bar
            self.bar.write(text, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
