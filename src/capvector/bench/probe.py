"""What features carry about where things are: linear probes of object and goal positions.

The teacher's target. A target that patch position and hand position already explain teaches a policy nothing about
where things are (the depth target of the spatial objective: 94% explained by those two, at most 6% left for the
objects). The probe measures the share of the normalized target's variance that the object's and goal's positions
explain beyond patch position and hand position, with nested linear regressions per patch (the one-hot patch index
interacted with everything, which is one regression per patch): base [1, hand xyz], full [1, hand xyz, object xyz, goal
xyz], fitted on training frames, scored on held-out frames:

    share = (SSE_base - SSE_full) / SST,   SST = held-out sum of squares about the training frames' grand mean.

A policy's visual tokens. What a learned representation carries is read the other way round: a ridge regression
from all of a frame's visual tokens to the positions, fitted on training frames and scored (R^2) on frames of
placements the policy never saw (`held_out_r2`). The positive control teaches the tokens those positions; if they
do not carry them on new placements better than plain SFT's tokens do, the control has not learned its target. The
same probe of the action query tokens at a trunk layer (`action_queries`) reads what reaches the action head.
"""

from __future__ import annotations

from typing import Any

import torch

PROBE_STRIDE = 3  # the probes read every third frame of a demonstration (neighbouring frames are nearly the same image)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, tokens, D) -> per-token mean (tokens, D) and, with it removed, per-channel std (D)."""
    mean = features.mean(0)
    std = (features - mean).flatten(0, 1).std(0).clamp(min=1e-6)
    return mean, std


def ridge_errors(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Per patch, held-out sum of squared errors of a ridge regression of y (P, N, D) on x (P, N, k) fitted on the
    `train` frames (N,) (regressors standardized on them, an intercept added)."""
    mean, std = x[:, train].mean(1, keepdim=True), x[:, train].std(1, keepdim=True).clamp(min=1e-6)
    x = torch.cat([torch.ones_like(x[..., :1]), (x - mean) / std], dim=-1).double()
    y = y.double()
    xt, yt = x[:, train], y[:, train]
    gram = xt.transpose(1, 2) @ xt + ridge * train.sum() * torch.eye(x.shape[-1], dtype=x.dtype)
    weights = torch.linalg.solve(gram, xt.transpose(1, 2) @ yt)
    return ((x[:, ~train] @ weights - y[:, ~train]) ** 2).sum((1, 2))


def position_share(
    target: torch.Tensor, hand: torch.Tensor, positions: torch.Tensor, train: torch.Tensor
) -> dict[str, float]:
    """target (N, P, D), hand (N, 3), object and goal xyz (N, 6), train (N,) bool (held-out frames: the rest).

    Returns `share` (the acceptance figure) and the held-out R^2 of patch position alone (`patch`), of patch and
    hand position (`base`) and of the full model (`full`)."""
    held = target[~train].double()
    total = ((held - target[train].double().mean((0, 1))) ** 2).sum()
    patch = ((held - target[train].double().mean(0)) ** 2).sum()
    per_patch_y = target.transpose(0, 1)  # (P, N, D)
    patches = target.shape[1]
    base_x = hand.expand(patches, -1, -1)
    full_x = torch.cat([hand, positions], dim=1).expand(patches, -1, -1)
    base = ridge_errors(base_x, per_patch_y, train).sum()
    full = ridge_errors(full_x, per_patch_y, train).sum()
    return {
        "share": float((base - full) / total),
        "patch": float(1 - patch / total),
        "base": float(1 - base / total),
        "full": float(1 - full / total),
    }


def held_out_r2(
    features: torch.Tensor,
    target: torch.Tensor,
    train: torch.Tensor,
    inner: torch.Tensor,
    ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
) -> float:
    """R^2 on the held-out frames (~train) of a ridge regression of target (N, k) on features (N, ...) fitted on
    the `train` frames; the ridge (relative to the mean squared feature norm) is chosen on the `inner` part of the
    training frames (whole episodes, fitted on the rest), so nothing about the held-out frames chooses it. Solved
    in the dual: features may outnumber frames."""
    x = features.flatten(1).double()
    y = target.double()

    def errors(fit: torch.Tensor, score: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = x[fit].mean(0), x[fit].std(0).clamp(min=1e-6)
        xf, xs = (x[fit] - mean) / std, (x[score] - mean) / std
        y_mean = y[fit].mean(0)
        gram = xf @ xf.T
        scale = ridge * gram.diagonal().mean()
        dual = torch.linalg.solve(gram + scale * torch.eye(len(xf), dtype=x.dtype), y[fit] - y_mean)
        residual = xs @ (xf.T @ dual) + y_mean - y[score]
        return (residual**2).sum(), ((y[score] - y_mean) ** 2).sum()

    fit = train & ~inner
    chosen = min(ridges, key=lambda ridge: float(errors(fit, train & inner, ridge)[0]))
    sse, sst = errors(train, ~train, chosen)
    return float(1 - sse / sst)


@torch.no_grad()
def visual_tokens(policy: Any, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """A policy's vision encoder output (its image-only visual tokens) for every frame (N, cameras, 3, H, W)."""
    return torch.cat([policy.vision(images[i : i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def action_queries(policy: Any, frames: dict[str, Any], batch: int = 256) -> torch.Tensor:
    """A policy's action query tokens at its hook layer (about 2/3 of the trunk, where the action-path control is
    trained) for every frame of `frames` (a batch as the policy reads it: images, state, instruction, and the
    positions for an oracle): what the action head is decoding from, less its last layers."""
    captured: list[torch.Tensor] = []
    hook = policy.get_submodule(policy.config.hook_layer).register_forward_hook(
        lambda module, inputs, output: captured.append(output[:, policy.action_query_slice])
    )
    try:
        for i in range(0, len(frames["instruction"]), batch):
            policy.predict_normalized({key: value[i : i + batch] for key, value in frames.items()})
    finally:
        hook.remove()
    return torch.cat(captured)


def less_task_means(positions: torch.Tensor, task_of_frame: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Positions (N, k) less their task's mean over the training frames: which task it is, and so roughly where its
    objects are, any features tell."""
    positions = positions.clone()
    for task in task_of_frame.unique():
        positions[task_of_frame == task] -= positions[train & (task_of_frame == task)].mean(0)
    return positions
