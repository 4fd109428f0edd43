"""Gradient accumulation and activation checkpointing (one process): the same step as without them, in less memory;
and the checks on the memory settings."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from bench.test_policy import synthetic_batch
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.policy.modeling_policy import Policy
from capvector.errors import CapvectorError
from capvector.training.blocks import checkpoint_activations, find_blocks
from capvector.training.engine import train
from toy import capvector_fields, saved_policy, toy_config, weights

# Four micro-batch means averaged where one batch takes one mean: the same sum in another order.
TOLERANCE = 1e-6


def metric_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["aux", "capvector"])
def test_accumulated_micro_batches_make_the_large_batch_step(tmp_path, strategy):
    fields = capvector_fields(tmp_path) if strategy == "capvector" else dict(strategy="aux", log_every=1)
    one = train(toy_config(tmp_path / "one", **fields))
    four = train(toy_config(tmp_path / "four", grad_accum_steps=4, **fields))  # 4 micro-batches of 2 samples
    expected, got = weights(one), weights(four)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=TOLERANCE, rtol=0, msg=key)
    lines, accumulated = metric_lines(one), metric_lines(four)
    assert [line["step"] for line in accumulated] == [line["step"] for line in lines]  # one line per optimizer step
    terms = {"aux": ["loss/action", "loss/auxiliary"], "capvector": ["loss/action", "loss/orth"]}[strategy]
    for line, other in zip(lines, accumulated, strict=True):
        for term in terms:
            assert other[term] == pytest.approx(line[term], rel=1e-5, abs=1e-8), (line["step"], term)
    if strategy == "capvector":
        assert lines[-1]["loss/orth"] > 1e-6  # L_orth is in the step, added once


def test_activation_checkpointing_recomputes_the_benchmark_policys_blocks_to_the_same_gradients():
    torch.manual_seed(0)
    plain = Policy(PolicyConfig())
    checkpointed = copy.deepcopy(plain)
    blocks = find_blocks(checkpointed, [])
    assert {f"trunk.layers.{i}" for i in range(4)} <= set(blocks)  # the default rule: the layer lists' elements
    for block in blocks.values():
        checkpoint_activations(block)
    assert dict(checkpointed.state_dict()).keys() == dict(plain.state_dict()).keys()  # names unchanged
    batch = synthetic_batch()
    saved = {}
    for name, policy in (("plain", plain), ("checkpointed", checkpointed)):
        count = [0]

        def pack(tensor: torch.Tensor, count: list[int] = count) -> torch.Tensor:
            count[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = policy(batch)["action"]
        loss.backward()
        saved[name] = (loss.detach(), count[0])
    assert torch.equal(saved["plain"][0], saved["checkpointed"][0])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    assert saved["checkpointed"][1] < saved["plain"][1] / 2  # the blocks' activations were not kept


def test_activation_checkpointing_in_the_engine_gives_the_same_weights_with_dropout(tmp_path):
    fields = dict(policy_args={"dropout": 0.3}, blocks=["encoder", "dropout"])
    plain = weights(train(toy_config(tmp_path / "plain", **fields)))
    checkpointed = weights(train(toy_config(tmp_path / "checkpointed", activation_checkpointing=True, **fields)))
    for key in plain:  # bitwise: the recomputation replays the dropout masks
        assert torch.equal(plain[key], checkpointed[key]), key


def test_bad_memory_settings_are_refused_in_one_line(tmp_path):
    with pytest.raises(
        CapvectorError, match=r"across 1 processes x 3 micro-batches \(grad_accum_steps\); use a multiple of 3"
    ):
        train(toy_config(tmp_path / "a", grad_accum_steps=3))
    with pytest.raises(CapvectorError, match="finetune 'lora' with distributed 'fsdp' is not supported"):
        train(
            toy_config(
                tmp_path / "b", finetune="lora", init_from=str(saved_policy(tmp_path / "base")), distributed="fsdp"
            )
        )
    with pytest.raises(CapvectorError, match="no nn.ModuleList of layers to checkpoint; name its blocks"):
        train(toy_config(tmp_path / "c", activation_checkpointing=True))
    with pytest.raises(CapvectorError, match=r"pattern\(s\) \['trunk.\*'\] match no module"):
        train(toy_config(tmp_path / "d", activation_checkpointing=True, blocks=["trunk.*"]))
    assert not any(tmp_path.glob("[abcd]"))  # nothing written
