"""The order of the data: global batch number n is the same set of samples in every run with the same seed.

Data order comes from a generator of its own, seeded by `seed`, so `sft` and `aux` runs with the same seed see
the same batches in the same order whatever their models draw from the other RNGs; a resumed run continues
at batch `start` without replaying the ones before; under DDP or FSDP each process takes its slice of each global
batch, and with gradient accumulation that slice comes in grad_accum_steps equal micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from capvector.errors import CapvectorError
from capvector.training.config import TrainConfig


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
        return int(sample.nbytes)
    return 64  # a string or a number: a guess, small next to images


def take(table: Mapping[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """Rows `index` of a collated table (tensors, or lists such as instruction strings)."""
    rows = index.tolist()
    return {k: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in rows] for k, v in table.items()}


def rank_batches(
    dataset: Dataset[Any], config: TrainConfig, rank: int, world: int, start: int, device: torch.device
) -> Iterator[Any]:
    """This process's micro-batches of global batches start+1 .. steps (grad_accum_steps per batch). A small
    dataset of dict samples is collated once into memory (no loader processes: cheap on few cores); a larger
    one goes through a DataLoader."""
    size = len(dataset)  # type: ignore[arg-type]  # map-style datasets have a length
    if size < config.batch_size:
        raise CapvectorError(f"the dataset has {size} samples, fewer than batch_size {config.batch_size}")
    indices = (
        micro
        for b in islice(global_batches(size, config.batch_size, config.seed, start), config.steps - start)
        for micro in b.view(world, config.grad_accum_steps, -1)[rank]
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
