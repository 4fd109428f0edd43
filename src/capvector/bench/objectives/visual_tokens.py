"""What every auxiliary objective on the policy's visual tokens shares: which tokens it reads, and its projector.

`layer` "vision" is the vision encoder's output: visual tokens only, each of which has seen only its camera's image,
before the trunk mixes in the state and the instruction. A trunk layer's output holds the whole sequence, whose
visual tokens are picked out (Policy.visual_token_slice). The projector, LayerNorm-Linear-GELU-Linear as in Spatial
Forcing, maps each token to the objective's target; it trains with the policy and is never saved with it.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from capvector.bench.policy.configuration_policy import PolicyConfig, policy_config
from capvector.training.auxiliary import AuxiliaryObjective


class VisualTokenObjective(AuxiliaryObjective):
    """Base class: subclasses implement `prepare` (check the policy, keep what `compute` needs, give the projector's
    output width) and `compute`, in which `project(features)` gives the projected visual tokens."""

    def __init__(self, layer: str, weight: float, name: str, hidden_ratio: int = 1):
        super().__init__(layer, weight)
        self.name, self.hidden_ratio = name, hidden_ratio
        self.projector: nn.Module | None = None
        self._visual: slice | None = None

    def prepare(self, config: PolicyConfig) -> int:
        raise NotImplementedError

    def attach(self, policy: nn.Module) -> None:
        config = policy_config(policy, self.name)
        outputs = self.prepare(config)
        if self.projector is None:
            hidden = self.hidden_ratio * config.dim
            self.projector = nn.Sequential(
                nn.LayerNorm(config.dim), nn.Linear(config.dim, hidden), nn.GELU(), nn.Linear(hidden, outputs)
            ).to(next(policy.parameters()).device)
        super().attach(policy)
        self._visual = None if self.layer == "vision" else cast(slice, policy.visual_token_slice)

    def project(self, features: Any) -> torch.Tensor:
        """(B, visual tokens, outputs): the hooked layer's visual tokens through the projector."""
        assert self.projector is not None, "attach() builds the projector"
        return self.projector(features if self._visual is None else features[:, self._visual])
