"""The Spatial Forcing analog with a real frozen teacher: align the policy's visual tokens with a pretrained 3D
model's patch features (Spatial Forcing, vla-scripts/finetune_align.py, with VGGT as the teacher).

Layer. By default the tokens are read at "vision", the vision encoder's output: each token there has seen only
its camera's image, before the trunk mixes in the state and the instruction. The teacher sees only the image too,
so the target is something the token can match from what it has; a trunk token could instead match it through
the hand position in the state token (which the normalized target still partly tracks), teaching nothing about
the image. `layer` can name a trunk layer (its visual tokens are used) for the choice on validation placements.

Each step the frozen teacher runs on the very images the vision encoder got (shifted, PolicyConfig.augment_shift),
read by a hook on the encoder's input: the online cost Spatial Forcing pays, and CapVector saves. The tokens go
through LayerNorm-Linear-GELU-Linear and are aligned by `1 - cos` with the normalized teacher features (per-patch
mean removed, channels standardized: capvector.bench.teacher.modeling_teacher).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from capvector.bench.objectives.spatial import cosine_alignment_loss
from capvector.bench.objectives.tokens import TokenObjective
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.teacher.modeling_teacher import Teacher
from capvector.errors import CapvectorError


class TeacherAlignment(TokenObjective):
    """Aligns the visual tokens at `layer` with a frozen teacher's normalized patch features by cosine."""

    def __init__(self, teacher: Teacher | str | Path, layer: str = "vision", weight: float = 0.5):
        super().__init__(layer, weight, "teacher alignment", hidden_ratio=2)
        teacher = teacher if isinstance(teacher, Teacher) else Teacher.from_pretrained(teacher)
        self.teacher = teacher.requires_grad_(False).eval()  # frozen: never in the optimizer, never updated
        self._images: torch.Tensor | None = None
        self._image_handle: RemovableHandle | None = None

    def prepare(self, config: PolicyConfig) -> int:
        self.teacher.config.check_fits(config.cameras, config.image_size, config.patch_grid, "alignment")
        return self.teacher.config.dim

    def attach(self, policy: nn.Module) -> None:
        super().attach(policy)
        self._image_handle = policy.get_submodule("vision").register_forward_hook(self._capture_images)

    def detach(self) -> None:
        super().detach()
        if self._image_handle is not None:
            self._image_handle.remove()
            self._image_handle = None

    def _capture_images(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._images = inputs[0]

    def train(self, mode: bool = True) -> TeacherAlignment:
        super().train(mode)
        self.teacher.eval()  # the teacher stays in inference mode while the projector trains
        return self

    def compute(self, features: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        if self._images is None or self.projector is None:
            raise CapvectorError("teacher alignment: attach(policy) and run the policy before the objective")
        images, self._images = self._images, None
        with torch.no_grad():
            target = self.teacher.normalized(images)
        return cosine_alignment_loss(self.project(features), target)
