"""The training engine on a toy policy: data order, aux projector, LoRA adapter, regularizer, resume, NaN, config."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from capvector.cli import main
from capvector.errors import CapvectorError
from capvector.training.config import load_config
from capvector.training.data import global_batches
from capvector.training.engine import train
from toy import KILL_ENV, ToyAuxiliary, ToyDataset, make_policy, saved_policy, toy_config, weights

TESTS = Path(__file__).parent


def test_batches_are_a_seeded_permutation_per_epoch():
    first = [b.tolist() for b, _ in zip(global_batches(40, 8, seed=3), range(10))]
    epochs = [[i for batch in first[:5] for i in batch], [i for batch in first[5:] for i in batch]]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
    assert first[:5] != first[5:]  # a new permutation each epoch
    assert [b.tolist() for b, _ in zip(global_batches(40, 8, seed=3, start=7), range(3))] == first[7:10]
    assert first != [b.tolist() for b, _ in zip(global_batches(40, 8, seed=4), range(10))]


def test_sft_and_aux_see_the_same_batches_and_aux_trains_its_projector_only_outside_the_policy(tmp_path):
    runs, seen = {}, {}
    for strategy in ("sft", "aux"):
        torch.manual_seed(123 if strategy == "sft" else 456)  # the global RNG before the run must not matter
        policy, auxiliary = make_policy(None, dropout=0.1), ToyAuxiliary()
        projector = auxiliary.projector.weight.detach().clone()
        runs[strategy] = train(
            toy_config(tmp_path / strategy, strategy=strategy), policy=policy, dataset=ToyDataset(), auxiliary=auxiliary
        )
        seen[strategy] = policy.seen
        if strategy == "aux":
            assert not torch.equal(auxiliary.projector.weight, projector), "the projector was not trained"
    assert len(seen["sft"]) == 12 and seen["sft"] == seen["aux"]
    sft, aux = weights(runs["sft"]), weights(runs["aux"])
    assert sorted(sft) == sorted(aux) == ["encoder.bias", "encoder.weight", "head.bias", "head.weight"]
    assert not torch.equal(sft["encoder.weight"], aux["encoder.weight"]), "the auxiliary loss changed nothing"
    lines = [json.loads(line) for line in (runs["aux"] / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [4, 8, 12]
    assert {"loss/action", "loss/auxiliary", "time/forward_ms", "time/auxiliary_ms", "time/optimizer_ms"} <= set(
        lines[0]
    )


def test_same_seed_same_weights_in_memory_or_through_a_dataloader_other_seed_other_weights(tmp_path):
    a = weights(train(toy_config(tmp_path / "a")))
    b = weights(train(toy_config(tmp_path / "b", cache_dataset_mb=0, num_workers=2)))
    c = weights(train(toy_config(tmp_path / "c", seed=1)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def reference_and_killed(tmp_path: Path, kill_at: int = 7, **fields) -> tuple[Path, Path]:
    """A run, and the same run SIGKILLed at step `kill_at` (checkpoints every 4 steps): (the finished run's
    out_dir, the killed run's config file)."""
    common = dict(strategy="aux", policy_args={"dropout": 0.2}, checkpoint_every=4) | fields
    reference = train(toy_config(tmp_path / "reference", **common))
    config = toy_config(tmp_path / "resumed", **common)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(dataclasses.asdict(config)))  # JSON is YAML
    killed = subprocess.run(
        [sys.executable, "-m", "capvector.training", "--config", str(config_file)],
        env=os.environ | {KILL_ENV: str(kill_at), "PYTHONPATH": str(TESTS)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "resumed" / "policy").exists()
    return reference, config_file


def assert_same_weights(expected: Path, got: Path) -> None:
    a, b = weights(expected), weights(got)
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    reference, config_file = reference_and_killed(tmp_path)
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step_0000004"]
    resumed = train(load_config(config_file, ["resume=true"]))
    assert_same_weights(reference, resumed)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12]


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensors: torch.load reads it without complaint
    path.write_bytes(bytes(data))


def test_a_damaged_latest_checkpoint_is_reported_and_the_run_resumes_from_the_one_before(tmp_path, capsys):
    reference, config_file = reference_and_killed(tmp_path, kill_at=10)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000004", "step_0000008"]
    assert json.loads((checkpoints / "step_0000008" / "checkpoint.json").read_text())["sha256"].keys() == {
        "trainer_state.pt",
        "policy/config.json",
        "policy/model.safetensors",
    }
    flip_a_byte(checkpoints / "step_0000008" / "trainer_state.pt")
    assert main(["train", "--config", str(config_file), "--resume"]) == 0
    said = capsys.readouterr().err
    assert "step_0000008 is damaged (trainer_state.pt does not match its checksum)" in said
    assert "moved to damaged-step_0000008, falling back to the previous checkpoint" in said
    assert "resuming from " + str(checkpoints / "step_0000004") in said
    assert_same_weights(reference, tmp_path / "resumed")  # steps 5-12 redone: bitwise the uninterrupted run
    assert sorted(p.name for p in checkpoints.iterdir()) == ["damaged-step_0000008", "step_0000008", "step_0000012"]


def test_resume_with_no_intact_checkpoint_stops_in_one_line(tmp_path, capsys):
    run = train(toy_config(tmp_path / "run", checkpoint_every=6))
    (run / "checkpoints" / "step_0000012" / "policy" / "model.safetensors").unlink()
    flip_a_byte(run / "checkpoints" / "step_0000006" / "trainer_state.pt")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(dataclasses.asdict(toy_config(run, checkpoint_every=6))))
    assert main(["train", "--config", str(config_file), "--resume"]) == 2
    said = capsys.readouterr().err.splitlines()
    assert "step_0000012 is damaged (policy/model.safetensors is missing)" in said[0]
    assert "step_0000006 is damaged (trainer_state.pt does not match its checksum)" in said[1]
    assert said[2].endswith(
        "holds no complete, intact checkpoint; set resume=false to start this run (or check out_dir)"
    )
    assert len(said) == 3


def test_resume_refuses_a_missing_checkpoint_another_config_and_an_occupied_out_dir(tmp_path):
    with pytest.raises(CapvectorError, match="no complete, intact checkpoint"):
        train(toy_config(tmp_path / "empty", resume=True))
    train(toy_config(tmp_path / "run", checkpoint_every=6))
    with pytest.raises(CapvectorError, match=r"lr: 0\.01 in the checkpoint, 0\.02 now"):
        train(toy_config(tmp_path / "run", checkpoint_every=6, lr=2e-2, resume=True))
    before = weights(tmp_path / "run")
    with pytest.raises(CapvectorError, match="already holds a run; set resume=true"):
        train(toy_config(tmp_path / "run"))
    after = weights(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)
    train(toy_config(tmp_path / "run", checkpoint_every=4, log_every=1, resume=True))  # bookkeeping may change


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys):
    config = toy_config(tmp_path / "run", checkpoint_every=2, policy_args={"nan_at_call": 5})
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(dataclasses.asdict(config)))
    assert main(["train", "--config", str(config_file)]) == 2
    message = capsys.readouterr().err
    assert "step 5: loss term 'action' is nan" in message and "step_0000004" in message
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert not (tmp_path / "run" / "policy").exists()


def test_lora_run_writes_a_peft_adapter_that_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    base = saved_policy(tmp_path / "base")
    policy = make_policy(str(base))
    run = train(
        toy_config(tmp_path / "lora", finetune="lora", lora_rank=4, init_from=str(base), lr=5e-2), policy=policy
    )
    adapter = run / "policy"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in keys)
    assert any(k.endswith("encoder.lora_B.weight") and v.abs().sum() > 0 for k, v in keys.items())
    loaded = peft.PeftModel.from_pretrained(make_policy(str(base)), adapter)
    data = ToyDataset()
    batch = {"x": data.x[:8], "y": data.y[:8], "index": torch.arange(8)}
    policy.eval(), loaded.eval()
    with torch.no_grad():
        trained_loss, loaded_loss = policy(batch)["action"], loaded(batch)["action"]
        base_loss = make_policy(str(base))(batch)["action"]
    assert torch.allclose(trained_loss, loaded_loss, atol=1e-6) and not torch.allclose(trained_loss, base_loss)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_capvector_regularizer_keeps_the_update_off_gamma(tmp_path, finetune):
    if finetune == "lora":
        pytest.importorskip("peft")
    base = saved_policy(tmp_path / "meta")
    start = load_file(str(base / "model.safetensors"))
    gamma = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
        for i, (k, v) in enumerate(start.items())
        if k.endswith("weight")
    }
    (tmp_path / "gamma").mkdir()
    save_file(gamma, str(tmp_path / "gamma" / "gamma.safetensors"))

    def projection(run: Path) -> float:
        """Sum over tensors of |<theta - theta_meta, gamma>| / |gamma|, on the saved (for LoRA: merged) weights."""
        if finetune == "lora":
            from peft import PeftModel

            now = PeftModel.from_pretrained(make_policy(str(base)), run / "policy").merge_and_unload().state_dict()
        else:
            now = weights(run)
        return sum(((now[k] - start[k]) * g).sum().abs().item() / g.norm().item() for k, g in gamma.items())

    common = dict(
        init_from=str(base),
        vector=str(tmp_path / "gamma"),
        finetune=finetune,
        lora_rank=4,
        lr=5e-2,
        lora_form="exact",
        orth_lambda=100.0,
        check_merge=False,  # a hand-made gamma; the merge record is tested on its own
    )
    found = {
        strategy: projection(train(toy_config(tmp_path / strategy, strategy=strategy, **common)))
        for strategy in ("sft", "capvector")
    }
    assert found["sft"] > 0.05 and found["capvector"] < 0.1 * found["sft"], found
    hard = toy_config(tmp_path / "hard", strategy="capvector", orth_hard=True, **common | {"orth_lambda": 0.0})
    assert projection(train(hard)) < 1e-4


def test_a_vector_that_does_not_fit_the_model_names_the_tensor(tmp_path):
    base = saved_policy(tmp_path / "meta")
    config = toy_config(tmp_path / "run", strategy="capvector", init_from=str(base), vector="unused", check_merge=False)
    with pytest.raises(CapvectorError, match="'encoder.weight' has shape"):
        train(config, vector={"encoder.weight": torch.ones(3, 3)})
    with pytest.raises(CapvectorError, match="'decoder.weight' is not a parameter"):
        train(config, vector={"decoder.weight": torch.ones(3, 3)})
    with pytest.raises(CapvectorError, match="needs 'vector'"):
        train(dataclasses.replace(config, vector=None))


def test_config_files_overrides_and_errors(tmp_path):
    (tmp_path / "run.toml").write_text('strategy = "aux"\nsteps = 5\nlr = 3e-4\n[policy_args]\nhidden = 8\n')
    config = load_config(tmp_path / "run.toml", ["steps=7", "policy_args.dropout=0.5", "lora_targets=[a, 'b.*']"])
    assert (config.strategy, config.steps, config.lr) == ("aux", 7, 3e-4)
    assert config.policy_args == {"hidden": 8, "dropout": 0.5} and config.lora_targets == ["a", "b.*"]
    (tmp_path / "run.yaml").write_text("lr: 1e-4\nwarmup_steps: 3\n")  # YAML 1.1 reads 1e-4 as a string
    assert load_config(tmp_path / "run.yaml").lr == 1e-4
    with pytest.raises(CapvectorError, match="unknown field 'step'; did you mean 'steps'"):
        load_config(None, ["step=3"])
    with pytest.raises(CapvectorError, match="field 'steps': expected int, got 'many'"):
        load_config(None, ["steps=many"])
    with pytest.raises(CapvectorError, match="field 'steps': expected int, got True"):
        load_config(None, ["steps=true"])
    with pytest.raises(CapvectorError, match="field 'strategy' is 'capvec'; choose one of: sft, aux, capvector"):
        load_config(None, ["strategy=capvec"])
    with pytest.raises(CapvectorError, match="key=value"):
        load_config(None, ["steps"])
    with pytest.raises(CapvectorError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
