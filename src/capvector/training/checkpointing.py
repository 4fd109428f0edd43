"""Checkpoints that resume a run exactly, and that are verified before they are trusted.

    checkpoints/step_0000500/
        trainer_state.pt    everything to resume: trainable weights, optimizer, RNG states of every process, step
        policy/             the policy as the final one is saved (for evaluating intermediate checkpoints)
        checkpoint.json     the SHA-256 of every other file (written last: a checkpoint without it is incomplete)

A checkpoint is written under a temporary name and renamed into place whole. On resume the newest one whose
files match their checksums is used; a damaged one is reported, renamed to damaged-step_N (kept for a look,
never used again) and the run falls back to the one before. trainer_state.pt holds only tensors and plain
values, read back with torch.load(weights_only=True): nothing is unpickled.

Under FSDP (capvector.training.sharding) the shards are gathered into whole tensors on the first process, so a
checkpoint holds the same files in the same layout as a one-process run's (and policy/ is a plain safetensors
model that `capvector extract` reads); on resume every process maps trainer_state.pt (mmap: the page cache is
shared, not copied per process) and keeps only its shards.
"""

from __future__ import annotations

import contextlib
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_model
from torch import nn

from capvector.errors import CapvectorError
from capvector.files import atomic_path, read_json, remove, sha256_file, write_json
from capvector.training.config import CONFIG_FILE, TrainConfig, config_hash, result_fields
from capvector.training.sharding import gathered, is_sharded, scattered, scattered_optimizer

STATE_FILE = "trainer_state.pt"
POLICY_DIR = "policy"  # out_dir/policy: the trained policy; checkpoints/step_N/policy: the policy at step N
MANIFEST = "checkpoint.json"
STEP_NAME = re.compile(r"step_(\d+)")


# ---- RNG states --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, gauss = cast(tuple[str, Any, int, int, float], np.random.get_state())
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


def all_rng_states(world: int) -> list[dict[str, Any]]:
    """Every process's RNG states (dropout streams differ between ranks); a collective call under DDP."""
    if world == 1:
        return [rng_state()]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


# ---- writing -----------------------------------------------------------------------------------------------


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    """The folder of the checkpoint taken after `step` steps."""
    return out_dir / "checkpoints" / f"step_{step:07d}"


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints (with their manifest), oldest first."""
    found = [m.parent for m in (out_dir / "checkpoints").glob(f"step_*/{MANIFEST}")]
    return sorted((p for p in found if STEP_NAME.fullmatch(p.name)), key=lambda p: int(p.name.removeprefix("step_")))


def sharded(module: nn.Module) -> bool:
    return any(is_sharded(p) for p in module.parameters())


def export_policy(policy: nn.Module, path: Path, rank: int = 0) -> None:
    """The policy's folder (save_pretrained's, else model.safetensors), written whole and then renamed by the
    first process. A sharded policy is gathered first: a collective call, made by every process."""
    whole = gathered(policy.state_dict(), keep=rank == 0) if sharded(policy) else None
    if rank == 0:
        write_policy(policy, path, whole)


def write_policy(policy: nn.Module, path: Path, whole: dict[str, Any] | None) -> None:
    """export_policy's writing: `whole`, when given, is the sharded policy's gathered state."""
    with atomic_path(path) as temporary, serving(policy, whole):
        if hasattr(policy, "save_pretrained"):  # PEFT writes the adapter folder; policies their own format
            cast(Any, policy).save_pretrained(temporary)
        else:
            temporary.mkdir(parents=True)
            save_model(policy, str(temporary / "model.safetensors"))


@contextlib.contextmanager
def serving(policy: nn.Module, state: dict[str, Any] | None) -> Iterator[None]:
    """While saving, the policy's state_dict() returns `state` (its whole tensors) when given: save_pretrained
    reads self.state_dict(), which on a sharded policy would hold only this process's shards."""
    if state is None:
        yield
        return
    policy.state_dict = lambda *args, **kwargs: state  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del policy.state_dict


def resumable_state(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers: frozen weights (a LoRA run's base) come back from init_from. Sharded
    ones are gathered (a collective call), kept where `keep`."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    state = {k: v for k, v in model.state_dict().items() if k not in frozen}
    return gathered(state, keep) if sharded(model) else state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any]:
    """optimizer.state_dict(), with sharded moments gathered (a collective call), kept where `keep`."""
    state = optimizer.state_dict()
    return gathered(state, keep) if sharded(model) else state


def write_manifest(folder: Path, step: int, config: TrainConfig) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    checksums = {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}
    write_json(folder / MANIFEST, {"step": step, "config_hash": config_hash(config), "sha256": checksums})


def save_checkpoint(
    out_dir: Path,
    step: int,
    epoch: int,
    model: nn.Module,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    rank: int,
    world: int,
) -> None:
    """Checkpoint step_N (on every process: the RNG states are gathered), then drop all but the newest
    keep_checkpoints."""
    rngs = all_rng_states(world)
    model_state, optimizer_state_ = resumable_state(model, rank == 0), optimizer_state(model, optimizer, rank == 0)
    policy_state = gathered(policy.state_dict(), rank == 0) if sharded(policy) else None
    if rank == 0:
        state = {
            "step": step,  # also the data position: global batches consumed (their order is a function of seed)
            "epoch": epoch,
            "config": result_fields(config),
            "world_size": world,
            "model": model_state,
            "optimizer": optimizer_state_,
            "rng": rngs,
        }
        with atomic_path(checkpoint_dir(out_dir, step)) as folder:
            folder.mkdir(parents=True)
            torch.save(state, folder / STATE_FILE)
            write_policy(policy, folder / POLICY_DIR, policy_state)
            write_manifest(folder, step, config)
        if config.keep_checkpoints:
            for old in checkpoint_dirs(out_dir)[: -config.keep_checkpoints]:
                remove(old)
    if world > 1:
        dist.barrier()


def remove_debris(out_dir: Path) -> None:
    """Temporary files and folders a killed run left (their names start with a dot)."""
    for folder in (out_dir, out_dir / "checkpoints"):
        for stale in folder.glob(".*.tmp-*"):
            remove(stale)
        for stale in folder.glob(".*.old-*"):
            remove(stale)


# ---- reading -----------------------------------------------------------------------------------------------


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint's files, or None when each matches its checksum."""
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), dict):
        return f"{MANIFEST} is unreadable"
    if STATE_FILE not in manifest["sha256"]:
        return f"{MANIFEST} lists no {STATE_FILE}"
    for name, checksum in manifest["sha256"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != checksum:
            return f"{name} does not match its checksum"
    return None


def newest_intact(out_dir: Path, report: bool) -> Path | None:
    """The newest checkpoint whose files are intact. Damaged newer ones are set aside, and said so (`report`:
    this process speaks for the run, and renames them)."""
    for folder in reversed(checkpoint_dirs(out_dir)):
        problem = damage(folder)
        if problem is None:
            return folder
        if report:
            aside = folder.with_name(f"damaged-{folder.name}")
            remove(aside)
            folder.rename(aside)
            print(
                f"capvector train: checkpoint {folder} is damaged ({problem}); moved to {aside.name}, "
                "falling back to the previous checkpoint",
                file=sys.stderr,
            )
    return None


def read_checkpoint(out_dir: Path, config: TrainConfig, world: int, report: bool) -> dict[str, Any]:
    """The newest intact checkpoint's state, checked against this run's config and process count."""
    folder = newest_intact(out_dir, report)
    if folder is None:
        raise CapvectorError(
            f"resume: {out_dir}/checkpoints holds no complete, intact checkpoint; set resume=false to start this "
            "run (or check out_dir)"
        )
    # mmap: the processes of one machine share the file's pages instead of each holding a copy
    state: dict[str, Any] = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    if report:
        print(f"capvector train: resuming from {folder}", file=sys.stderr)
    now = result_fields(config)
    differences = [
        f"{k}: {state['config'].get(k)!r} in the checkpoint, {now.get(k)!r} now"
        for k in sorted(set(now) | set(state["config"]))
        if state["config"].get(k) != now.get(k)
    ]
    if differences:
        raise CapvectorError(
            f"resume: {folder} was made with another config ({'; '.join(differences)}); resume with the config "
            f"it was made with ({out_dir / CONFIG_FILE}) or choose a new out_dir"
        )
    if state["world_size"] != world:
        raise CapvectorError(
            f"resume: {folder} was made by {state['world_size']} processes, this run has {world}; resume with "
            f"--nproc_per_node {state['world_size']} to continue exactly"
        )
    return state


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], rank: int) -> int:
    """Load a checkpoint's state into the model, the optimizer and this process's RNGs; returns its step."""
    shards = sharded(model)
    missing, unexpected = model.load_state_dict(
        scattered(state["model"], model) if shards else state["model"], strict=False
    )
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise CapvectorError(
            f"resume: the checkpoint's tensors do not match the model (missing "
            f"{sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]})"
        )
    optimizer.load_state_dict(scattered_optimizer(state["optimizer"], optimizer) if shards else state["optimizer"])
    set_rng_state(state["rng"][rank])
    step: int = state["step"]
    return step
