import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from capvector.bench.env.camera import depth_to_points
from capvector.bench.env.dataset import DemoDataset
from capvector.bench.env.features import PIXELS_KEY, PRIVILEGED_KEY
from capvector.bench.env.sim import DECOY_SEED_OFFSET, PLACEMENTS, SimEnv
from capvector.bench.experiment.headroom import (
    AUX_ARMS,
    PROBE_EPISODES,
    REGIMES,
    Evaluation,
    check_config,
    evaluation_batches,
    final_evaluations,
    headroom,
    run_name,
)
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.policy.modeling_policy import Policy
from capvector.errors import CapvectorError
from capvector.training.config import load_config
from policy_batches import synthetic_batch

TASK = "button-press-topdown-v3"


def placement_box(placement):
    env = SimEnv(TASK, image_size=32, placement=placement)
    space = env.env._random_reset_space
    box = space.low.copy(), space.high.copy()
    env.close()
    return box


def test_wide_placements_scale_the_planar_spans_about_their_centres():
    (low, high), (wide_low, wide_high) = placement_box("default"), placement_box("wide")
    scale = PLACEMENTS["wide"]
    assert np.allclose(wide_high[:2] - wide_low[:2], scale * (high[:2] - low[:2]))
    assert np.allclose(wide_high + wide_low, high + low)  # same centre
    assert np.allclose(wide_high[2], high[2]) and np.allclose(wide_low[2], low[2])  # heights untouched
    with pytest.raises(CapvectorError, match="unknown placement range"):
        SimEnv(TASK, placement="huge")


def test_privileged_positions_are_the_simulators_and_the_decoy_takes_another_placements():
    env, decoy = SimEnv(TASK, image_size=32), SimEnv(TASK, image_size=32, decoy=True)
    env.reset(123)
    truth = env.observe(depth=False)[PRIVILEGED_KEY]
    assert np.allclose(truth[:3], env.obs[4:7]) and np.allclose(truth[3:], env.obs[36:39])
    env.reset(123 + DECOY_SEED_OFFSET)
    other = env.observe(depth=False)[PRIVILEGED_KEY]
    decoy.reset(123)
    assert np.allclose(decoy.obs, env.obs) is False  # the decoy env plays the real placement...
    assert np.allclose(decoy.observe(depth=False)[PRIVILEGED_KEY], other, atol=1e-5)  # ...and shows the other one
    env.close()
    decoy.close()


def test_recorded_pixels_land_on_the_object_in_the_scene_camera():
    """The surface seen at the object's projection (PIXELS_KEY), lifted back to the world by the depth map and the
    camera pose, is the object, in every episode's view; the decoy keeps the true pixels (they teach, they are not
    an oracle's input)."""
    env = SimEnv(TASK, image_size=64, variant="random_view")
    for seed in range(4):
        env.reset(seed)
        frame = env.observe(depth=True)
        u, v, z = frame[PIXELS_KEY][:3]  # scene camera, object
        assert 0 <= round(u) < 64 and 0 <= round(v) < 64 and z > 0
        seen = depth_to_points(frame["observation.depth.scene"][0], env.camera_fovy["scene"])[round(v), round(u)]
        position, rotation = env.camera_pose("scene")
        distance = np.linalg.norm(position + rotation @ seen - frame[PRIVILEGED_KEY][:3])
        assert distance < 0.06, (seed, distance)  # the box's face, within its size of its centre
    env.close()
    env, decoy = SimEnv(TASK, image_size=64), SimEnv(TASK, image_size=64, decoy=True)
    env.reset(0)
    decoy.reset(0)
    assert np.allclose(decoy.observe(depth=False)[PIXELS_KEY], env.observe(depth=False)[PIXELS_KEY], atol=1e-4)
    env.close()
    decoy.close()


def test_an_oracle_reads_the_privileged_token_and_names_it_when_missing():
    config = PolicyConfig(
        image_size=32,
        stem_channels=(8, 8),
        dim=16,
        heads=2,
        trunk_layers=1,
        privileged_dim=6,
        privileged_q01=[-1.0] * 6,
        privileged_q99=[1.0] * 6,
    )
    policy = Policy(config).eval()
    batch = {
        "observation.images.scene": torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
        "observation.images.wrist": torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
        "observation.state": torch.zeros(2, 4),
        "instruction": ["press the button from the top"] * 2,
        PRIVILEGED_KEY: torch.tensor([[0.1] * 6, [-0.5] * 6]),
    }
    chunk = policy.predict_normalized(batch)
    assert not torch.allclose(chunk[0], chunk[1])  # only the privileged input differs
    del batch[PRIVILEGED_KEY]
    with pytest.raises(CapvectorError, match="observation.privileged"):
        policy.predict_normalized(batch)
    with pytest.raises(CapvectorError, match="privileged_q01 has 0 values, expected 6"):
        PolicyConfig(privileged_dim=6)


def test_headroom_miniature_runs_every_stage_and_reuses_them(tmp_path, capsys):
    report = headroom("test", out_dir=tmp_path)
    config = REGIMES["test"]
    results = json.loads((report / "results.json").read_text())
    assert set(results["budgets"]) == {str(b) for b in config.budgets}
    row = results["budgets"][str(config.budgets[-1])]
    assert row["oracle_minus_sft"][1] <= row["oracle_minus_sft"][0] <= row["oracle_minus_sft"][2]
    assert "Decoy test" in (report / "report.md").read_text()
    # the control's weight was chosen on validation placements with the first seed, then trained with every seed
    control = results["control"]
    assert control["weight"] in config.control_weights and control["seeds"] == [0]
    assert set(control["validation"]) == {"0.1", "0.2"}
    validation = json.loads((tmp_path / "test" / "evaluate" / "validation1_per_seed.json").read_text())
    assert set(validation) == {
        "control_w0.1/seed0/step4",
        "control_w0.2/seed0/step4",
        "control_queries_w0.3/seed0/step4",
        "teacher_w0.5/seed0/step4",
    }
    trained = {p.parent.name + "/" + p.name for p in (tmp_path / "test" / "train").glob("control_w*/seed*")}
    other = run_name(config, "control", 0.3 - control["weight"])
    assert trained == {
        f"{run_name(config, 'control', control['weight'])}/seed0",
        f"{run_name(config, 'control', control['weight'])}/seed1",
        f"{other}/seed0",
    }
    # the teacher arm: its teacher pretrained in the run folder on another task's frames in this regime's look and
    # placements, for the policy's image size; its figures in the report, its policies aligned with that teacher
    teacher = results["teacher"]
    figures = teacher["pretraining"]
    assert teacher["weight"] == 0.5 and figures["frames"]["validation"] > 0  # (a held-out share can be negative)
    assert all(math.isfinite(v) for v in [*figures["validation"].values(), figures["probe"]["share"]])
    frames = DemoDataset(tmp_path / "test" / "demos-teacher", depth=True)
    assert {e["name"] for e in frames.episodes} == {"reach-v3"} and frames.generation["placement"] == config.placement
    assert json.loads((tmp_path / "test" / "teacher" / "config.json").read_text())["image_size"] == config.image_size
    trained_with = load_config(tmp_path / "test" / "train" / "teacher_w0.5" / "seed1" / "config.yaml")
    assert trained_with.auxiliary_args["teacher"] == str(tmp_path.resolve() / "test" / "teacher")
    assert "teacher_minus_sft" in row and "The teacher, on" in (report / "report.md").read_text()
    assert (
        "control_minus_sft" in row
        and f"Weight {control['weight']:g}, chosen on validation" in (report / "report.md").read_text()
    )
    # the probe of the visual tokens: every arm's policy of every seed and an untrained one, each an R^2
    probe = json.loads((tmp_path / "test" / "evaluate" / "probe.json").read_text())
    assert len(probe) == len(config.arms) * len(config.seeds) + 1 and all(r2 <= 1 for r2 in probe.values())
    assert set(results["probe"]) == {"steps", "untrained", *config.arms}
    # and the same of the action query tokens at the hook layer, the oracle's read with its positions
    queries = json.loads((tmp_path / "test" / "evaluate" / "probe_queries.json").read_text())
    assert set(queries) == set(probe) and all(r2 <= 1 for r2 in queries.values())
    assert set(results["probe_queries"]) == set(results["probe"]) and queries != probe
    assert "What reaches the action path" in (report / "report.md").read_text()
    # the noisy oracle: an oracle trained (and evaluated) with noise of oracle_noise metres on its positions
    noisy = load_config(tmp_path / "test" / "train" / f"oracle_noise{config.oracle_noise:g}" / "seed1" / "config.yaml")
    assert noisy.policy_args["privileged_noise"] == config.oracle_noise and noisy.policy_args["privileged_dim"] == 6
    assert "noisy_oracle_minus_sft" in row and "of Gaussian noise per coordinate" in (report / "report.md").read_text()
    # the biased oracle: the same size of error, a fixed function of the scene
    biased = load_config(tmp_path / "test" / "train" / f"oracle_bias{config.oracle_noise:g}" / "seed1" / "config.yaml")
    assert biased.policy_args["privileged_bias"] == config.oracle_noise and "privileged_noise" not in biased.policy_args
    assert "biased_oracle_minus_sft" in row and "of systematic error" in (report / "report.md").read_text()
    # the control on the action path trains the action queries at the policy's hook layer
    queries = load_config(tmp_path / "test" / "train" / "control_queries_w0.3" / "seed1" / "config.yaml")
    assert queries.auxiliary_args == {"tokens": "queries", "layer": "", "weight": 0.3}
    assert "control_queries_minus_sft" in row and "on the action path" in (report / "report.md").read_text()
    assert "What the image-only visual tokens carry" in (report / "report.md").read_text()
    held_out = DemoDataset(tmp_path / "test" / "demos-held-out", depth=False)
    assert len(held_out.episodes) == PROBE_EPISODES * len(config.tasks)
    dataset = DemoDataset(tmp_path / "test" / "demos", depth=False)
    assert not {e["placement_seed"] for e in dataset.episodes} & {e["placement_seed"] for e in held_out.episodes}
    assert PRIVILEGED_KEY in dataset.privileged and dataset.generation["placement"] == "wide"
    positions = dataset.privileged[PRIVILEGED_KEY]
    assert np.allclose(positions[0, :3], positions[1, :3], atol=0.02)  # the box does not move
    capsys.readouterr()
    headroom("test", out_dir=tmp_path)  # everything cached: no training, no evaluation
    assert not {"evaluated", "probing"} & set(capsys.readouterr().out.split())
    with pytest.raises(CapvectorError, match="unknown headroom regime"):
        headroom("nope", out_dir=tmp_path)


def test_each_seed_is_evaluated_on_placements_of_its_own_and_every_arm_of_a_seed_on_the_same():
    config = dataclasses.replace(REGIMES["views-confirm-shift"], seeds=[0, 1, 2])
    batches = evaluation_batches(config, final_evaluations(config, {"sft": "sft", "oracle": "oracle"}))
    firsts = {
        seed: {first for (_, first), batch in batches.items() if any(e.seed == seed for e in batch)}
        for seed in config.seeds
    }
    assert firsts == {0: {0}, 1: {20}, 2: {40}}  # eval_episodes 20 each, disjoint
    for (decoy, first), batch in batches.items():
        assert {e.seed for e in batch} == {first // config.eval_episodes} and {e.decoy for e in batch} == {decoy}
    assert Evaluation("oracle", 1, 2000, decoy=True) in batches[(True, 20)]  # the decoy on the seed's placements
    assert {e.run for e in batches[(False, 20)]} == {"sft", "oracle"}  # paired by (seed, task)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"control_weights": []}, "must be positive"),
        ({"control_weights": [0.1, -1.0]}, "must be positive"),
        ({"teacher_weights": [0.0]}, "teacher_weights \\[0.0\\] must be positive"),
        ({"teacher": {"dataset": "elsewhere"}}, "teacher fields \\['dataset'\\] are not TeacherPretraining settings"),
        ({"selection_seeds": 0}, "selection_seeds"),
        ({"oracle_noise": 0.0}, "oracle_noise 0.0 must be a positive number of metres"),
        ({"validation_seed": 0}, "validation_seed must differ"),
        ({"variant": "mars"}, "unknown variant 'mars'; valid: default, new_env, random_view"),
    ],
)
def test_a_control_sweep_or_regime_that_cannot_run_is_refused(change, message):
    with pytest.raises(CapvectorError, match=message):
        check_config(dataclasses.replace(REGIMES["test"], **change))


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_every_named_regime_can_run_and_builds_its_policy(regime):
    config = REGIMES[regime]
    check_config(config)
    policy = PolicyConfig(image_size=config.image_size, **config.policy)
    assert policy.image_size == config.image_size


def test_the_positive_control_regresses_positions_relative_to_the_hand_from_image_only_tokens():
    from capvector.bench.objectives.privileged import PrivilegedObjective, relative_positions

    state = torch.tensor([[0.1, 0.6, 0.2, 1.0]])
    facts = torch.tensor([[0.2, 0.8, 0.1, 0.0, 0.9, 0.3]])
    assert torch.allclose(relative_positions(facts, state, 0.1), torch.tensor([[1.0, 2.0, -1.0, -1.0, 3.0, 1.0]]))

    torch.manual_seed(0)
    policy = Policy(PolicyConfig(image_size=32, stem_channels=(8, 8), dim=16, heads=2, trunk_layers=1))
    objective = PrivilegedObjective()
    objective.attach(policy)
    batch = synthetic_batch(config=policy.config)
    policy(batch)
    loss = objective(batch)
    loss.backward()
    assert loss.item() > 0
    assert policy.vision.stem[0].weight.grad.abs().sum() > 0  # it teaches the vision encoder...
    assert policy.trunk.layers[0].qkv.weight.grad is None  # ...and nothing after it
    policy(batch)
    del batch[PRIVILEGED_KEY]
    with pytest.raises(CapvectorError, match="observation.privileged"):
        objective(batch)


def test_the_control_on_the_action_path_teaches_the_queries_at_the_hook_layer_and_nothing_after_it():
    from capvector.bench.objectives.privileged import PrivilegedObjective

    torch.manual_seed(0)
    policy = Policy(PolicyConfig(image_size=32, stem_channels=(8, 8), dim=16, heads=2, trunk_layers=3))
    objective = PrivilegedObjective(layer="", tokens="queries")
    objective.attach(policy)
    assert objective.layer == policy.config.hook_layer == "trunk.layers.1"
    batch = synthetic_batch(batch_size=2, config=policy.config)
    policy(batch)
    objective(batch).backward()
    assert policy.action_queries.grad.abs().sum() > 0  # the queries' own embeddings learn it...
    assert policy.trunk.layers[1].mlp[2].weight.grad.abs().sum() > 0  # ...through the hooked layer...
    assert policy.trunk.layers[2].qkv.weight.grad is None  # ...and nothing after it
    tokens = objective.project(torch.randn(2, 10 + 2 * 16 + 1 + 8, 16))  # words, patches, state, queries
    assert tokens.shape == (2, 8, 6)  # one prediction per action query
    with pytest.raises(CapvectorError, match="action query tokens first appear in the trunk"):
        PrivilegedObjective(layer="vision", tokens="queries")
    with pytest.raises(CapvectorError, match="tokens 'patches' is not one of visual, queries"):
        PrivilegedObjective(tokens="patches")


def test_the_cli_runs_the_regimes_arms_unless_told_otherwise(tmp_path, capsys):
    from capvector.cli import build_parser, main

    assert "control" in REGIMES["test"].arms
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["headroom"]._actions}
    assert {f"{arm}_weights" for arm in AUX_ARMS} <= flags  # a flag per auxiliary arm
    assert main(["headroom", "--regime", "test", "--out", str(tmp_path)]) == 0
    assert "Positive control" in capsys.readouterr().out  # the regime's arms, the control among them
    assert main(["headroom", "--regime", "test", "--out", str(tmp_path), "--arms", "sft,oracle"]) == 0
    assert "Positive control" not in capsys.readouterr().out  # cached: the report of the arms asked for
