"""The localization control's per-patch targets: offsets and heat follow the recorded pixels, patch by patch."""

import pytest
import torch

from capvector.bench.env.features import PIXELS_KEY
from capvector.bench.objectives.localization import LocalizationObjective, patch_centres, patch_targets
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.policy.modeling_policy import Policy
from capvector.errors import CapvectorError

SIZE, GRID = 32, 4  # patches of 8 pixels


def pixels(scene: list[tuple[float, float, float]], wrist: list[tuple[float, float, float]]) -> torch.Tensor:
    """PIXELS_KEY of one frame: (u, v, z) of object and goal in the scene camera, then in the wrist camera."""
    return torch.tensor([value for point in scene + wrist for value in point]).unsqueeze(0)


def test_patch_centres_run_over_rows_of_patches():
    centres = patch_centres(SIZE, GRID)
    assert centres[0].tolist() == [3.5, 3.5] and centres[1].tolist() == [11.5, 3.5]  # (u, v): along a row first
    assert centres[GRID].tolist() == [3.5, 11.5] and centres[-1].tolist() == [27.5, 27.5]


def test_targets_point_from_each_patch_to_the_projection():
    # the object at the centre of the scene camera's patch (row 1, column 2); the goal behind the wrist camera
    frame = pixels([(19.5, 11.5, 1.0), (0.0, 0.0, 1.0)], [(16.0, 16.0, 0.5), (5.0, 5.0, -0.1)])
    target, mask = patch_targets(frame, [0, 1], SIZE, GRID)
    assert target.shape == mask.shape == (1, 2 * GRID * GRID, 6)
    at_object = 1 * GRID + 2
    assert target[0, at_object, :3].tolist() == pytest.approx([0.0, 0.0, 1.0])  # offset 0, heat 1
    left = at_object - 1  # one patch (8 pixels = a quarter of the image) to the left of the object
    assert target[0, left, :2].tolist() == pytest.approx([0.25, 0.0])
    assert target[0, left, 2].item() == pytest.approx(torch.exp(torch.tensor(-0.5)).item())  # one patch: exp(-1/2)
    wrist_goal = target[0, GRID * GRID :, 3:]
    assert (wrist_goal[:, 2] == 0).all() and not mask[0, GRID * GRID :, 3:5].any()  # behind: no offset, no heat
    assert mask[0, :, 2].all() and mask[0, :, 5].all()  # heat always taught
    # the policy's cameras pick their blocks of PIXELS_KEY: the wrist alone
    wrist_only, _ = patch_targets(frame, [1], SIZE, GRID)
    assert torch.equal(wrist_only, target[:, GRID * GRID :])


def test_the_objective_trains_on_the_vision_tokens_and_names_a_missing_key():
    config = PolicyConfig(image_size=SIZE, dim=16, heads=2, trunk_layers=1, mlp_ratio=1, stem_channels=(8, 8))
    policy = Policy(config)
    objective = LocalizationObjective(weight=0.3)
    objective.attach(policy)
    frame = pixels([(19.5, 11.5, 1.0), (0.0, 0.0, 1.0)], [(16.0, 16.0, 0.5), (5.0, 5.0, -0.1)])
    images = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8)
    batch = {"observation.images.scene": images, "observation.images.wrist": images, PIXELS_KEY: frame}
    policy.vision(policy._images(batch))
    loss = objective(batch)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in objective.parameters())
    assert policy.vision.stem[0].weight.grad is not None  # the visual tokens learn from it
    policy.vision(policy._images(batch))
    with pytest.raises(CapvectorError, match="observation.privileged_pixels"):
        objective({k: v for k, v in batch.items() if k != PIXELS_KEY})
