"""A random batch as the benchmark's policy reads it, for the tests of the policy, its objectives and its probes
(tests/ is on sys.path: pyproject's pytest `pythonpath`)."""

from __future__ import annotations

import torch

from capvector.bench.env.features import PRIVILEGED_DIM, PRIVILEGED_KEY
from capvector.bench.policy.configuration_policy import PolicyConfig


def synthetic_batch(batch_size: int = 4, config: PolicyConfig | None = None, seed: int = 0) -> dict:
    """Random images and depth per camera, state, two instructions, an action chunk (the first sample's last three
    steps padding) and the object and goal positions, shaped for `config` (default: PolicyConfig())."""
    config = config or PolicyConfig()
    generator = torch.Generator().manual_seed(seed)
    size = config.image_size
    batch = {"instruction": ["pick the puck and place it at the goal", "open the drawer"] * (batch_size // 2)}
    for camera in config.cameras:
        batch[f"observation.images.{camera}"] = torch.randint(
            0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator
        )
        batch[f"observation.depth.{camera}"] = 0.3 + torch.rand(batch_size, 1, size, size, generator=generator)
    batch["observation.state"] = torch.rand(batch_size, config.state_dim, generator=generator) * 0.5
    batch["action"] = torch.rand(batch_size, config.chunk_size, config.action_dim, generator=generator) * 2 - 1
    batch["action_is_pad"] = torch.zeros(batch_size, config.chunk_size, dtype=torch.bool)
    batch["action_is_pad"][0, -3:] = True
    batch[PRIVILEGED_KEY] = torch.rand(batch_size, PRIVILEGED_DIM, generator=generator)
    return batch
