import numpy as np
import pytest

from capvector.bench.env.evaluation import GIF_STRIDE, ExpertPolicy, evaluate
from capvector.bench.env.sim import CONTROL_HZ, EVAL_SEED_OFFSET, MAX_ATTEMPTS, demo_placement_seed, eval_placement_seed
from capvector.bench.statistics import wilson_interval
from capvector.errors import CapvectorError


def test_scripted_expert_succeeds_through_the_harness(tmp_path):
    result = evaluate(ExpertPolicy, ["reach-v3", "button-press-v3"], episodes=4, seed=0, workers=2, gif_dir=tmp_path)
    assert result.success_rate >= 0.875
    assert [t.task for t in result.tasks] == ["reach-v3", "button-press-v3"]
    assert all(t.ci_low < t.success_rate <= t.ci_high for t in result.tasks)
    assert all(s >= EVAL_SEED_OFFSET for t in result.tasks for s in t.placement_seeds)
    assert len(result.gifs) == 2 and all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in result.gifs)
    assert result.to_dict()["tasks"][0]["episodes"] == 4
    from PIL import Image

    gif = Image.open(tmp_path / result.gifs[0].split("/")[-1])
    # real time: a frame every GIF_STRIDE simulator steps, shown for those steps' 50 ms; 3x the camera images
    assert gif.info["duration"] == 1000 * GIF_STRIDE // CONTROL_HZ and gif.size == (2 * 3 * 64, 3 * 64)
    assert gif.n_frames >= 2


def test_the_simulator_runs_at_the_rate_the_gifs_assume():
    from capvector.bench.env.sim import SimEnv

    env = SimEnv("reach-v3", image_size=32)
    assert 1.0 / env.env.dt == pytest.approx(CONTROL_HZ)
    env.close()


def test_wilson_interval():
    low, high = wilson_interval(0, 10)
    assert low == 0 and abs(high - 0.2775) < 1e-3
    low, high = wilson_interval(10, 20)
    assert abs(low - 0.2993) < 1e-3 and abs(high - 0.7007) < 1e-3


def test_evaluation_placements_never_used_for_demonstrations():
    largest_demo_seed = demo_placement_seed(999, 9_999, MAX_ATTEMPTS - 1)
    assert eval_placement_seed(0, 0) > largest_demo_seed


class WrongShape:
    def reset(self):
        pass

    def predict_chunk(self, observation):
        assert observation["observation.images.scene"].shape == (3, 64, 64)
        assert "observation.depth.scene" not in observation
        return np.zeros((8, 3))


class Config:
    action_dim = 7


class WrongActionSpace(WrongShape):
    config = Config()


def test_mismatched_policies_are_explained():
    with pytest.raises(CapvectorError, match=r"shape \(8, 3\)"):
        evaluate(WrongShape, ["reach-v3"], episodes=1, workers=1)
    with pytest.raises(CapvectorError, match="7-d actions"):
        evaluate(WrongActionSpace, ["reach-v3"], episodes=1, workers=1)
