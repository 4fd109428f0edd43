"""PEFT LoRA adapters read as base + scaling * B @ A, checked against the dense formula and against peft itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from capvector.errors import CapvectorError
from capvector.params.checkpoints import open_checkpoint
from capvector.params.vectors import extract

peft = pytest.importorskip("peft")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.q = nn.Linear(8, 12)
        self.head = nn.Linear(12, 4)


def save_base(folder) -> dict:
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in Toy().state_dict().items()}
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    return state


def save_adapter(folder, base_folder, seed: int, rslora: bool) -> nn.Module:
    """A real PEFT adapter with non-zero B (PEFT initializes B at zero), saved with peft's own save_pretrained."""
    model = Toy()
    model.load_state_dict(open_checkpoint(base_folder))
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "embed"], modules_to_save=["head"], use_rslora=rslora
    )
    wrapped = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    wrapped.save_pretrained(folder)
    return wrapped


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_delta_equals_dense_formula_and_peft_merge(tmp_path, rslora):
    base = save_base(tmp_path / "base")
    wrapped = save_adapter(tmp_path / "adapter", tmp_path / "base", seed=1, rslora=rslora)
    adapter_weights = {k: v for k, v in wrapped.state_dict().items()}
    scaling = 8 / (4**0.5 if rslora else 4)
    lora = {k.split("base_model.model.")[1]: v for k, v in adapter_weights.items() if "lora_" in k}
    expected_q = base["q.weight"] + scaling * lora["q.lora_B.default.weight"] @ lora["q.lora_A.default.weight"]
    expected_embed = (
        base["embed.weight"]
        + scaling * (lora["embed.lora_embedding_B.default"] @ lora["embed.lora_embedding_A.default"]).T
    )
    merged_by_peft = wrapped.merge_and_unload().state_dict()

    checkpoint = open_checkpoint(tmp_path / "adapter", base=tmp_path / "base")
    torch.testing.assert_close(checkpoint["q.weight"], expected_q)
    torch.testing.assert_close(checkpoint["embed.weight"], expected_embed)
    for name in ("q.weight", "embed.weight", "head.weight", "head.bias", "q.bias"):
        torch.testing.assert_close(checkpoint[name], merged_by_peft[name], msg=name)
    assert not torch.equal(checkpoint["head.weight"], base["head.weight"])  # modules_to_save replaces the base tensor


def test_fan_in_fan_out_adapter(tmp_path):
    """GPT-2 style Conv1D stores weights as (in, out): the delta is (B A)^T."""
    generator = torch.Generator().manual_seed(0)
    base = {"h.0.attn.c_attn.weight": torch.randn(6, 10, generator=generator)}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    a, b = torch.randn(2, 6, generator=generator), torch.randn(10, 2, generator=generator)
    (tmp_path / "adapter").mkdir()
    save_file(
        {"base_model.model.h.0.attn.c_attn.lora_A.weight": a, "base_model.model.h.0.attn.c_attn.lora_B.weight": b},
        tmp_path / "adapter" / "adapter_model.safetensors",
    )
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 3,
                "fan_in_fan_out": True,
                "base_model_name_or_path": str(tmp_path / "base"),
            }
        )
    )
    checkpoint = open_checkpoint(tmp_path / "adapter")  # base found through base_model_name_or_path
    torch.testing.assert_close(checkpoint["h.0.attn.c_attn.weight"], base["h.0.attn.c_attn.weight"] + 1.5 * (b @ a).T)


def test_extract_between_two_adapters(tmp_path):
    save_base(tmp_path / "base")
    aux = save_adapter(tmp_path / "aux", tmp_path / "base", seed=1, rslora=False).merge_and_unload().state_dict()
    sft = save_adapter(tmp_path / "sft", tmp_path / "base", seed=2, rslora=False).merge_and_unload().state_dict()
    gamma = extract(tmp_path / "aux", tmp_path / "sft", tmp_path / "gamma", pretrained=tmp_path / "base")
    for name in ("q.weight", "embed.weight", "head.weight"):
        torch.testing.assert_close(gamma[name], aux[name] - sft[name], rtol=1e-5, atol=1e-5)
    assert float(gamma["q.bias"].abs().max()) == 0.0


def test_adapter_on_the_wrong_base(tmp_path):
    save_base(tmp_path / "base")
    save_adapter(tmp_path / "adapter", tmp_path / "base", seed=1, rslora=False)
    (tmp_path / "other").mkdir()
    save_file(
        {
            "q.weight": torch.zeros(5, 8),
            "embed.weight": torch.zeros(20, 8),
            "head.weight": torch.zeros(4, 12),
            "head.bias": torch.zeros(4),
        },
        tmp_path / "other" / "model.safetensors",
    )
    with pytest.raises(CapvectorError, match=r"q\.weight.*another base"):
        open_checkpoint(tmp_path / "adapter", base=tmp_path / "other")
    with pytest.raises(CapvectorError, match="--pretrained"):
        open_checkpoint(tmp_path / "adapter")  # base_model_name_or_path is not a local folder


def write_adapter(folder, base_folder, config, a, b):
    folder.mkdir()
    save_file(
        {"base_model.model.q.lora_A.weight": a, "base_model.model.q.lora_B.weight": b},
        folder / "adapter_model.safetensors",
    )
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base_folder), **config}))


def test_missing_lora_alpha_takes_peft_default(tmp_path):
    """PEFT's LoraConfig defaults lora_alpha to 8 (not to r): scaling 8 / r."""
    base = save_base(tmp_path / "base")
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=generator), torch.randn(12, 4, generator=generator)
    write_adapter(tmp_path / "adapter", tmp_path / "base", {"peft_type": "LORA", "r": 4}, a, b)
    checkpoint = open_checkpoint(tmp_path / "adapter")
    torch.testing.assert_close(checkpoint["q.weight"], base["q.weight"] + (8 / 4) * (b @ a))
    config = peft.LoraConfig(r=4)  # what peft itself takes when the field is absent
    assert config.lora_alpha == 8


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"r": 2}, "gives module 'q' rank 2 but its lora_A has shape [4, 8]"),
        ({"r": 0}, "'r' is 0, not a positive integer"),
        ({"r": 4, "lora_alpha": "16"}, "'lora_alpha' is '16', not a number"),
        ({"r": 4, "use_rslora": "yes"}, "'use_rslora' is 'yes', not true or false"),
        ({"r": 4, "alpha_pattern": {"q(": 2}}, "not a regular expression"),
        ({"r": 4, "rank_pattern": {"q": 2.5}}, "'rank_pattern' must map module-name patterns to positive integers"),
        ({"r": 4, "peft_type": "IA3"}, "PEFT type 'IA3' is not supported"),
    ],
)
def test_bad_adapter_configs_are_refused(tmp_path, capsys, config, message):
    from capvector.cli import main

    save_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter", tmp_path / "base", config, torch.ones(4, 8), torch.ones(12, 4))
    with pytest.raises(CapvectorError) as error:
        open_checkpoint(tmp_path / "adapter")
    assert message in str(error.value)
    assert (
        main(
            ["extract", "--aux", str(tmp_path / "adapter"), "--sft", str(tmp_path / "base"), "-o", str(tmp_path / "g")]
        )
        == 2
    )
    assert message in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_an_adapter_config_that_is_not_json(tmp_path):
    save_base(tmp_path / "base")
    write_adapter(tmp_path / "adapter", tmp_path / "base", {"r": 4}, torch.ones(4, 8), torch.ones(12, 4))
    (tmp_path / "adapter" / "adapter_config.json").write_text("{'r': 4}")
    with pytest.raises(CapvectorError, match="adapter config is not valid JSON"):
        open_checkpoint(tmp_path / "adapter")
