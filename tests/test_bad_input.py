"""Every bad input gets a clear error naming the file and tensor, exit code 2, and nothing left at the output path."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from capvector.cli import main
from capvector.errors import CapvectorError
from capvector.params.checkpoints import open_checkpoint

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
    """Nothing at the output path, and no temporary folder or lock beside it."""
    assert not os.path.lexists(output)
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


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


# --- files named from outside the folder ----------------------------------------------------------------------------


def merge_argv(tmp, pretrained, out="out"):
    return ["merge", "--pretrained", tmp / pretrained, "--vector", tmp / "gamma", "-o", tmp / out]


@pytest.mark.parametrize("how", ["dotdot", "absolute", "file_link", "folder_link"])
def test_an_index_may_name_only_files_inside_its_folder(models, capsys, how):
    """An index that names a shard outside the model folder is refused, for every command that reads it."""
    tmp, _ = models
    main(["extract", "--aux", str(tmp / "ao"), "--sft", str(tmp / "ft"), "-o", str(tmp / "gamma")])
    shard = "model-00002-of-00002.safetensors"
    (tmp / "outside").mkdir()
    os.rename(tmp / "pt" / shard, tmp / "outside" / shard)
    name = {
        "dotdot": f"../outside/{shard}",
        "absolute": str(tmp / "outside" / shard),
        "file_link": "link.safetensors",
        "folder_link": f"linked/{shard}",
    }[how]
    (tmp / "pt" / "link.safetensors").symlink_to(tmp / "outside" / shard)
    (tmp / "pt" / "linked").symlink_to(tmp / "outside", target_is_directory=True)
    index_path = tmp / "pt" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: name if v == shard else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    for argv in (
        merge_argv(tmp, "pt"),
        ["extract", "--aux", tmp / "pt", "--sft", tmp / "ft", "-o", tmp / "out"],
        ["inspect", tmp / "gamma", "--base", tmp / "pt"],
    ):
        message = run_cli(capsys, *argv)
        assert "outside the checkpoint folder" in message and name in message
        assert_nothing_left(tmp / "out")


def test_a_hugging_face_cache_snapshot_is_read_through_its_links(models, read_state):
    """Hub cache snapshots are links to ../../blobs: that is inside the model, and the output holds real files."""
    tmp, states = models
    main(["extract", "--aux", str(tmp / "ao"), "--sft", str(tmp / "ft"), "-o", str(tmp / "gamma")])
    repo = tmp / "hub" / "models--org--pt"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in (tmp / "pt").rglob("*"):
        if file.is_file():
            blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
            blob.write_bytes(file.read_bytes())
            link = snapshot / file.relative_to(tmp / "pt")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    assert main(["merge", "--pretrained", str(snapshot), "--vector", str(tmp / "gamma"), "-o", str(tmp / "out")]) == 0
    assert (tmp / "out" / "config.json").is_file() and not (tmp / "out" / "config.json").is_symlink()
    assert read_state(tmp / "out").keys() == states["pt"].keys()


def test_shards_in_subfolders_with_one_file_name(tmp_path, perturbed, random_state, read_state):
    """Two shards both called model.safetensors, in two subfolders: the output keeps both, each in its place."""
    pt = random_state(SHAPES)
    states = {"pt": pt, "ft": perturbed(pt, 1), "ao": perturbed(pt, 2)}
    names = list(SHAPES)
    for role, state in states.items():
        folder = tmp_path / role
        weight_map = {}
        for sub, part in (("first", names[:2]), ("second", names[2:])):
            (folder / sub).mkdir(parents=True)
            save_file({n: state[n] for n in part}, folder / sub / "model.safetensors")
            weight_map |= {n: f"{sub}/model.safetensors" for n in part}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (folder / "first" / "notes.txt").write_text("kept")
    assert (
        main(["extract", "--aux", str(tmp_path / "ao"), "--sft", str(tmp_path / "ft"), "-o", str(tmp_path / "g")]) == 0
    )
    merge = ["merge", "--pretrained", tmp_path / "pt", "--vector", tmp_path / "g", "-o", tmp_path / "meta"]
    assert main([str(a) for a in merge]) == 0
    out = tmp_path / "meta"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert (
        index["weight_map"] == json.loads((tmp_path / "pt" / "model.safetensors.index.json").read_text())["weight_map"]
    )
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in pt.values())
    for sub, part in (("first", names[:2]), ("second", names[2:])):
        merged = read_state(out / sub / "model.safetensors")
        assert merged.keys() == set(part)
        for n in part:
            expected = pt[n] + (states["ao"][n] - states["ft"][n])
            assert torch.equal(merged[n], expected), n
    assert (out / "first" / "notes.txt").read_text() == "kept"


# --- safetensors headers --------------------------------------------------------------------------------------------


def raw_safetensors(path, header, data):
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def safetensors_refuses(path):
    try:
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                f.get_tensor(key)
    except Exception:
        return True
    return False


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {  # name: (header, data bytes, what the message says, whether the safetensors library refuses it too)
    "overlapping offsets": (
        {"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        bytes(12),
        "overlap or leave a gap",
        True,
    ),
    "gap between tensors": (
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
        bytes(8),
        "overlap or leave a gap",
        True,
    ),
    "out of range": (
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
        bytes(8),
        "truncated",
        True,
    ),
    "bytes after the last tensor": ({"a": F32x2}, bytes(12), "follow the last tensor", True),
    "negative offsets": (
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
        bytes(8),
        "data_offsets",
        True,
    ),
    "negative dimension": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "shape", True),
    "duplicate name": (
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
        bytes(16),
        "names 'a' twice",
        True,
    ),
    "unknown dtype": (
        {"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}},
        bytes(8),
        "unsupported dtype",
        True,
    ),
    "size does not match shape": (
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        bytes(8),
        "its shape [3] needs 12",
        True,
    ),
    "non-string metadata": ({"__metadata__": {"format": 1}, "a": F32x2}, bytes(8), "__metadata__", True),
    "lone surrogate in metadata": (
        b'{"__metadata__":{"k":"\\ud800"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        bytes(8),
        "not valid JSON",
        True,
    ),
    "metadata not a map": ({"__metadata__": ["pt"], "a": F32x2}, bytes(8), "__metadata__", True),
    "not an object": (b"[1, 2]", b"", "not a JSON object", True),
    "entry not an object": ({"a": [0, 8]}, bytes(8), "not described by a JSON object", True),
    "absurd shape": (
        {"a": {"dtype": "F32", "shape": [2**62, 0], "data_offsets": [0, 0]}, "b": F32x2},
        bytes(8),
        "dimension over 2^40",
        False,  # the library accepts it (no elements); a corrupted header all the same
    ),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_safetensors_headers_are_refused_before_any_data_is_read(models, capsys, case):
    tmp, _ = models
    header, data, expected, library_refuses = BAD_HEADERS[case]
    (tmp / "bad").mkdir()
    path = tmp / "bad" / "model.safetensors"
    raw_safetensors(path, header, data)
    assert safetensors_refuses(path) == library_refuses
    with pytest.raises(CapvectorError, match=r"model\.safetensors") as error:
        open_checkpoint(tmp / "bad")  # opening reads headers only: the refusal comes before any tensor data is read
    assert expected in str(error.value)
    started = time.perf_counter()
    message = run_cli(capsys, "extract", "--aux", tmp / "bad", "--sft", tmp / "ft", "-o", tmp / "out")
    assert time.perf_counter() - started < 10 and expected in message and "\n" not in message.strip()
    assert_nothing_left(tmp / "out")


def test_a_header_the_library_accepts_is_read_alike(tmp_path):
    """Whitespace around the JSON, null metadata, extra entry fields: accepted, as safetensors accepts them."""
    path = tmp_path / "ok.safetensors"
    header = b'  {"__metadata__": null, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}}   '
    raw_safetensors(path, header, struct.pack("<2f", 1.5, -2.0))
    assert not safetensors_refuses(path)
    assert open_checkpoint(path)["a"].tolist() == [1.5, -2.0]


# --- patterns, arguments and outputs --------------------------------------------------------------------------------


def test_patterns_that_match_nothing_are_errors(models, capsys):
    tmp, _ = models
    extract = ["extract", "--aux", tmp / "ao", "--sft", tmp / "ft", "-o", tmp / "out"]
    for option in ("--include", "--exclude"):
        message = run_cli(capsys, *extract, option, "layers.*", option, "layer.*.wieght")
        assert f"{option} 'layer.*.wieght' matches no tensor" in message and "layers." in message
        assert_nothing_left(tmp / "out")
    assert main([str(a) for a in [*extract[:-2], "-o", tmp / "gamma", "--exclude", "layers.1.*"]]) == 0
    message = run_cli(capsys, *merge_argv(tmp, "pt"), "--alpha", "0.5", "--alpha", "layers.1.*=2")
    assert "--alpha 'layers.1.*' matches no tensor of the vector" in message  # excluded from the vector
    assert_nothing_left(tmp / "out")


def test_bad_alpha_output_and_plot_arguments(models, capsys):
    tmp, _ = models
    main(["extract", "--aux", str(tmp / "ao"), "--sft", str(tmp / "ft"), "-o", str(tmp / "gamma")])
    for value in ("nan", "inf", "layers.*=-inf"):
        assert "finite" in run_cli(capsys, *merge_argv(tmp, "pt"), "--alpha", value)
        assert_nothing_left(tmp / "out")
    (tmp / "a_file").write_text("")
    message = run_cli(
        capsys, "merge", "--pretrained", tmp / "pt", "--vector", tmp / "gamma", "-o", tmp / "a_file" / "out"
    )
    assert "a_file is a file, not a folder" in message
    assert "unknown image format" in run_cli(capsys, "inspect", tmp / "gamma", "--plot", tmp / "plot.txt")
    assert not (tmp / "plot.txt").exists()


def test_a_failed_task_vector_leaves_neither_output(models, capsys, write_checkpoint):
    """extract writes gamma and tau together: a failure in either leaves neither."""
    tmp, states = models
    pt = dict(states["pt"], **{"layers.0.bias": torch.full((64,), float("nan"))})
    write_checkpoint(tmp / "pt_nan", pt, "sharded")
    argv = ["extract", "--aux", tmp / "ao", "--sft", tmp / "ft", "-o", tmp / "gamma", "--task-vector", tmp / "tau"]
    message = run_cli(capsys, *argv, "--pretrained", tmp / "pt_nan")
    assert "NaN or Inf" in message and "pt_nan" in message
    assert_nothing_left(tmp / "gamma")
    assert_nothing_left(tmp / "tau")
    pt_wide = dict(states["pt"], **{"layers.1.weight": torch.zeros(16, 65)})
    write_checkpoint(tmp / "pt_wide", pt_wide)
    assert "shape mismatch" in run_cli(capsys, *argv, "--pretrained", tmp / "pt_wide")
    assert_nothing_left(tmp / "gamma")
    assert_nothing_left(tmp / "tau")
    assert "two separate output folders" in run_cli(
        capsys, *argv[:-1], tmp / "gamma" / "tau", "--pretrained", tmp / "pt"
    )
    assert "needs --pretrained" in run_cli(capsys, *argv)
    assert_nothing_left(tmp / "gamma")
    assert main([str(a) for a in [*argv, "--pretrained", tmp / "pt"]]) == 0
    assert (tmp / "gamma" / "capvector.json").is_file() and (tmp / "tau" / "capvector.json").is_file()
