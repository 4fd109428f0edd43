"""The training engine: `sft`, `aux` (SFT plus an auxiliary objective) and `capvector` (SFT from the merged
checkpoint plus lambda * L_orth), full or LoRA finetuning, in one process or under torchrun (DDP).

    out_dir = train(load_config("run.yaml", ["steps=2000"]))    # or: train(config, policy, dataset, auxiliary)

The three strategies run the same loop; the strategy only adds terms. Data order comes from a generator of its
own, seeded by `seed`, so `sft` and `aux` runs with the same seed see the same batches in the same order whatever
their models consume from the other RNGs. Written to out_dir:

    config.yaml            the resolved config
    metrics.jsonl          one line per log_every steps: loss terms, lr, grad norm, ms per step in each part
    checkpoints/step_N/    trainer_state.pt (everything to resume exactly) and policy/ (as the final one)
    policy/                the trained policy: policy.save_pretrained's folder (else model.safetensors), or for
                           LoRA the PEFT adapter folder, base_model_name_or_path = init_from
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from fnmatch import fnmatch
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_model
from torch import nn
from torch.utils.data import DataLoader, default_collate
from tqdm import tqdm

from capvector.training.config import TrainConfig, config_hash, load_config, result_fields, save_config
from capvector.errors import CapvectorError
from capvector.training.orthogonal import build_regularizer
from capvector.params.vectors import open_vector

STATE_FILE = "trainer_state.pt"
POLICY_DIR = "policy"  # out_dir/policy: the trained policy; checkpoints/step_N/policy: the policy at step N
METRICS_FILE = "metrics.jsonl"


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    """The folder of the checkpoint taken after `step` steps."""
    return out_dir / "checkpoints" / f"step_{step:07d}"


# ---- building the pieces -----------------------------------------------------------------------------------


def import_factory(spec: str, field: str):
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise CapvectorError(
            f"config field '{field}' is {spec!r}; give an import string 'package.module:factory' "
            f"(or pass the {field} object to train())"
        )
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise CapvectorError(f"config field '{field}': cannot import {spec!r}: {error}") from error


def wrap_lora(policy: nn.Module, config: TrainConfig) -> nn.Module:
    """The policy with PEFT LoRA adapters on its nn.Linear modules matching lora_targets (all when empty)."""
    try:
        import peft
    except ImportError as error:
        raise CapvectorError("finetune 'lora' needs PEFT: pip install capvector[lora]") from error
    linear = [name for name, module in policy.named_modules() if isinstance(module, nn.Linear)]
    targets = [n for n in linear if not config.lora_targets or any(fnmatch(n, p) for p in config.lora_targets)]
    if not targets:
        raise CapvectorError(
            f"config field 'lora_targets' {config.lora_targets} matches no nn.Linear module of the policy; "
            f"its linear modules are: {', '.join(linear) or '(none)'}"
        )
    lora = peft.LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets
    )
    model = peft.get_peft_model(policy, lora)
    # the capability-vector tools find the base weights here
    model.peft_config["default"].base_model_name_or_path = config.init_from
    return model


class TrainingModel(nn.Module):
    """The policy and (strategy "aux") the auxiliary objective as one module, so DDP also averages the projector's
    gradients; `seconds` collects forward-pass times per part."""

    def __init__(self, policy: nn.Module, auxiliary: nn.Module | None, stopwatch: Stopwatch):
        super().__init__()
        self.policy, self.auxiliary, self.stopwatch = policy, auxiliary, stopwatch

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        losses = dict(self.policy(batch))
        self.stopwatch.lap("forward")
        if self.auxiliary is not None:
            if "auxiliary" in losses:
                raise CapvectorError("the policy returned a loss named 'auxiliary', which the engine reserves")
            losses["auxiliary"] = self.auxiliary.weight * self.auxiliary(batch)
            self.stopwatch.lap("auxiliary")
        return losses


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


# ---- data --------------------------------------------------------------------------------------------------


def global_batches(size: int, batch_size: int, seed: int, start: int = 0) -> Iterator[torch.Tensor]:
    """Dataset indices of global batch number start, start + 1, ...: a fresh permutation per epoch (incomplete
    last batches dropped), drawn from a generator seeded by `seed` alone, so a batch depends only on its number."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = size // batch_size
    epoch, skip = divmod(start, per_epoch)
    for _ in range(epoch):  # replay earlier epochs' draws: cheap next to a training step
        torch.randperm(size, generator=generator)
    while True:
        order = torch.randperm(size, generator=generator)
        for i in range(skip, per_epoch):
            yield order[i * batch_size : (i + 1) * batch_size]
        skip = 0


def sample_nbytes(sample: Any) -> int:
    if isinstance(sample, Mapping):
        return sum(sample_nbytes(v) for v in sample.values())
    if isinstance(sample, (torch.Tensor, np.ndarray)):
        return sample.nbytes
    return 64  # a string or a number: a guess, small next to images


def take(table: Mapping[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """Rows `index` of a collated table (tensors, or lists such as instruction strings)."""
    rows = index.tolist()
    return {k: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in rows] for k, v in table.items()}


def rank_batches(
    dataset, config: TrainConfig, rank: int, world: int, start: int, device: torch.device
) -> Iterator[Any]:
    """This process's share of global batches start+1 .. steps. A small dataset of dict samples is collated
    once into memory (no loader processes: cheap on few cores); a larger one goes through a DataLoader."""
    size = len(dataset)
    if size < config.batch_size:
        raise CapvectorError(f"the dataset has {size} samples, fewer than batch_size {config.batch_size}")
    indices = (
        b.view(world, -1)[rank]
        for b in islice(global_batches(size, config.batch_size, config.seed, start), config.steps - start)
    )
    first = dataset[0]
    if isinstance(first, Mapping) and size * sample_nbytes(first) <= config.cache_dataset_mb * 2**20:
        table = default_collate([first] + [dataset[i] for i in range(1, size)])
        return (take(table, index) for index in indices)
    # the loader's worker seeds come from this generator, not from the global RNG the training draws from
    generator = torch.Generator().manual_seed(config.seed + start)
    return iter(
        DataLoader(
            dataset,
            batch_sampler=(index.tolist() for index in indices),
            generator=generator,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
        )
    )


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# ---- optimization ------------------------------------------------------------------------------------------


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at the last step (or constant). step counts from 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


# ---- checkpoints -------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resumable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers: frozen weights (a LoRA run's base) come back from init_from."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = (out_dir / "checkpoints").glob("step_*/" + STATE_FILE)
    return sorted((p.parent for p in found), key=lambda p: int(p.name.removeprefix("step_")))


def export_policy(policy: nn.Module, path: Path) -> None:
    """The policy's folder, written whole under a temporary name and then renamed."""
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(policy, "save_pretrained"):  # PEFT writes the adapter folder; policies their own format
        policy.save_pretrained(tmp)
    else:
        tmp.mkdir(parents=True)
        save_model(policy, str(tmp / "model.safetensors"))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def save_checkpoint(
    out_dir: Path, step: int, epoch: int, model: TrainingModel, optimizer, config: TrainConfig, rank: int, world: int
) -> None:
    rngs = [rng_state()]  # every process's: dropout streams differ between ranks
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        path = checkpoint_dir(out_dir, step)
        tmp = path.with_name(f".tmp-{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(
            {
                "step": step,  # also the data position: global batches consumed (their order is a function of seed)
                "epoch": epoch,
                "config": result_fields(config),
                "config_hash": config_hash(config),
                "world_size": world,
                "model": resumable_state(model),
                "optimizer": optimizer.state_dict(),
                "rng": rngs,
            },
            tmp / STATE_FILE,
        )
        export_policy(model.policy, tmp / POLICY_DIR)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        if config.keep_checkpoints:
            for old in checkpoint_dirs(out_dir)[: -config.keep_checkpoints]:
                shutil.rmtree(old)
    if world > 1:
        dist.barrier()


def read_checkpoint(out_dir: Path, config: TrainConfig, world: int) -> dict[str, Any]:
    """The latest checkpoint's state, checked against this run's config and process count."""
    found = checkpoint_dirs(out_dir)
    if not found:
        raise CapvectorError(
            f"resume: {out_dir}/checkpoints holds no complete checkpoint; set resume=false to start this run "
            "(or check out_dir)"
        )
    state = torch.load(found[-1] / STATE_FILE, map_location="cpu", weights_only=True)
    now = result_fields(config)
    differences = [
        f"{k}: {state['config'].get(k)!r} in the checkpoint, {now.get(k)!r} now"
        for k in sorted(set(now) | set(state["config"]))
        if state["config"].get(k) != now.get(k)
    ]
    if differences:
        raise CapvectorError(
            f"resume: {found[-1]} was made with another config ({'; '.join(differences)}); resume with the config "
            f"it was made with ({out_dir / 'config.yaml'}) or choose a new out_dir"
        )
    if state["world_size"] != world:
        raise CapvectorError(
            f"resume: {found[-1]} was made by {state['world_size']} processes, this run has {world}; resume with "
            f"--nproc_per_node {state['world_size']} to continue exactly"
        )
    return state


# ---- logging -----------------------------------------------------------------------------------------------


def step_of(line: str) -> float:
    """A metrics line's step; a line cut short by a kill counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return math.inf


class MetricsLog:
    """metrics.jsonl (lines past `start` from an interrupted run are dropped) and TensorBoard when installed."""

    def __init__(self, out_dir: Path, start: int, tensorboard: bool):
        self.path = out_dir / METRICS_FILE
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if step_of(line) <= start]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start + 1)
            except ImportError:
                pass

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


# ---- the run -----------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CapvectorError(f"config field 'device' is {name!r} but CUDA is not available; use 'auto' or 'cpu'")
    return device


def check_config(config: TrainConfig, policy, auxiliary, vector) -> None:
    """Errors found from the config alone, before anything is built or written."""
    if config.steps < 1 or config.batch_size < 1:
        raise CapvectorError("config fields 'steps' and 'batch_size' must be at least 1")
    if config.strategy == "aux" and auxiliary is None and not config.auxiliary:
        raise CapvectorError("strategy 'aux' needs an auxiliary objective: set 'auxiliary' to 'package.module:factory'")
    if config.strategy == "capvector":
        if vector is None and not config.vector:
            raise CapvectorError("strategy 'capvector' needs 'vector': the capability vector's folder")
        if policy is None and not config.init_from:
            raise CapvectorError("strategy 'capvector' needs 'init_from': the merged checkpoint (theta_meta)")
        if config.orth_lambda <= 0 and not config.orth_hard:
            raise CapvectorError("strategy 'capvector' with orth_lambda 0 and orth_hard false regularizes nothing")
    if config.finetune == "lora" and not config.init_from:
        raise CapvectorError("finetune 'lora' needs 'init_from': the base policy folder the adapter applies to")


def train(
    config: TrainConfig,
    policy: nn.Module | None = None,
    dataset=None,
    auxiliary: nn.Module | None = None,
    vector: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Train per `config` and return out_dir (the policy is in out_dir / "policy").

    Objects given here replace those the config's import strings name; `auxiliary` is used by strategy "aux"
    only and `vector` (gamma, any Mapping of parameter name to tensor) by strategy "capvector" only."""
    check_config(config, policy, auxiliary, vector)
    out_dir = Path(config.out_dir)
    if not config.resume and (checkpoint_dirs(out_dir) or (out_dir / POLICY_DIR).exists()):
        raise CapvectorError(f"{out_dir} already holds a run; set resume=true to continue it or choose another out_dir")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(config.device)
    started_group = False
    if world > 1:  # under torchrun
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            started_group = True
        if config.batch_size % world:
            raise CapvectorError(f"batch_size {config.batch_size} does not split evenly across {world} processes")
    rank = dist.get_rank() if world > 1 else 0
    try:
        state = read_checkpoint(out_dir, config, world) if config.resume else None
        return run(config, out_dir, rank, world, device, state, policy, dataset, auxiliary, vector)
    finally:
        if started_group:
            dist.destroy_process_group()


def run(config, out_dir, rank, world, device, state, policy, dataset, auxiliary, vector) -> Path:
    if dataset is None:
        dataset = import_factory(config.dataset, "dataset")(**config.dataset_args)
    seed_everything(config.seed)
    if policy is None:
        policy = import_factory(config.policy, "policy")(config.init_from, **config.policy_args)
    if config.finetune == "lora":
        policy = wrap_lora(policy, config)
    if config.strategy != "aux":
        auxiliary = None
    elif auxiliary is None:
        torch.manual_seed(config.seed + 1)  # a stream of its own: the projector's init never shifts the policy's
        auxiliary = import_factory(config.auxiliary, "auxiliary")(**config.auxiliary_args)
    if auxiliary is not None:
        auxiliary.attach(policy.get_base_model() if config.finetune == "lora" else policy)
        auxiliary.to(device)
    policy.to(device)
    regularizer = None
    if config.strategy == "capvector":  # built while the policy still holds theta_meta (also when resuming)
        gamma = vector if vector is not None else open_vector(config.vector)
        regularizer = build_regularizer(
            policy,
            gamma,
            mode=config.finetune,
            reduction=config.orth_reduction,
            lora_form=config.lora_form,
            rank=config.orth_rank,
        )
        if vector is None:
            gamma.close()  # the regularizer holds its own copy of gamma's tensors

    stopwatch = Stopwatch(device, config.time_parts)
    model = TrainingModel(policy, auxiliary, stopwatch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    start = 0
    if state is not None:
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        if unexpected or set(missing) - frozen:
            raise CapvectorError(
                f"resume: the checkpoint's tensors do not match the model (missing "
                f"{sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]})"
            )
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        set_rng_state(state["rng"][rank])
    else:
        seed_everything(config.seed + rank)  # the training stream (dropout): same in sft and aux whatever was built
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    else:
        forward = model

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            save_config(config, out_dir / "config.yaml")
        for stale in (out_dir / "checkpoints").glob(".tmp-*"):  # left by a killed run
            shutil.rmtree(stale)
    log = MetricsLog(out_dir, start, config.tensorboard) if rank == 0 else None
    batches = rank_batches(dataset, config, rank, world, start, device)
    batches_per_epoch = len(dataset) // config.batch_size
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda")
    bar = tqdm(total=config.steps, initial=start, disable=rank != 0 or not config.progress, dynamic_ncols=True)
    sums: dict[str, float] = defaultdict(float)
    interval_start, interval_steps = time.perf_counter(), 0
    model.train()

    try:
        for step in range(start + 1, config.steps + 1):
            lr = learning_rate(step - 1, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stopwatch.restart()
            batch = to_device(next(batches), device)
            stopwatch.lap("data")
            with autocast:
                terms = forward(batch)
            loss = sum(terms.values())
            loss.backward()
            stopwatch.lap("backward")
            terms = {name: value.detach().float() for name, value in terms.items()}
            if regularizer is not None:  # after DDP's all-reduce: the same on every rank
                if config.orth_lambda > 0:
                    terms["orth"] = config.orth_lambda * regularizer.add_grad_(config.orth_lambda).float()
                if config.orth_hard:  # else Adam keeps pushing along gamma and project_ keeps undoing it
                    regularizer.project_grad_()
                stopwatch.lap("regularizer")
            values = torch.stack(list(terms.values()))
            if world > 1:
                dist.all_reduce(values)
                values /= world
            values = dict(zip(terms, values.tolist()))
            bad = {f"loss term '{name}'": value for name, value in values.items() if not math.isfinite(value)}
            grad_norm = None
            if config.grad_clip > 0:
                grad_norm = nn.utils.clip_grad_norm_(params, config.grad_clip).item()
                if not math.isfinite(grad_norm):
                    bad["the gradient norm"] = grad_norm
            if bad:  # before the optimizer step: the weights and the checkpoints stay as they were
                what, value = next(iter(bad.items()))
                last = checkpoint_dirs(out_dir)
                raise CapvectorError(
                    f"step {step}: {what} is {value}; the run stopped, the last good checkpoint is "
                    f"{last[-1] if last else '(none yet)'}. Lower lr, check the data, or resume from it"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if regularizer is not None and config.orth_hard:
                regularizer.project_()
            stopwatch.lap("optimizer")

            for name, value in values.items():
                sums[f"loss/{name}"] += value
            sums["loss"] += sum(values.values())
            if grad_norm is not None:
                sums["grad_norm"] += grad_norm
            interval_steps += 1
            bar.update(1)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint(out_dir, step, step // batches_per_epoch, model, optimizer, config, rank, world)
            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - interval_start
                record = {"step": step, "lr": lr, "steps_per_s": interval_steps / elapsed}
                record |= {k: v / interval_steps for k, v in sums.items()}
                record |= {f"time/{k}_ms": 1000 * v / interval_steps for k, v in stopwatch.seconds.items()}
                if log is not None:
                    log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
                sums.clear()
                stopwatch.seconds.clear()
                interval_start, interval_steps = time.perf_counter(), 0
    finally:
        bar.close()
        if log is not None:
            log.close()
        if auxiliary is not None:
            auxiliary.detach()

    if rank == 0:
        export_policy(policy, out_dir / POLICY_DIR)
    if world > 1:
        dist.barrier()
    return out_dir
