"""What every auxiliary objective on the policy's tokens shares: which tokens it reads, and its projector.

`tokens` "visual" (the default) reads the visual tokens. At `layer` "vision", the vision encoder's output, each of
them has seen only its camera's image, before the trunk mixes in the state and the instruction; at a trunk layer they
are picked out of the whole sequence (Policy.visual_token_slice). `tokens` "queries" reads the action query tokens
at a trunk layer (Policy.action_query_slice): the tokens the action head decodes, so what the objective teaches them
lies on the path to the actions, where the headroom oracle's extra token is read. An empty `layer` is the policy's
hook_layer (about 2/3 of the trunk). The projector, LayerNorm-Linear-GELU-Linear as in Spatial Forcing, maps each
token to the objective's target; it trains with the policy and is never saved with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from capvector.bench.policy.configuration_policy import PolicyConfig, policy_config
from capvector.errors import CapvectorError
from capvector.training.auxiliary import AuxiliaryObjective

TOKENS = ("visual", "queries")


class TokenObjective(AuxiliaryObjective):
    """Base class: subclasses implement `prepare` (check the policy, keep what `compute` needs, give the projector's
    output width) and `compute`, in which `project(features)` gives the projected tokens (B, tokens, outputs)."""

    def __init__(self, layer: str, weight: float, name: str, hidden_ratio: int = 1, tokens: str = "visual"):
        super().__init__(layer, weight)
        if tokens not in TOKENS:
            raise CapvectorError(f"{name}: tokens {tokens!r} is not one of {', '.join(TOKENS)}")
        if tokens == "queries" and layer == "vision":
            raise CapvectorError(
                f"{name}: the action query tokens first appear in the trunk; set layer to a trunk layer "
                "(e.g. trunk.layers.1) or leave it empty for the policy's hook_layer"
            )
        self.name, self.hidden_ratio, self.tokens = name, hidden_ratio, tokens
        self.projector: nn.Module | None = None
        self._picked: slice | None = None

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
        self.layer = self.layer or config.hook_layer
        super().attach(policy)
        if self.layer == "vision":
            self._picked = None  # the vision encoder's output holds the visual tokens alone
        else:
            self._picked = getattr(policy, "action_query_slice" if self.tokens == "queries" else "visual_token_slice")

    def project(self, features: Any) -> torch.Tensor:
        """(B, tokens read, outputs): the hooked layer's tokens through the projector."""
        assert self.projector is not None, "attach() builds the projector"
        return self.projector(features if self._picked is None else features[:, self._picked])
