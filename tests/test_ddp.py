"""Two CPU processes under torchrun (gloo) train to the same weights as one process with the same global batch."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from capvector.training.engine import train
from toy import toy_config, weights

# Two processes average two half-batch gradients where one process takes one full-batch mean: the same sum in
# another order, so float32 rounding differs (3e-8 after 8 steps when this was written).
TOLERANCE = 1e-6


def test_two_processes_match_one(tmp_path: Path):
    fields = dict(strategy="aux", steps=8, batch_size=8, checkpoint_every=4)  # aux: the projector is in DDP too
    single = weights(train(toy_config(tmp_path / "single", **fields)))
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(dataclasses.asdict(toy_config(tmp_path / "ddp", **fields))))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "capvector.training",
            "--config",
            str(config_file),
        ],
        env=os.environ | {"OMP_NUM_THREADS": "1"},  # tests/ is on PYTHONPATH (conftest): toy's factories import
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = weights(tmp_path / "ddp")
    assert sorted(ddp) == sorted(single)
    halfway = load_file(str(tmp_path / "single" / "checkpoints" / "step_0000004" / "policy" / "model.safetensors"))
    assert not torch.equal(halfway["head.weight"], single["head.weight"])  # the last steps moved the weights
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=TOLERANCE, rtol=0, msg=key)
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step_0000008" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert "auxiliary.projector.weight" in state["model"]
