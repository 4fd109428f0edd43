"""The memory arithmetic: its formulas count what a built run holds, and the README's table is its output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capvector.training import memory
from capvector.training.config import checked
from capvector.training.engine import setup, train_step
from toy import capvector_fields, toy_config

README = Path(__file__).parents[1] / "README.md"


def test_the_readme_table_is_the_functions_output():
    assert memory.table() in README.read_text()  # regenerate it with: python -m capvector.training.memory


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_the_formulas_count_what_a_capvector_run_holds(tmp_path, finetune):
    if finetune == "lora":
        pytest.importorskip("peft")
    config = checked(toy_config(tmp_path / "run", finetune=finetune, lora_rank=4, **capvector_fields(tmp_path)))
    run = setup(config, 0, 1, torch.device("cpu"), None, None, None, None, None)
    train_step(run, 1)  # AdamW's moments exist after the first step
    assert run.regularizer is not None
    policy = run.model.policy
    base = {n: p for n, p in policy.named_parameters() if ".lora_" not in n}
    adapters = [p for n, p in policy.named_parameters() if ".lora_" in n]
    linear = [(p.shape[0], p.shape[1]) for n, p in base.items() if n.endswith("weight")]
    if finetune == "lora":
        assert sum(p.numel() for p in adapters) == memory.lora_parameters(linear, 4)
    expected = memory.training_memory(
        sum(p.numel() for p in base.values()),
        lora_parameters=sum(p.numel() for p in adapters),
        gamma_parameters=sum(rows * columns for rows, columns in linear)
        if finetune == "lora"
        else sum(p.numel() for p in base.values()),
    )
    moments = [v for state in run.optimizer.state.values() for v in state.values() if v.dim()]
    gammas = [g for term in run.regularizer.terms for g in term.gammas]
    assert expected.weights == nbytes(policy.parameters())
    assert expected.gradients == nbytes(run.params)  # one gradient per trained tensor
    assert expected.optimizer == nbytes(moments)
    assert expected.gamma == nbytes(gammas)


def test_fsdp_divides_the_states_and_lora_stays_whole():
    one = memory.training_memory(8e9, gamma_parameters=8e9)
    eight = memory.training_memory(8e9, gamma_parameters=8e9, gpus=8, fsdp=True, block_parameters=1e8)
    assert (eight.weights, eight.gradients, eight.optimizer, eight.gamma) == tuple(
        v / 8 for v in (one.weights, one.gradients, one.optimizer, one.gamma)
    )
    assert eight.gathered == 3 * 1e8 * 4
    with pytest.raises(ValueError, match="LoRA runs under DDP only"):
        memory.training_memory(8e9, lora_parameters=1e6, gpus=8, fsdp=True)
