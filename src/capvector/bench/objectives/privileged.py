"""A positive control: an auxiliary objective that teaches where the task's things are, from the simulator.

Every visual token, read where it has seen only its camera's image (the vision encoder's output, before the trunk
mixes in the state and the instruction), goes through a small projector (LayerNorm, Linear, GELU, Linear) and
regresses the positions of the manipulated object and of the goal relative to the hand, in world axes, in units of
`scale` metres. A token can only do that by finding the object, the goal and the gripper in its image: the target
carries exactly what the headroom oracle is given as input, so if knowing where things are helps in a regime,
this objective has something to teach there. The targets come from the dataset's privileged positions and are used
in training only; at evaluation the policy sees images, state and instruction alone, like every other method.

With `tokens` "queries" the action query tokens at a trunk layer regress the same positions instead: the image-only
tokens of both visual controls came to carry more about where things are without the policy succeeding more, while
the oracle, whose positions are a token the queries read, led by 20 points; this asks the positions of the tokens the
action head decodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from capvector.bench.env.features import PRIVILEGED_DIM, PRIVILEGED_KEY, STATE_KEY
from capvector.bench.objectives.tokens import TokenObjective
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.errors import CapvectorError

HAND = slice(0, 3)  # the hand's xyz in observation.state


def relative_positions(privileged: torch.Tensor, state: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, 6): object - hand and goal - hand, in units of `scale` metres."""
    hand = state[:, HAND]
    return torch.cat([privileged[:, 0:3] - hand, privileged[:, 3:6] - hand], dim=1) / scale


class PrivilegedObjective(TokenObjective):
    """Hooks `layer` (default "vision": image-only visual tokens) and regresses object and goal positions relative
    to the hand from every token it reads (`tokens`: the visual tokens or the action queries), by a mean squared
    error."""

    def __init__(self, layer: str = "vision", weight: float = 0.5, scale: float = 0.1, tokens: str = "visual"):
        super().__init__(layer, weight, "privileged objective", tokens=tokens)
        self.scale = scale

    def prepare(self, config: PolicyConfig) -> int:
        return PRIVILEGED_DIM

    def compute(self, features: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        if PRIVILEGED_KEY not in batch:
            raise CapvectorError(
                f"privileged objective: the batch has no '{PRIVILEGED_KEY}'; record the demonstrations with "
                "this version of `capvector demos` (it stores the simulator's object and goal positions)"
            )
        prediction = self.project(features)
        target = relative_positions(
            batch[PRIVILEGED_KEY].to(prediction.device), batch[STATE_KEY].to(prediction.device), self.scale
        )
        return F.mse_loss(prediction, target.unsqueeze(1).expand_as(prediction))
