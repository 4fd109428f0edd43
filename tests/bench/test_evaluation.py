import numpy as np
import pytest

from capvector.bench.env.evaluation import (
    CAPTION_PIXELS,
    COLUMN_GAP,
    GIF_STRIDE,
    ExpertPolicy,
    enlarge,
    evaluate,
    evaluate_many,
    evaluation_jobs,
    side_by_side,
    task_result,
)
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


class HalfSpeedExpert(ExpertPolicy):
    """The scripted expert's moves at half their size: slower, and on a short cap it fails some placements."""

    def predict_chunk(self, observation):
        chunk = super().predict_chunk(observation)
        chunk[:, :3] *= 0.5
        return chunk


class ShakyExpert(ExpertPolicy):
    """The scripted expert's moves with torch-drawn noise, as a noisy oracle draws its positions' noise."""

    def predict_chunk(self, observation):
        import torch

        return super().predict_chunk(observation) + 0.8 * torch.randn(1, 4).numpy()


def test_a_policy_that_draws_repeats_each_episode_and_differs_between_them():
    settings = {"episodes": 3, "workers": 1, "image_size": 32, "max_steps": 60, "seed": 2}
    steps = [[row[4] for row in next(evaluate_many([ShakyExpert], "reach-v3", **settings))[2]] for _ in "ab"]
    assert steps[0] == steps[1]  # torch seeded by the placement at every episode
    expert = [row[4] for _, _, rows in evaluate_many([ExpertPolicy], "reach-v3", **settings) for row in rows]
    assert steps[0] != expert  # and the noise does move it


def test_evaluate_many_gives_each_policy_what_its_own_evaluation_gives():
    settings = {"episodes": 2, "workers": 1, "image_size": 32, "max_steps": 60}
    assert evaluation_jobs(2, ["reach-v3"], 2, workers=1) == [([0, 1], "reach-v3", [0, 1])]  # one simulator for both
    together = [
        task_result(task, rows)
        for _, task, rows in evaluate_many([HalfSpeedExpert, ExpertPolicy], "reach-v3", **settings)
    ]
    alone = [evaluate(policy, "reach-v3", **settings).tasks[0] for policy in (HalfSpeedExpert, ExpertPolicy)]
    assert together == alone
    assert together[0].mean_steps > together[1].mean_steps  # the two are told apart


def test_first_episode_moves_to_other_placements_of_the_same_seed():
    settings = {"episodes": 2, "workers": 2, "image_size": 32, "max_steps": 40, "seed": 5}

    def rows(first):
        return next(rows for _, _, rows in evaluate_many([ExpertPolicy], "reach-v3", first_episode=first, **settings))

    assert [row[1] for row in rows(3)] == [3, 4] and [row[1] for row in rows(0)] == [0, 1]
    assert [row[2] for row in rows(3)] == [eval_placement_seed(5, 3), eval_placement_seed(5, 4)]
    # the same placements as episodes 3 and 4 of an evaluation from the first episode
    longer = next(rows for _, _, rows in evaluate_many([ExpertPolicy], "reach-v3", **(settings | {"episodes": 5})))
    assert [row[:5] for row in rows(3)] == [row[:5] for row in longer[3:]]


def test_jobs_split_episodes_only_when_policies_and_tasks_are_too_few():
    assert evaluation_jobs(1, ["a"], 4, workers=2) == [([0], "a", [0, 2]), ([0], "a", [1, 3])]
    jobs = evaluation_jobs(10, ["a", "b"], 3, workers=2)
    assert len(jobs) == 4 and all(episodes == [0, 1, 2] for _, _, episodes in jobs)
    assert evaluation_jobs(10, ["a", "b"], 3, workers=1) == [(list(range(10)), t, [0, 1, 2]) for t in "ab"]
    assert sorted((i, task) for indices, task, _ in jobs for i in indices) == [(i, t) for i in range(10) for t in "ab"]
    assert evaluation_jobs(0, ["a"], 3, workers=2) == evaluation_jobs(0, ["a"], 3, workers=1) == []


def test_side_by_side_aligns_the_episodes_and_holds_the_shorter_ones_last_frame():
    rng = np.random.default_rng(0)
    short = [rng.integers(0, 255, (3, 32, 64), dtype=np.uint8) for _ in range(3)]
    long = [rng.integers(0, 255, (3, 32, 64), dtype=np.uint8) for _ in range(5)]
    images = side_by_side([short, long], ["(a) sft: success in 10 steps", "(b) aux: fail"])
    assert len(images) == 5
    camera = enlarge(short[0]).shape[0]  # a camera view, enlarged; the two cameras stacked in a column
    assert camera == 192 and images[0].shape == (CAPTION_PIXELS + 2 * camera, 2 * camera + COLUMN_GAP, 3)

    def column(image, k):
        return image[CAPTION_PIXELS:, k * (camera + COLUMN_GAP) : k * (camera + COLUMN_GAP) + camera]

    def stacked(frame):
        return np.concatenate(np.split(enlarge(frame), 2, axis=1))

    for t in range(5):
        assert np.array_equal(column(images[t], 0), stacked(short[min(t, 2)]))
        assert np.array_equal(column(images[t], 1), stacked(long[t]))
    captions = [images[0][:CAPTION_PIXELS, k * (camera + COLUMN_GAP) :][:, :camera] for k in (0, 1)]
    assert all((c < 128).any() for c in captions) and not np.array_equal(*captions)  # each column its own label
    assert (images[0][:, camera : camera + COLUMN_GAP] == 255).all()
    with pytest.raises(CapvectorError, match="one label per episode"):
        side_by_side([short], ["a", "b"])
