"""What gamma carries, read in the policy's representation: the acceptance figure of gamma's learned target.

The auxiliary objectives of this benchmark teach the image-only visual tokens where the objects are. If gamma
carries that capability, theta_meta = theta_pt + alpha * gamma should carry more of it than theta_pt does, as
theta_ao does against theta_ft. The probe (capvector.bench.probe.held_out_r2) reads it: the held-out R^2 of the
object's and goal's positions (less their task's mean) from a policy's visual tokens, a ridge regression fitted on
the frames of most demonstrations of a split and scored on the others (other placements), on the extraction tasks
(D_ext, where the objective trained) and on the held-out tasks (where gamma is meant to help, never seen by
theta_pt, theta_ft, theta_ao or theta_meta).
"""

from __future__ import annotations

from pathlib import Path

import torch

from capvector.bench import recipe
from capvector.bench.env.camera import CAMERAS
from capvector.bench.env.dataset import open_meta
from capvector.bench.experiment.layout import RunLayout
from capvector.bench.experiment.protocol import ReproduceConfig, alpha_candidates
from capvector.bench.probe import PROBE_STRIDE, held_out_r2, less_task_means, visual_tokens

SPLITS = ("extract", "downstream")
HELD_OUT_EVERY = 5  # every fifth demonstration is held out (the last one where a split has fewer)
MIN_EPISODES = 3  # one to fit on, one to choose the ridge, one to score


def split_frames(root: Path) -> tuple[torch.Tensor, ...] | None:
    """Images, positions less their task's mean, the training frames and among them the episodes that choose the
    probe's ridge, of a demonstration folder; None when it has fewer than MIN_EPISODES demonstrations."""
    from capvector.bench.teacher.pretraining import load_frames

    episodes = open_meta(root).episodes
    if len(episodes) < MIN_EPISODES:
        return None
    frames = load_frames(root, CAMERAS, PROBE_STRIDE)
    names = sorted({e["name"] for e in episodes})
    task_of_frame = torch.tensor([names.index(e["name"]) for e in episodes])[frames.episode]
    every = HELD_OUT_EVERY if len(episodes) >= HELD_OUT_EVERY else len(episodes)
    held = frames.episode % every == every - 1
    positions = less_task_means(frames.privileged, task_of_frame, ~held)
    return frames.images, positions, ~held, (frames.episode % every == 1) & ~held


def policies(config: ReproduceConfig, layout: RunLayout) -> dict[str, Path]:
    """The probed weights: theta_pt, theta_ft, theta_ao and theta_meta at every alpha of the run."""
    return {
        "theta_pt": layout.pretrained,
        "theta_ft": layout.finetuned,
        "theta_ao": layout.auxiliary,
        **{f"theta_meta alpha {alpha:g}": layout.theta_meta(alpha) for alpha in alpha_candidates(config)},
    }


def carried(config: ReproduceConfig, layout: RunLayout) -> dict[str, dict[str, float] | None]:
    """split -> {weights: held-out R^2}, None for a split with too few demonstrations."""
    frames = {split: split_frames(layout.demos(split)) for split in SPLITS}
    available = {split: f for split, f in frames.items() if f is not None}
    results: dict[str, dict[str, float]] = {split: {} for split in available}
    for name, path in policies(config, layout).items():
        policy = recipe.load_trained(str(path)).eval()
        for split, (images, positions, train, inner) in available.items():
            results[split][name] = held_out_r2(visual_tokens(policy, images), positions, train, inner)
    return {split: results.get(split) for split in SPLITS}


def carried_share(r2: dict[str, float], alpha: float) -> float | None:
    """The part of theta_ao's gain over theta_ft that theta_meta at `alpha` shows over theta_pt; None when the
    auxiliary objective gave theta_ao no gain to carry."""
    gain = r2["theta_ao"] - r2["theta_ft"]
    return (r2[f"theta_meta alpha {alpha:g}"] - r2["theta_pt"]) / gain if gain > 0 else None
