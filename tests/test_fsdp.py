"""FSDP2 on two CPU processes (gloo): the regularizer on sharded parameters, gradient accumulation, activation
checkpointing and resume give the one-process weights; the checkpoints and the policy folder keep their layout.

All multi-process runs happen in one torchrun launch (tests/distributed_runs.py), made once for this module."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capvector.params.vectors import extract
from capvector.training.engine import train
from toy import capvector_fields, toy_config, weights

TESTS = Path(__file__).parent
# Two processes average two half-batch gradients (reduce-scatter) where one process takes one full-batch mean,
# and sum the regularizer's inner products shard by shard: the same sums in another order (float32 rounding).
TOLERANCE = 1e-6


def projections(run: Path, root: Path) -> list[float]:
    """Per tensor <theta - theta_meta, gamma> / |gamma| of a finished run."""
    start = load_file(str(root / "meta" / "model.safetensors"))
    gamma = load_file(str(root / "gamma" / "gamma.safetensors"))
    now = weights(run)
    return [((now[k] - start[k]) * g).sum().item() / g.norm().item() for k, g in gamma.items()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The plan's configs (by name, as TrainConfig) after one torchrun launch trained them all."""
    root = tmp_path_factory.mktemp("fsdp")
    fields = capvector_fields(root)
    fsdp = fields | dict(distributed="fsdp", grad_accum_steps=2, activation_checkpointing=True, blocks=["encoder"])
    configs = {
        "fsdp": toy_config(root / "fsdp", **fsdp),
        "interrupted": toy_config(root / "interrupted", **fsdp),
        "resumed": toy_config(root / "interrupted", **fsdp | {"resume": True}),
        "hard": toy_config(root / "hard", **fields | dict(distributed="fsdp", orth_hard=True, orth_lambda=0.0)),
        "ddp_accumulated": toy_config(root / "ddp", strategy="aux", steps=8, grad_accum_steps=2),
        # the projector is sharded with the policy; the objective hooks a block that is checkpointed and sharded
        "fsdp_aux": toy_config(
            root / "fsdp_aux",
            strategy="aux",
            steps=8,
            distributed="fsdp",
            activation_checkpointing=True,
            blocks=["encoder"],
        ),
    }
    plan = [{"config": dataclasses.asdict(config)} for config in configs.values()]
    plan[1]["nan_at_call"] = 11  # step 6 of 8 (2 micro-batches per step): after the checkpoint of step 4
    (root / "plan.json").write_text(json.dumps(plan))
    script = [str(TESTS / "distributed_runs.py"), str(root / "plan.json")]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script],
        env=os.environ | {"OMP_NUM_THREADS": "1"},  # tests/ is on PYTHONPATH (conftest): toy's factories import
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "fields": fields, **configs}


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=TOLERANCE, rtol=0, msg=key)


def orth_values(run: Path) -> list[float]:
    return [json.loads(line)["loss/orth"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_with_the_regularizer_matches_one_process(runs, tmp_path):
    root = runs["root"]
    single = train(toy_config(tmp_path / "single", **runs["fields"]))  # no accumulation, no checkpointing
    fsdp = Path(runs["fsdp"].out_dir)
    assert_close(weights(fsdp), weights(single))
    torch.testing.assert_close(orth_values(fsdp), orth_values(single), atol=1e-7, rtol=1e-5)
    assert orth_values(single)[-1] > 1e-6  # the regularizer had something to do
    # the checkpoint holds whole tensors in the one-process layout
    name = Path("checkpoints") / "step_0000004" / "trainer_state.pt"
    ours, theirs = (torch.load(run / name, weights_only=True) for run in (fsdp, single))
    assert {k: v.shape for k, v in ours["model"].items()} == {k: v.shape for k, v in theirs["model"].items()}
    assert [{k: getattr(v, "shape", v) for k, v in s.items()} for s in ours["optimizer"]["state"].values()] == [
        {k: getattr(v, "shape", v) for k, v in s.items()} for s in theirs["optimizer"]["state"].values()
    ]
    assert len(ours["rng"]) == 2
    # the policy folder is a plain safetensors model that extract reads
    vector = extract(fsdp / "policy", root / "meta", tmp_path / "update")
    assert vector.norm() > 0 and sorted(vector) == sorted(weights(single))


def test_an_interrupted_fsdp_run_resumes_to_the_uninterrupted_weights(runs):
    resumed = Path(runs["resumed"].out_dir)
    assert (resumed / "checkpoints" / "step_0000004").is_dir()
    expected, got = weights(Path(runs["fsdp"].out_dir)), weights(resumed)
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 9)
    )


def test_fsdp_hard_variant_matches_one_process_and_keeps_the_update_off_gamma(runs, tmp_path):
    single = train(dataclasses.replace(runs["hard"], out_dir=str(tmp_path / "single"), distributed="ddp"))
    hard = Path(runs["hard"].out_dir)
    assert_close(weights(hard), weights(single))
    assert max(abs(p) for p in projections(hard, runs["root"])) < 1e-5


def test_ddp_gradient_accumulation_matches_one_process(runs, tmp_path):
    single = train(dataclasses.replace(runs["ddp_accumulated"], out_dir=str(tmp_path / "single"), grad_accum_steps=1))
    assert_close(weights(Path(runs["ddp_accumulated"].out_dir)), weights(single))


def test_fsdp_with_an_auxiliary_objective_matches_one_process(runs, tmp_path):
    config = runs["fsdp_aux"]
    single = train(dataclasses.replace(config, out_dir=str(tmp_path / "single"), distributed="ddp"))
    assert_close(weights(Path(config.out_dir)), weights(single))
    lines = (Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["loss/auxiliary"] > 0 for line in lines)
