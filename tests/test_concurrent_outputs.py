"""Two real processes writing one output: exactly one wins with a complete output, the other exits 2; a killed run's
leftovers are removed by the next run and never taken for an output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from capvector.cli import main

SHAPES = {f"layers.{i}.weight": (256, 256) for i in range(4)}

# The merge of a child process that, once it holds the output's lock, touches a file and waits for another one to
# appear before it writes: the test decides how long the first writer is busy, whatever the machine's load.
SLOW_MERGE = """
import os, sys, time
import capvector.params.merging as merging
write_files = merging.write_files
def waiting_write_files(*args, **kwargs):
    open(sys.argv[1], "w").close()
    deadline = time.monotonic() + 300
    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return write_files(*args, **kwargs)
merging.write_files = waiting_write_files
from capvector.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture
def models(tmp_path, perturbed, random_state, write_checkpoint):
    pt = random_state(SHAPES)
    for name, state in (("pt", pt), ("ft", perturbed(pt, 1)), ("ao", perturbed(pt, 2))):
        write_checkpoint(tmp_path / name, state)
    write_checkpoint(tmp_path / "single", pt, "file")
    assert (
        main(["extract", "--aux", str(tmp_path / "ao"), "--sft", str(tmp_path / "ft"), "-o", str(tmp_path / "g")]) == 0
    )
    return tmp_path


def merge_argv(tmp, pretrained, output):
    return ["merge", "--pretrained", str(pretrained), "--vector", str(tmp / "g"), "-o", str(output)]


def start(*argv, held=None):
    """The command in a child process; with held=(STARTED, RELEASE), a merge that holds its lock till RELEASE exists."""
    if held:
        command = [sys.executable, "-c", SLOW_MERGE, *map(str, held), *argv]
    else:
        command = [sys.executable, "-m", "capvector", *argv]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the child never started writing"
        time.sleep(0.05)


def assert_complete_merge(tmp, output, read_state):
    expected = read_state(tmp / "pt")
    gamma = read_state(tmp / "g")
    merged = read_state(output)
    assert merged.keys() == expected.keys()
    for name in expected:
        assert torch.equal(merged[name], expected[name] + gamma[name]), name


def debris(output):
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_second_writer_exits_2_while_the_first_writes(models, kind, read_state):
    tmp = models
    pretrained, output = (tmp / "pt", tmp / "out") if kind == "folder" else (tmp / "single", tmp / "out.safetensors")
    first = start(*merge_argv(tmp, pretrained, output), held=(tmp / "writing", tmp / "release"))
    wait_for(tmp / "writing", first)
    second = subprocess.run(
        [sys.executable, "-m", "capvector", *merge_argv(tmp, pretrained, output)], capture_output=True, text=True
    )
    assert second.returncode == 2, second.stderr
    assert "another capvector process is writing it" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    (tmp / "release").touch()
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert_complete_merge(tmp, output, read_state)
    assert debris(output) == []


def test_two_writers_started_together(models, read_state):
    tmp = models
    output = tmp / "out"
    processes = [start(*merge_argv(tmp, tmp / "pt", output)) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in processes]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another capvector process is writing it" in loser or "already exists" in loser
    assert_complete_merge(tmp, output, read_state)
    assert debris(output) == []


def test_a_killed_run_leaves_no_output_and_its_leftovers_are_removed(models, capsys, read_state):
    tmp = models
    output = tmp / "out"
    victim = start(*merge_argv(tmp, tmp / "pt", output), held=(tmp / "writing", tmp / "never"))
    wait_for(tmp / "writing", victim)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert not output.exists()
    assert f".out.tmp-{victim.pid}" in debris(output)  # what a killed run leaves: never read as the output
    assert main(["inspect", str(output)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(merge_argv(tmp, tmp / "pt", output)) == 0  # the lock died with its holder: the next run proceeds
    assert_complete_merge(tmp, output, read_state)
    assert debris(output) == []
