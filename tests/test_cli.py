"""The `capvector` console script: every command documents an example, and exit codes reach the shell."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from capvector.cli import build_parser, main

COMMANDS = ["extract", "merge", "inspect", "train", "tasks", "demos", "evaluate", "reproduce"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"capvector {command}" in out


def test_every_command_is_listed():
    assert set(COMMANDS) <= set(build_parser()._subparsers._group_actions[0].choices)


def test_console_script_exit_codes(tmp_path, random_state, perturbed, write_checkpoint):
    script = Path(sys.executable).with_name("capvector")  # installed beside the interpreter, on PATH or not
    assert script.is_file(), "the capvector console script is not installed"
    pt = random_state({"w": (8, 4)})
    write_checkpoint(tmp_path / "ft", pt)
    write_checkpoint(tmp_path / "ao", perturbed(pt, 1))
    ok = subprocess.run(
        [script, "extract", "--aux", tmp_path / "ao", "--sft", tmp_path / "ft", "-o", tmp_path / "g"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "wrote" in ok.stdout, ok.stderr
    again = subprocess.run(
        [script, "extract", "--aux", tmp_path / "ao", "--sft", tmp_path / "ft", "-o", tmp_path / "g"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "already exists" in again.stderr


def test_tasks_and_bad_task(capsys):
    assert main(["tasks", "--split", "downstream"]) == 0
    assert "door-lock-v3" in capsys.readouterr().out
    assert main(["tasks", "--split", "no-such-task"]) == 2
    assert "valid tasks" in capsys.readouterr().err


def test_demos_refuse_a_frame_stride_that_does_not_divide_the_rate(tmp_path, capsys):
    assert main(["demos", "-o", str(tmp_path / "frames"), "--tasks", "reach-v3", "--frame-stride", "3"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "frame_stride 3 must divide the simulator's rate, 80" in line and not (tmp_path / "frames").exists()


def test_evaluate_needs_exactly_one_policy(capsys):
    assert main(["evaluate"]) == 2
    assert "--expert" in capsys.readouterr().err


def test_a_reader_that_stops_early_is_no_error():
    """`capvector train --help | head -1`: the reader is gone before the help is written; no traceback, exit 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    process = subprocess.run(
        [sys.executable, "-m", "capvector", "train", "--help"], stdout=write_end, stderr=subprocess.PIPE, timeout=120
    )
    os.close(write_end)
    assert process.returncode == 0 and process.stderr == b"", process.stderr.decode()
