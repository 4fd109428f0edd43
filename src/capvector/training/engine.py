"""The training engine: `sft`, `aux` (SFT plus an auxiliary objective) and `capvector` (SFT from the merged
checkpoint plus lambda * L_orth), full or LoRA finetuning, in one process or under torchrun (DDP, or FSDP2
sharding), with gradient accumulation and activation checkpointing.

    out_dir = train(load_config("run.yaml", ["steps=2000"]))    # or: train(config, policy, dataset, auxiliary)

The three strategies run the same loop; the strategy only adds terms. Read top to bottom: `train` checks every
input before it touches anything, `setup` builds the pieces into a `Run`, `train_step` is one optimizer step,
`loop` runs the steps with checkpoints (capvector.training.checkpointing) and metrics
(capvector.training.metrics); the data order is capvector.training.data's. Written to out_dir:

    config.yaml            the resolved config
    metrics.jsonl          one line per log_every steps: loss terms, lr, grad norm, ms per step in each part;
                           one per evaluation (eval_every): eval/<name>
    checkpoints/step_N/    trainer_state.pt (everything to resume exactly), policy/ (as the final one) and
                           checkpoint.json (their checksums, verified on resume)
    policy/                the trained policy: policy.save_pretrained's folder (else model.safetensors), or for
                           LoRA the PEFT adapter folder, base_model_name_or_path = init_from
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from capvector.errors import CapvectorError
from capvector.params.vectors import open_vector
from capvector.training.auxiliary import AuxiliaryObjective
from capvector.training.blocks import checkpoint_activations, find_blocks
from capvector.training.checkpointing import (
    POLICY_DIR,
    checkpoint_dirs,
    export_policy,
    read_checkpoint,
    remove_debris,
    restore,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from capvector.training.checkpointing import (
    STATE_FILE as STATE_FILE,  # re-exported: the benchmark's pipeline finds checkpoints through this module
)
from capvector.training.config import CONFIG_FILE, TrainConfig, checked, save_config
from capvector.training.data import rank_batches, to_device
from capvector.training.metrics import Metrics, Stopwatch
from capvector.training.orthogonal import OrthogonalRegularizer, build_regularizer
from capvector.training.preflight import Vector, check_inputs, factory, pick_device
from capvector.training.sharding import scalar, shard

# ---- the run ------------------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    policy: nn.Module | None = None,
    dataset: Dataset[Any] | None = None,
    auxiliary: AuxiliaryObjective | None = None,
    vector: Vector | None = None,
) -> Path:
    """Train per `config` and return out_dir (the policy is in out_dir / "policy").

    Objects given here replace those the config's import strings name; `auxiliary` is used by strategy "aux"
    only and `vector` (gamma, any Mapping of parameter name to tensor) by strategy "capvector" only."""
    config = checked(config)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    objects = {"policy": policy, "dataset": dataset, "auxiliary": auxiliary, "vector": vector}
    given = {name for name, value in objects.items() if value is not None}
    check_inputs(config, world, given, vector)
    out_dir = Path(config.out_dir)
    with process_group(world, pick_device(config.device)) as (rank, device):
        state = read_checkpoint(out_dir, config, world, report=rank == 0) if config.resume else None
        run = setup(config, rank, world, device, state, policy, dataset, auxiliary, vector)
        loop(run)
        export_policy(run.model.policy, out_dir / POLICY_DIR, rank)  # FSDP: every process gathers, rank 0 writes
        del run  # DDP's reducer must go before the process group does: see process_group
        if world > 1:
            dist.barrier()
    return out_dir


@contextlib.contextmanager
def process_group(world: int, device: torch.device) -> Iterator[tuple[int, torch.device]]:
    """(rank, device) of this process: under torchrun (world > 1) a process group, one GPU per process."""
    if world == 1:
        yield 0, device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), device
    finally:
        # The run's garbage (a DDP reducer, FSDP's hooks and meshes: reference cycles) collected while the group is
        # alive, also when the caller started it and ends it later. Left for later, a DDP reducer would drop the gloo
        # group's last reference while holding the GIL; the group's destructor joins its worker thread, which may need
        # the GIL to free a finished collective's tensors: a deadlock (seen about once in 20 two-process runs). And a
        # group that garbage still holds outlives destroy_process_group: its gloo thread, freeing a finished
        # barrier's tensors, then needs the GIL during the interpreter's exit and aborts the process ("terminate
        # called without an active exception", about once in 10 two-process test launches under load). Collected
        # now, they leave the group to destroy_process_group, whose release does not hold the GIL.
        gc.collect()
        if started:
            dist.destroy_process_group()


# ---- building the pieces -----------------------------------------------------------------------------------


def wrap_lora(policy: nn.Module, config: TrainConfig) -> nn.Module:
    """The policy with PEFT LoRA adapters on its nn.Linear modules matching lora_targets (all when empty)."""
    import peft  # an optional extra, so imported here; check_inputs made sure it is installed

    linear = [name for name, module in policy.named_modules() if isinstance(module, nn.Linear)]
    targets = [n for n in linear if not config.lora_targets or any(fnmatch(n, p) for p in config.lora_targets)]
    if not targets:
        raise CapvectorError(
            f"config field 'lora_targets' {config.lora_targets} matches no nn.Linear module of the policy; "
            f"its linear modules are: {', '.join(linear) or '(none)'}"
        )
    lora = peft.LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # PEFT annotates int; scaling is alpha / r
        lora_dropout=config.lora_dropout,
        target_modules=targets,
    )
    model = peft.get_peft_model(policy, lora)
    # the capability-vector tools find the base weights here
    model.peft_config["default"].base_model_name_or_path = config.init_from
    return model


class TrainingModel(nn.Module):
    """The policy and (strategy "aux") the auxiliary objective as one module, so DDP also averages the projector's
    gradients; the stopwatch collects forward-pass times per part."""

    def __init__(self, policy: nn.Module, auxiliary: AuxiliaryObjective | None, stopwatch: Stopwatch):
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


@dataclass
class Run:
    """Everything the loop needs."""

    config: TrainConfig
    out_dir: Path
    rank: int
    world: int
    device: torch.device
    model: TrainingModel
    forward: nn.Module  # the model (sharded in place under FSDP), or DDP around it
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    regularizer: OrthogonalRegularizer | None
    batches: Iterator[Any]
    batches_per_epoch: int
    start: int  # the step the run continues after (0: a new run)


def build_policy(config: TrainConfig, policy: nn.Module | None) -> nn.Module:
    if policy is None:
        policy = factory(config, "policy")()
    return wrap_lora(policy, config) if config.finetune == "lora" else policy


def build_auxiliary(config: TrainConfig, auxiliary: AuxiliaryObjective | None) -> AuxiliaryObjective | None:
    if config.strategy != "aux":
        return None
    if auxiliary is None:
        torch.manual_seed(config.seed + 1)  # a stream of its own: the projector's init never shifts the policy's
        auxiliary = factory(config, "auxiliary")()
    return auxiliary


def build_orthogonal(config: TrainConfig, policy: nn.Module, vector: Vector | None) -> OrthogonalRegularizer | None:
    """L_orth for strategy "capvector", built while the policy still holds theta_meta (also when resuming)."""
    if config.strategy != "capvector":
        return None
    options = (config.finetune, config.orth_reduction, config.lora_form, config.orth_rank)
    if vector is not None:
        return build_regularizer(policy, vector, *options)
    gamma = open_vector(cast(str, config.vector))
    try:
        return build_regularizer(policy, gamma, *options)
    finally:
        gamma.close()  # the regularizer holds its own copy of gamma's tensors


def setup(
    config: TrainConfig,
    rank: int,
    world: int,
    device: torch.device,
    state: dict[str, Any] | None,
    policy: nn.Module | None,
    dataset: Dataset[Any] | None,
    auxiliary: AuxiliaryObjective | None,
    vector: Vector | None,
) -> Run:
    if dataset is None:
        dataset = factory(config, "dataset")()
    seed_everything(config.seed)
    policy = build_policy(config, policy)
    auxiliary = build_auxiliary(config, auxiliary)
    if auxiliary is not None:
        auxiliary.attach(cast(Any, policy).get_base_model() if config.finetune == "lora" else policy)
        auxiliary.to(device)
    policy.to(device)
    blocks = policy_blocks(config, policy, world)
    model = TrainingModel(policy, auxiliary, Stopwatch(device, config.time_parts))
    forward = distributed(model, config, world, device, blocks)
    regularizer = build_orthogonal(config, policy, vector)  # after sharding: it keeps this process's rows of gamma
    params = [p for p in model.parameters() if p.requires_grad]  # under FSDP: the sharded parameters
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    if state is not None:
        start = restore(model, optimizer, state, rank)
    else:
        start = 0
        seed_everything(config.seed + rank)  # the training stream (dropout): same in sft and aux whatever was built
    if rank == 0:
        prepare_out_dir(config, new=state is None)
    return Run(
        config=config,
        out_dir=Path(config.out_dir),
        rank=rank,
        world=world,
        device=device,
        model=model,
        forward=forward,
        params=params,
        optimizer=optimizer,
        regularizer=regularizer,
        batches=rank_batches(dataset, config, rank, world, start, device),
        batches_per_epoch=len(dataset) // config.batch_size,  # type: ignore[arg-type]  # map-style: has a length
        start=start,
    )


def policy_blocks(config: TrainConfig, policy: nn.Module, world: int) -> list[nn.Module]:
    """The policy's blocks (capvector.training.blocks) where FSDP or activation checkpointing needs them,
    set to recompute their activations in backward when activation_checkpointing asks for it."""
    if not (config.activation_checkpointing or (config.distributed == "fsdp" and world > 1)):
        return []
    blocks = list(find_blocks(policy, config.blocks).values())
    if config.activation_checkpointing:
        if not blocks:
            raise CapvectorError(
                "activation_checkpointing: the policy has no nn.ModuleList of layers to checkpoint; name its "
                "blocks in the config field 'blocks' (glob patterns over module names)"
            )
        for block in blocks:
            checkpoint_activations(block)
    return blocks


def distributed(
    model: nn.Module, config: TrainConfig, world: int, device: torch.device, blocks: list[nn.Module]
) -> nn.Module:
    """With several processes: the model under DDP (a whole copy in each, gradients all-reduced in backward),
    or (distributed "fsdp") sharded in place, one FSDP2 unit per block (capvector.training.sharding)."""
    if world == 1:
        return model
    if config.distributed == "fsdp":
        shard(model, blocks, device)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def prepare_out_dir(config: TrainConfig, new: bool) -> None:
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_debris(out_dir)
    if new:
        save_config(config, out_dir / CONFIG_FILE)


# ---- the steps ---------------------------------------------------------------------------------------------


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at the last step (or constant). step counts from 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def train_step(run: Run, step: int) -> tuple[dict[str, float], float | None]:
    """One optimizer step on global batch `step`, in grad_accum_steps micro-batches: the loss terms (averaged
    over micro-batches and processes) and the grad norm."""
    config, stopwatch = run.config, run.model.stopwatch
    parts = config.grad_accum_steps
    stopwatch.restart()
    terms: dict[str, torch.Tensor] = {}
    for part in range(parts):
        batch = to_device(next(run.batches), run.device)
        stopwatch.lap("data")
        with synced(run.forward, part == parts - 1):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.bf16 and run.device.type == "cuda"):
                micro: dict[str, torch.Tensor] = run.forward(batch)
            # each micro-batch's mean over its samples, / parts: the gradients add up to the whole batch's mean
            torch.autograd.backward(cast(torch.Tensor, sum(micro.values())) / parts)
        stopwatch.lap("backward")
        for name, value in micro.items():
            value = value.detach().float() / parts
            terms[name] = terms[name] + value if name in terms else value
    if run.regularizer is not None:  # once per step, after DDP's all-reduce (FSDP's reduce-scatter): on every rank
        if config.orth_lambda > 0:
            terms["orth"] = config.orth_lambda * run.regularizer.add_grad_(config.orth_lambda).float()
        if config.orth_hard:  # else Adam keeps pushing along gamma and project_ keeps undoing it
            run.regularizer.project_grad_()
        stopwatch.lap("regularizer")
    losses = mean_over_processes(terms, run.world)
    grad_norm = scalar(nn.utils.clip_grad_norm_(run.params, config.grad_clip)) if config.grad_clip > 0 else None
    stop_unless_finite(run, step, losses, grad_norm)  # before the optimizer step: weights and checkpoints stay
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.regularizer is not None and config.orth_hard:
        run.regularizer.project_()
    stopwatch.lap("optimizer")
    return losses, grad_norm


def synced(forward: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP all-reduces the gradients in the last micro-batch's backward only. FSDP reduce-scatters after every
    micro-batch: skipping that would keep whole, unsharded gradients, the memory FSDP is there to save."""
    if sync or not isinstance(forward, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return forward.no_sync()


def mean_over_processes(terms: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    values = torch.stack(list(terms.values()))
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return dict(zip(terms, values.tolist(), strict=True))


def stop_unless_finite(run: Run, step: int, losses: dict[str, float], grad_norm: float | None) -> None:
    bad = {f"loss term '{name}'": value for name, value in losses.items() if not math.isfinite(value)}
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad["the gradient norm"] = grad_norm
    if bad:
        what, value = next(iter(bad.items()))
        last = checkpoint_dirs(run.out_dir)
        raise CapvectorError(
            f"step {step}: {what} is {value}; the run stopped, the last good checkpoint is "
            f"{last[-1] if last else '(none yet)'}. Lower lr, check the data, or resume from it"
        )


def evaluate(run: Run, hook: Callable[..., Any]) -> tuple[dict[str, float], float]:
    """The eval hook's numbers for the policy as it is now, and the seconds it took. The policy is in eval mode
    without gradients meanwhile, and every RNG stream is put back after, so evaluating never changes the trained
    weights. The first process evaluates alone; under DDP the others wait for it at the next step's all-reduce."""
    state, started = rng_state(), time.perf_counter()
    run.model.eval()
    try:
        with torch.no_grad():
            values = hook(run.model.policy)
    finally:
        run.model.train()
        set_rng_state(state)
    if not isinstance(values, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in values.items()
    ):
        raise CapvectorError(f"eval hook {run.config.eval} returned {values!r:.200}; return a dict of numbers by name")
    return {k: float(v) for k, v in values.items()}, time.perf_counter() - started


def loop(run: Run) -> None:
    """Steps start+1 .. steps, with checkpoints and metrics."""
    config = run.config
    metrics = Metrics(run.out_dir, run.start, config, run.model.stopwatch, active=run.rank == 0)
    hook = factory(config, "eval") if config.eval_every and run.rank == 0 else None
    run.model.train()
    try:
        for step in range(run.start + 1, config.steps + 1):
            lr = learning_rate(step - 1, config)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            losses, grad_norm = train_step(run, step)
            metrics.add(step, lr, losses, grad_norm)
            if hook is not None and step % config.eval_every == 0:  # before the checkpoint: a resume redoes both
                metrics.add_eval(step, *evaluate(run, hook))
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint(
                    run.out_dir,
                    step,
                    step // run.batches_per_epoch,
                    run.model,
                    run.model.policy,
                    run.optimizer,
                    config,
                    run.rank,
                    run.world,
                )
    finally:
        metrics.close()
        if run.model.auxiliary is not None:
            run.model.auxiliary.detach()
