"""Auxiliary objectives that read an intermediate layer of the policy through a forward hook.

An auxiliary objective (Spatial Forcing and the like) owns a projector that is trained together with the
policy and thrown away when the policy is saved: its parameters live here, never in the policy's
state dict, so a saved auxiliary-SFT checkpoint has exactly the keys of a plain SFT checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from capvector.errors import CapvectorError


class AuxiliaryObjective(nn.Module):
    """Base class: subclasses build their projector in __init__ and implement `compute`.

    Usage inside a training loop::

        objective.attach(policy)          # once
        losses = policy(batch)            # the hook captures `layer`'s output
        aux = objective(batch)            # unweighted auxiliary loss
        loss = losses["action"] + objective.weight * aux
    """

    def __init__(self, layer: str, weight: float):
        super().__init__()
        self.layer = layer
        self.weight = weight
        self._features: Any = None
        self._handle: RemovableHandle | None = None

    def attach(self, policy: nn.Module) -> None:
        try:
            module = policy.get_submodule(self.layer)
        except AttributeError as error:
            names = ", ".join(name for name, _ in policy.named_modules() if name) or "(none)"
            raise CapvectorError(
                f"auxiliary objective: the policy has no module '{self.layer}'; set `layer` to one of: {names}"
            ) from error
        self.detach()
        self._handle = module.register_forward_hook(self._capture)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _capture(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._features = output

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if self._features is None:
            raise CapvectorError(
                f"auxiliary objective: layer '{self.layer}' produced no output; call attach(policy) and run the "
                "policy's forward pass before the objective"
            )
        features, self._features = self._features, None
        return self.compute(features, batch)

    def compute(self, features: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        """The unweighted auxiliary loss from the hooked layer's output and the batch."""
        raise NotImplementedError
