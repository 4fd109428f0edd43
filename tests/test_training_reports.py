"""What a training run tells its user: `train --help` (every config field), progress (a bar on a terminal, lines
elsewhere), Weights & Biases offline, and evaluations during training (the toy hook; the benchmark's is in
tests/bench/test_training_eval.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pty
import struct
import sys
import termios
import threading
import time

import pytest

from capvector.cli import main
from capvector.errors import CapvectorError
from capvector.training.config import TrainConfig, field_docs
from capvector.training.engine import train
from capvector.training.metrics import METRICS_FILE
from capvector.training.preflight import check_inputs
from toy import toy_config, weights


def words(text: str) -> str:
    return " ".join(text.split())


def test_train_help_lists_every_config_field_with_its_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out
    docs = field_docs()
    defaults = TrainConfig()
    assert [name for _, name, _ in docs] == [f.name for f in dataclasses.fields(TrainConfig)]
    for section, name, doc in docs:
        assert doc and section, f"field {name} has no comment (or no section) in TrainConfig: add one"
        assert f"\n  {name}: {json.dumps(getattr(defaults, name))}    (" in out
        assert words(doc) in words(out)
    assert words('strategy: "sft" (sft | aux | capvector)') in words(out)
    assert words(docs[0][0]) in words(out)  # a section heading


def metrics_lines(run):
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def test_off_a_terminal_progress_is_a_plain_line_every_log_every_steps(tmp_path, capsys):
    train(toy_config(tmp_path / "run", progress=True, log_every=4))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["4/12", "8/12", "12/12"], err
    assert "\r" not in err and "loss " in lines[0] and "steps/s" in lines[0] and "eta " in lines[0]
    train(toy_config(tmp_path / "quiet", progress=False))
    assert "step " not in capsys.readouterr().err


def test_on_a_terminal_progress_is_a_bar(tmp_path, monkeypatch):
    main_fd, terminal_fd = pty.openpty()
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    chunks: list[bytes] = []

    def read() -> None:
        with contextlib.suppress(OSError):  # EIO once the terminal side is closed
            while chunk := os.read(main_fd, 4096):
                chunks.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    with os.fdopen(terminal_fd, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        train(toy_config(tmp_path / "run", progress=True, log_every=4))
        monkeypatch.undo()
    reader.join(timeout=10)
    os.close(main_fd)
    shown = b"".join(chunks).decode()
    assert "12/12 [" in shown and "loss=" in shown and "%|" in shown, shown
    assert "step 4/12" not in shown


def test_wandb_logs_offline_even_when_the_environment_says_online(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")  # no API key, no network: an online run would fail or hang
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = train(toy_config(tmp_path / "run", wandb=True, eval="toy:toy_eval", eval_every=6))
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    keys = [b"loss/action", b"steps_per_s", b"eval/head_norm", b"toy:make_policy"]  # metrics, evaluations, config
    deadline = time.monotonic() + 60  # W&B's writer process may still be flushing on a loaded machine
    while not all(key in log.read_bytes() for key in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [key for key in keys if key not in log.read_bytes()] == []


def test_wandb_asked_for_but_not_installed_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the package shows find_spec
    config = toy_config(tmp_path / "run")
    overrides = [f"{f.name}={json.dumps(getattr(config, f.name))}" for f in dataclasses.fields(config)]
    assert main(["train", *(f"--set={o}" for o in overrides), "--set=wandb=true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install capvector[wandb]" in err
    assert not (tmp_path / "run").exists()


def test_evaluations_land_in_the_metrics_at_their_steps_and_change_no_weight(tmp_path):
    fields = {"policy_args": {"dropout": 0.2}, "log_every": 3}  # dropout: the RNG streams matter
    plain = train(toy_config(tmp_path / "plain", **fields))
    run = train(toy_config(tmp_path / "run", eval="toy:toy_eval", eval_args={"draws": 5}, eval_every=4, **fields))
    for name, tensor in weights(plain).items():
        assert weights(run)[name].equal(tensor), name
    evaluations = [line for line in metrics_lines(run) if "eval/seconds" in line]
    assert [line["step"] for line in evaluations] == [4, 8, 12]
    assert all(line["eval/training"] == 0.0 for line in evaluations)  # the hook saw the policy in eval mode
    assert evaluations[0]["eval/head_norm"] != evaluations[-1]["eval/head_norm"]  # the policy as it trains

    def trained(lines):  # what the steps computed, without their timings
        return [{k: v for k, v in line.items() if k in ("step", "lr", "loss", "grad_norm")} for line in lines]

    assert trained(line for line in metrics_lines(run) if "loss" in line) == trained(metrics_lines(plain))


def test_eval_configuration_errors_are_one_line(tmp_path):
    with pytest.raises(CapvectorError, match="eval_every is 4 but 'eval' names no hook"):
        train(toy_config(tmp_path / "run", eval_every=4))
    with pytest.raises(CapvectorError, match="'eval_args' does not fit toy:toy_eval"):
        train(toy_config(tmp_path / "run", eval="toy:toy_eval", eval_args={"episodes": 2}, eval_every=4))
    with pytest.raises(CapvectorError, match="eval_every with distributed 'fsdp' is not supported"):
        check_inputs(
            toy_config(tmp_path / "run", eval="toy:toy_eval", eval_every=4, distributed="fsdp"), 2, set(), None
        )
    with pytest.raises(CapvectorError, match="eval hook builtins:repr returned .ToyPolicy"):
        train(toy_config(tmp_path / "run", eval="builtins:repr", eval_every=4))
