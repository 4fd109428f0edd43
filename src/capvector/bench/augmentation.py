"""Random shift (DrQ: pad by replicating the border, crop back at a random offset), the image augmentation that
every method trains with.

Spatial Forcing runs its frozen teacher on the augmented images the policy sees, so the teacher's cost is paid on
every step; here the policy shifts its own training images (PolicyConfig.augment_shift), the teacher alignment
objective reads the shifted images where the vision encoder gets them, and the teacher is pretrained on shifted
frames too (its depth and point targets shifted with them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_offsets(count: int, shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(count, 2) integer (row, column) crop offsets in [0, 2 * shift]; `shift` leaves an image in place."""
    return torch.randint(0, 2 * shift + 1, (count, 2), generator=generator)


def shift_images(images: torch.Tensor, offsets: torch.Tensor, shift: int) -> torch.Tensor:
    """Shift each image (N, C, H, W) by its offset (N, 2): replicate-pad by `shift` pixels, crop at the offset.
    Any dtype (uint8 images, float depth); the same offsets move images and their per-pixel targets together."""
    if shift == 0:
        return images
    count, _, height, width = images.shape
    padded = F.pad(images.float(), (shift, shift, shift, shift), mode="replicate").to(images.dtype)
    offsets = offsets.to(images.device)
    rows = (offsets[:, :1] + torch.arange(height, device=images.device))[:, None, :, None]
    cols = (offsets[:, 1:] + torch.arange(width, device=images.device))[:, None, None, :]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[torch.arange(count, device=images.device)[:, None, None, None], channels, rows, cols]


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of (..., C, H, W) shifted by its own random offset of up to `shift` pixels each way."""
    flat = images.flatten(0, -4)
    return shift_images(flat, shift_offsets(len(flat), shift, generator), shift).view_as(images)
