"""Every bad input gets a clear error naming the file and tensor, exit code 2, and nothing left at the output path."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from capvector.cli import main

SHAPES = {"layers.0.weight": (64, 32), "layers.0.bias": (64,), "layers.1.weight": (16, 64)}


@pytest.fixture
def models(tmp_path, random_state, perturbed, write_checkpoint):
    pt = random_state(SHAPES)
    states = {"pt": pt, "ft": perturbed(pt, 1), "ao": perturbed(pt, 2)}
    for name, state in states.items():
        write_checkpoint(tmp_path / name, state, "sharded" if name == "pt" else "single")
    return tmp_path, states


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    message = capsys.readouterr().err
    assert code == 2, message
    return message


def assert_nothing_left(output):
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.tmp")]


def test_shape_mismatch(models, capsys, write_checkpoint):
    tmp, states = models
    ao = dict(states["ao"], **{"layers.1.weight": torch.zeros(16, 65)})
    write_checkpoint(tmp / "ao_wide", ao)
    message = run_cli(capsys, "extract", "--aux", tmp / "ao_wide", "--sft", tmp / "ft", "-o", tmp / "out")
    assert "shape mismatch" in message and "layers.1.weight" in message and "--exclude" in message
    assert_nothing_left(tmp / "out")


def test_dtype_mismatch(models, capsys, write_checkpoint):
    tmp, states = models
    write_checkpoint(tmp / "ao_bf16", {k: v.bfloat16() for k, v in states["ao"].items()})
    message = run_cli(capsys, "extract", "--aux", tmp / "ao_bf16", "--sft", tmp / "ft", "-o", tmp / "out")
    assert "dtype mismatch" in message and "--dtype" in message
    assert_nothing_left(tmp / "out")
    assert (
        main(
            [
                "extract",
                "--aux",
                str(tmp / "ao_bf16"),
                "--sft",
                str(tmp / "ft"),
                "-o",
                str(tmp / "out"),
                "--dtype",
                "float32",
            ]
        )
        == 0
    )


def test_missing_shard_and_missing_index(models, capsys):
    tmp, _ = models
    main(["extract", "--aux", str(tmp / "ao"), "--sft", str(tmp / "ft"), "-o", str(tmp / "gamma")])
    (tmp / "pt" / "model-00002-of-00002.safetensors").unlink()
    message = run_cli(capsys, "merge", "--pretrained", tmp / "pt", "--vector", tmp / "gamma", "-o", tmp / "out")
    assert "model-00002-of-00002.safetensors" in message and "missing" in message
    assert_nothing_left(tmp / "out")
    (tmp / "pt" / "model.safetensors.index.json").unlink()
    (tmp / "pt" / "model-00001-of-00002.safetensors").unlink()
    message = run_cli(capsys, "merge", "--pretrained", tmp / "pt", "--vector", tmp / "gamma", "-o", tmp / "out")
    assert "no weights found" in message


def test_truncated_and_corrupted_files(models, capsys):
    tmp, _ = models
    path = tmp / "ao" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    message = run_cli(capsys, "extract", "--aux", tmp / "ao", "--sft", tmp / "ft", "-o", tmp / "out")
    assert "truncated" in message and str(path) in message and "layers." in message
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    message = run_cli(capsys, "extract", "--aux", tmp / "ao", "--sft", tmp / "ft", "-o", tmp / "out")
    assert "not valid JSON" in message and str(path) in message
    assert_nothing_left(tmp / "out")


def test_nan_in_an_input(models, capsys, write_checkpoint):
    tmp, states = models
    ao = dict(states["ao"])
    ao["layers.0.weight"] = ao["layers.0.weight"].clone()
    ao["layers.0.weight"][3, 4] = float("nan")
    write_checkpoint(tmp / "ao_nan", ao)
    before = digest(tmp / "ao_nan")
    message = run_cli(capsys, "extract", "--aux", tmp / "ao_nan", "--sft", tmp / "ft", "-o", tmp / "out")
    assert "layers.0.weight" in message and "NaN or Inf" in message and "ao_nan" in message
    assert_nothing_left(tmp / "out")
    assert digest(tmp / "ao_nan") == before  # inputs are never modified


def test_nan_in_the_pretrained_model_stops_a_merge(models, capsys, write_checkpoint):
    tmp, states = models
    main(["extract", "--aux", str(tmp / "ao"), "--sft", str(tmp / "ft"), "-o", str(tmp / "gamma")])
    pt = dict(states["pt"], **{"layers.1.weight": torch.full((16, 64), float("inf"))})
    write_checkpoint(tmp / "pt_inf", pt, "sharded")
    message = run_cli(capsys, "merge", "--pretrained", tmp / "pt_inf", "--vector", tmp / "gamma", "-o", tmp / "out")
    assert "layers.1.weight" in message and "NaN or Inf" in message and "pt_inf" in message
    assert_nothing_left(tmp / "out")


def test_output_exists_or_overlaps_an_input(models, capsys):
    tmp, _ = models
    before = digest(tmp / "ft")
    message = run_cli(capsys, "extract", "--aux", tmp / "ao", "--sft", tmp / "ft", "-o", tmp / "ft")
    assert "already exists" in message
    message = run_cli(capsys, "extract", "--aux", tmp / "ao", "--sft", tmp / "ft", "-o", tmp / "ft" / "gamma")
    assert "overlaps the input" in message
    assert digest(tmp / "ft") == before


def test_vector_from_another_model(models, capsys, tmp_path, random_state, write_checkpoint):
    tmp, _ = models
    write_checkpoint(tmp / "other", random_state({"encoder.weight": (4, 4)}))
    main(["extract", "--aux", str(tmp / "ao"), "--sft", str(tmp / "ft"), "-o", str(tmp / "gamma")])
    message = run_cli(capsys, "merge", "--pretrained", tmp / "other", "--vector", tmp / "gamma", "-o", tmp / "out")
    assert "lacks" in message and "layers." in message
    assert_nothing_left(tmp / "out")


def test_unsafe_pickle_is_refused(tmp_path, capsys, random_state, write_checkpoint):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Payload()}, f)
    write_checkpoint(tmp_path / "ft", random_state({"w": (2,)}))
    message = run_cli(capsys, "extract", "--aux", tmp_path / "evil", "--sft", tmp_path / "ft", "-o", tmp_path / "out")
    assert "weights_only=True" in message
    assert not (tmp_path / "pwned").exists()


def test_bad_arguments(models, capsys):
    tmp, _ = models
    assert "GLOB=NUMBER" in run_cli(
        capsys, "merge", "--pretrained", tmp / "pt", "--vector", tmp / "ao", "-o", tmp / "o", "--alpha", "x=y"
    )
    assert "unknown dtype" in run_cli(
        capsys, "extract", "--aux", tmp / "ao", "--sft", tmp / "ft", "-o", tmp / "o", "--dtype", "int8"
    )
    assert "no such file" in run_cli(capsys, "inspect", tmp / "nowhere")


def test_disk_full_leaves_nothing(models):
    """A write that fails for lack of space (here: a file-size limit, which fails the same way) is reported, with
    exit 2, and the half-written output is removed."""
    tmp, _ = models
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from capvector.cli import main
        sys.exit(main(["merge", "--pretrained", "{tmp / "pt"}", "--vector", "{tmp / "ao"}", "-o", "{tmp / "out"}"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "no space left" in result.stderr and "layers." in result.stderr
    assert_nothing_left(tmp / "out")
