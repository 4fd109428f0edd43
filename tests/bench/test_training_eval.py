"""The benchmark around a training run: `demos` and `evaluate` report each task as it finishes, success rates
during training (recipe.evaluate_success as the engine's eval hook), and a trained policy folder that runs on its
own."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil

import numpy as np
import pytest
import torch

from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.policy.modeling_policy import TOKENIZER_NAME, Policy, tokenize
from capvector.bench.recipe import load_trained, plain_copy
from capvector.cli import main
from capvector.errors import CapvectorError
from capvector.training.config import TrainConfig
from capvector.training.engine import train
from capvector.training.metrics import METRICS_FILE

TASKS = ["reach-v3", "button-press-v3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`capvector demos` of one episode per task (32 px, what it printed), and a tiny policy trained 3 steps on them
    and evaluated on reach after step 2 (a building simulator dominates: the fewer, the faster)."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "demos"
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        arguments = ["--tasks", ",".join(TASKS), "--episodes", "1", "--image-size", "32", "--workers", "1"]
        assert main(["demos", "-o", str(data), *arguments]) == 0
    config = TrainConfig(
        policy="capvector.bench.recipe:policy",
        policy_args={"dataset": str(data), "dim": 32, "heads": 2, "trunk_layers": 1, "stem_channels": [8, 8, 8]},
        dataset="capvector.bench.recipe:dataset",
        dataset_args={"root": str(data), "depth": False},
        out_dir=str(root / "run"),
        steps=3,
        batch_size=8,
        checkpoint_every=0,
        log_every=1,
        progress=False,
        tensorboard=False,
        eval="capvector.bench.recipe:evaluate_success",
        eval_args={"tasks": TASKS[0], "episodes": 1, "max_steps": 16},
        eval_every=2,
    )
    return train(config), data, printed.getvalue()


def test_demos_report_each_task_as_it_is_recorded(trained):
    _, _, printed = trained
    for task in TASKS:
        assert f"{task}: 1 episodes recorded (" in printed


def test_evaluate_reports_each_task_as_it_finishes(capsys):
    arguments = ["--tasks", ",".join(TASKS), "--episodes", "1", "--workers", "1", "--image-size", "32"]
    assert main(["evaluate", "--expert", *arguments]) == 0
    captured = capsys.readouterr()
    for task in TASKS:
        assert f"{task}: 1/1 successes (" in captured.err  # progress on stderr
        assert task in captured.out  # the final table on stdout


def test_success_rates_are_in_the_metrics_at_the_evaluation_steps(trained):
    run, _, _ = trained
    lines = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3]
    (evaluation,) = [line for line in lines if "eval/success" in line]
    assert evaluation["step"] == 2 and 0 <= evaluation["eval/success"] <= 1
    assert evaluation[f"eval/success/{TASKS[0]}"] == evaluation["eval/success"] and evaluation["eval/seconds"] > 0


def observation(size: int = 32, seed: int = 0) -> dict:
    generator = np.random.default_rng(seed)
    images = {
        f"observation.images.{c}": generator.integers(0, 256, (3, size, size), np.uint8) for c in ("scene", "wrist")
    }
    state = np.array([0.0, 0.6, 0.2, 0.5], np.float32)
    return images | {"observation.state": state, "instruction": "reach the goal position", "task_index": np.int64(0)}


def test_a_policy_folder_copied_alone_runs_to_the_same_actions(trained, tmp_path):
    run, data, _ = trained
    seen = observation()
    expected = load_trained(run / "policy").predict_chunk(seen)
    alone = shutil.copytree(run / "policy", tmp_path / "elsewhere" / "policy")
    shutil.rmtree(run.parent)  # the run, its config and the dataset (the normalization's source) are gone
    assert not data.exists()
    assert np.array_equal(load_trained(alone).predict_chunk(seen), expected)

    tokenizer = json.loads((alone / TOKENIZER_NAME).read_text())
    config = json.loads((alone / "config.json").read_text())
    assert config["action_q01"] != [-1.0] * 4  # the dataset's statistics, not the defaults
    assert tokenizer["vocabulary"]["reach"] == tokenize("reach", tokenizer["buckets"], 1)[0]
    assert (tokenizer["buckets"], tokenizer["max_words"]) == (config["text_buckets"], config["max_words"])
    tokenizer["vocabulary"]["reach"] += 1  # a folder whose tokenizer is not this one's is refused, not misread
    (alone / TOKENIZER_NAME).write_text(json.dumps(tokenizer))
    with pytest.raises(CapvectorError, match="another instruction tokenizer"):
        load_trained(alone)


def test_the_eval_hook_evaluates_a_lora_run_with_its_adapters_merged():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    policy = Policy(PolicyConfig(image_size=32, dim=32, heads=2, trunk_layers=1, stem_channels=(8, 8, 8)))
    without = copy.deepcopy(policy)
    lora = peft.LoraConfig(r=4, target_modules=["head.0", "head.2"], init_lora_weights=False)  # B != 0
    model = peft.get_peft_model(policy, lora)
    seen = observation()
    plain = plain_copy(model)
    assert type(plain) is Policy and not plain.training
    assert np.allclose(plain.predict_chunk(seen), model.predict_chunk(seen), atol=1e-6)
    assert not np.allclose(plain.predict_chunk(seen), without.predict_chunk(seen), atol=1e-3)
