"""FSDP2 (`torch.distributed.fsdp.fully_shard`): sharding the model, and what the rest of the engine needs to
know about shards.

    shard(model, blocks, device)      # each block its own unit, then the root; parameters become DTensors
    rows = shard_rows(param)          # the rows [start, stop) of dim 0 this process holds
    full = gathered(state_dict)       # DTensors made whole (a collective call), kept by the process that writes
    state = scattered(full, model)    # whole tensors cut back to this process's shards

fully_shard splits every parameter on dim 0 as torch.chunk does: ceil(rows / world) rows per process, the last
ones fewer or none. Gradients and AdamW's moments live in the same shards, so each process holds 1/world of
them; the regularizer (capvector.training.orthogonal) reads only its rows of gamma. The names of parameters do
not change (fully_shard wraps nothing), so state dicts, the auxiliary objective's hook and gamma's keys keep
working. Checkpoints hold whole tensors in the one-process layout (gathered on the first process), so a run's
checkpoint and policy folder are the same files whatever the process count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from capvector.errors import CapvectorError


def shard(model: nn.Module, blocks: Iterable[nn.Module], device: torch.device) -> None:
    """Shard `model` over every process: each block is one unit (all-gathered just before it runs, resharded
    after), the rest of the model the root unit. Gradients are reduce-scattered (averaged) in backward."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(tensor: Any) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (sharing its storage: in-place changes reach the parameter), or the
    tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_rows(tensor: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 of a dim-0-sharded DTensor that this process holds."""
    assert isinstance(tensor, DTensor)
    mesh = tensor.device_mesh
    if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        raise CapvectorError(
            f"a parameter is sharded as {tensor.placements} on a {mesh.ndim}-D mesh; capvector supports FSDP2's "
            "sharding on dim 0 over one process group only"
        )
    rows = tensor.shape[0]
    per = -(-rows // mesh.size())  # torch.chunk's split, as fully_shard uses it
    start = min(mesh.get_local_rank() * per, rows)
    stop = min(start + per, rows)
    if tensor.to_local().shape[0] != stop - start:  # a layout this function does not know: say so, never guess
        raise CapvectorError(f"a sharded parameter holds {tensor.to_local().shape[0]} rows, expected {stop - start}")
    return start, stop


def group(tensor: torch.Tensor) -> dist.ProcessGroup:
    """The process group a DTensor is sharded over."""
    return cast(DTensor, tensor).device_mesh.get_group()


def gathered(state: Mapping[str, Any], keep: bool) -> dict[str, Any]:
    """A (nested) state dict with every DTensor made whole, on the CPU. A collective call: all processes
    gather each tensor in the same order; only where `keep` (the process that writes) the whole tensors stay,
    one at a time, so the others hold no more than one tensor beyond their shards."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            out[key] = gathered(value, keep)
        elif isinstance(value, DTensor):
            whole = value.full_tensor()
            out[key] = whole.cpu() if keep else None
        else:
            out[key] = value
    return out


def cut(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` (a tensor in the one-process layout) as `like` holds it: this process's rows as a DTensor
    when `like` is sharded, else itself."""
    if not isinstance(like, DTensor):
        return whole
    start, stop = shard_rows(like)
    rows = whole[start:stop].to(like.device, like.dtype).clone()  # a shard of its own, not a view of the file
    return DTensor.from_local(
        rows, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def scattered(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A model state dict in the one-process layout, cut to this process's shards of `model`."""
    current = model.state_dict()
    return {key: cut(value, current[key]) if key in current else value for key, value in state.items()}


def scattered_optimizer(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state dict in the one-process layout (the state of parameter i of its groups, in order),
    cut to this process's shards: each moment is sharded as its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {
        index: {k: cut(v, params[index]) if is_moment(v, params[index]) else v for k, v in values.items()}
        for index, values in state["state"].items()
    }
    return {"state": per_param, "param_groups": state["param_groups"]}


def is_moment(value: Any, param: torch.Tensor) -> bool:
    """Whether an optimizer state value has its parameter's shape (AdamW's moments; not its step count)."""
    return isinstance(value, torch.Tensor) and value.shape == param.shape


def scalar(value: torch.Tensor) -> float:
    """A replicated scalar (clip_grad_norm_ over DTensor gradients returns a DTensor) as a float."""
    return float(value.full_tensor() if isinstance(value, DTensor) else value)
