"""A policy's blocks: the repeated layers that FSDP shards one unit at a time and activation checkpointing
recomputes in the backward pass instead of keeping their activations.

The rule: the modules named by the config's `blocks` glob patterns (e.g. ["trunk.layers.*"]), or, when it is
empty, every element of every nn.ModuleList (the layer lists of transformers: for the benchmark policy the
trunk's and the encoders' blocks). Only the outermost matches count (a block inside a block is part of it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatch
from typing import Any

import torch.utils.checkpoint
from torch import nn

from capvector.errors import CapvectorError


def find_blocks(policy: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
    """Name -> module of the policy's outermost blocks, in model order."""
    in_lists = {id(m) for module in policy.modules() if isinstance(module, nn.ModuleList) for m in module}
    found: dict[str, nn.Module] = {}
    for name, module in policy.named_modules():
        chosen = any(fnmatch(name, p) for p in patterns) if patterns else id(module) in in_lists
        if chosen and name and not any(name.startswith(outer + ".") for outer in found):
            found[name] = module
    unmatched = [p for p in patterns if not any(fnmatch(name, p) for name, _ in policy.named_modules())]
    if unmatched:
        raise CapvectorError(
            f"config field 'blocks': pattern(s) {unmatched} match no module of the policy; "
            "name its repeated layers, e.g. 'model.layers.*'"
        )
    return found


def checkpoint_activations(block: nn.Module) -> None:
    """Recompute `block`'s forward pass in backward (torch.utils.checkpoint, non-reentrant, RNG state
    restored: the same dropout masks, so the same gradients). Its forward is replaced on the instance, not
    wrapped in another module: parameter names, state dicts and hooks on the block stay as they were."""
    forward: Callable[..., Any] = block.forward

    def recomputed(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed
