"""The linear probe of learned features (capvector.bench.probe.held_out_r2) on features with a known answer."""

import dataclasses

import pytest
import torch

from capvector.bench.probe import held_out_r2
from policy_batches import synthetic_batch


def frames(features: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1500, features, generator=generator)
    weights = torch.randn(features, 6, generator=generator) / features**0.5
    return x, x @ weights + noise * torch.randn(1500, 6, generator=generator)


def masks(n: int = 1500, held_out: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.arange(n)
    return index < n - held_out, (index // 50) % 5 == 1  # inner: whole 50-frame "episodes"


def test_the_probe_recovers_the_share_a_linear_signal_explains():
    x, y = frames(features=100, noise=0.5, seed=0)  # signal variance 1, noise 0.25: R^2 = 0.8
    train, inner = masks()
    assert held_out_r2(x, y, train, inner) == pytest.approx(0.8, abs=0.03)
    # the same targets from features that carry nothing: nothing explained on held-out frames
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert abs(held_out_r2(noise, y, train, inner)) < 0.02


def test_the_probe_fits_more_features_than_frames_and_reads_token_grids():
    x, y = frames(features=2000, noise=0.1, seed=2)
    train, inner = masks()
    tokens = x.view(1500, 20, 100)  # (frames, tokens, dim): flattened by the probe
    assert held_out_r2(tokens, y, train, inner) == pytest.approx(held_out_r2(x, y, train, inner))
    assert 0.3 < held_out_r2(tokens, y, train, inner) < 1


def test_the_action_queries_are_read_at_the_hook_layer_for_every_frame_and_an_oracle_reads_its_positions():
    from capvector.bench.env.features import PRIVILEGED_KEY
    from capvector.bench.policy.configuration_policy import PolicyConfig
    from capvector.bench.policy.modeling_policy import Policy
    from capvector.bench.probe import action_queries

    torch.manual_seed(0)
    config = PolicyConfig(image_size=32, stem_channels=(8, 8), dim=16, heads=2, trunk_layers=3)
    frames = synthetic_batch(batch_size=6, config=config)
    policy = Policy(config).eval()
    queries = action_queries(policy, frames, batch=2)  # in batches of 2: the same as all at once
    assert queries.shape == (6, config.chunk_size, config.dim)
    assert torch.allclose(queries, action_queries(policy, frames), atol=1e-5)
    assert not torch.allclose(queries, action_queries(policy, frames | {"observation.state": torch.rand(6, 4)}))
    assert not policy.trunk.layers[1]._forward_hooks  # the hook is gone
    told = dataclasses.replace(config, privileged_dim=6, privileged_q01=[0.0] * 6, privileged_q99=[1.0] * 6)
    oracle = Policy(told).eval()
    moved = frames | {PRIVILEGED_KEY: torch.rand(6, 6)}
    assert not torch.allclose(action_queries(oracle, frames), action_queries(oracle, moved))
