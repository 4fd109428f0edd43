"""Fuzzing the parameter-space commands with broken safetensors headers, shard indexes, adapter configs and vector
metadata. Every run must end in exit 2 with nothing at the output path, or exit 0 with a result that is correct
against an independent reader (safetensors' own) and independent arithmetic; never another exception (a traceback,
exit 1 from the console script), never a hang (a per-run time limit), never a partial output."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from capvector.cli import main

SECONDS_PER_RUN = 30  # far above a normal run (well under a second) even on a loaded machine
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run(*argv: object) -> int:
    """The command's exit code; any exception other than the CLI's own handling fails the test."""
    with time_limit(SECONDS_PER_RUN):
        return main([str(a) for a in argv])


def assert_refused_cleanly(code: int, output: Path) -> None:
    event(f"exit {code}")  # pytest --hypothesis-show-statistics: how often each outcome was reached
    assert code in (0, 2), code
    if code == 2:
        assert not os.path.lexists(output)
    assert not [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


def safetensors_refuses(path: Path) -> bool:
    try:
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                f.get_tensor(key)
    except Exception:
        return True
    return False


def assert_opens_with_safetensors(folder: Path) -> None:
    for file in folder.rglob("*.safetensors"):
        assert not safetensors_refuses(file), file


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), name
    assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name


# --- safetensors headers --------------------------------------------------------------------------------------------

GOOD = {"a": torch.linspace(-1, 1, 6).reshape(2, 3), "b": torch.tensor([0.5, -0.25, 2.0, 1.0]).bfloat16()}
SFT = {"a": torch.linspace(1, 2, 6).reshape(2, 3), "b": torch.tensor([1.5, 0.25, -2.0, 3.0]).bfloat16()}
DATA = GOOD["a"].numpy().tobytes() + GOOD["b"].view(torch.int16).numpy().tobytes()
ENTRIES = {
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
}
plausible = {
    "dtype": st.sampled_from(["F32", "BF16", "F16", "F64", "I8", "BOOL", "F33", "f32", "F8_E8M0", "C64", ""]),
    "shape": st.lists(st.sampled_from([0, 1, 2, 3, 4, 6, 8, -1, 2**62, 2**64]), max_size=3),
    "data_offsets": st.lists(st.sampled_from([0, 4, 8, 16, 24, 32, 40, -8, 2**64]), min_size=0, max_size=3),
}


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    entries = json.loads(json.dumps(ENTRIES))
    data, duplicate, prefix_delta, flips = DATA, False, 0, []
    metadata: object = {"format": "pt"}
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(
            st.sampled_from(
                ["field", "field", "drop", "add", "metadata", "metadata", "data", "duplicate", "prefix", "flip", "swap"]
            )
        )
        name = draw(st.sampled_from(["a", "b", "c"]))
        if kind == "field":
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
            value = draw(plausible.get(field, json_values) | json_values)
            entries.setdefault(name, {})[field] = value
        elif kind == "swap":  # the same tensors stored in the other order: a valid file
            entries.setdefault("a", {})["data_offsets"] = [8, 32]
            entries.setdefault("b", {})["data_offsets"] = [0, 8]
            data = DATA[24:] + DATA[:24]
        elif kind == "drop":
            entries.pop(name, None)
        elif kind == "add":
            entries[name] = {field: draw(strategy) for field, strategy in plausible.items()}
        elif kind == "metadata":
            metadata = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3) | json_values)
        elif kind == "data":
            data = data[: draw(st.integers(0, len(data)))] + bytes(draw(st.integers(0, 16)))
        elif kind == "duplicate":
            duplicate = True
        elif kind == "flip":  # a byte of the header overwritten
            flips.append((draw(st.integers(0, 10_000)), draw(st.integers(0, 255))))
        else:
            prefix_delta = draw(st.integers(-16, 16))
    header = {"__metadata__": metadata, **entries}
    encoded = json.dumps(header).encode()
    if duplicate and entries:  # the first entry given a second time, differently
        first = next(iter(entries))
        encoded = encoded[:-1] + b"," + json.dumps(first).encode() + b":" + json.dumps(ENTRIES["a"]).encode() + b"}"
    raw = bytearray(encoded)
    for position, value in flips:
        raw[position % len(raw)] = value
    return struct.pack("<Q", max(0, len(raw) + prefix_delta)) + bytes(raw) + data


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sft")
    save_file(SFT, folder / "model.safetensors")
    return folder


@FUZZ
@given(contents=safetensors_files())
def test_fuzz_safetensors_headers(sft_model: Path, contents: bytes) -> None:
    with tempfile.TemporaryDirectory() as work:
        tmp = Path(work)
        (tmp / "aux").mkdir()
        aux = tmp / "aux" / "model.safetensors"
        aux.write_bytes(contents)
        output = tmp / "gamma"
        code = run("extract", "--aux", tmp / "aux", "--sft", sft_model, "-o", output, "--no-hash")
        assert_refused_cleanly(code, output)
        if safetensors_refuses(aux):
            assert code == 2, "capvector read a file the safetensors library refuses"
        if code == 0:  # correct against safetensors' own reading of the same file
            assert_opens_with_safetensors(output)
            read = load_file(aux)
            gamma = load_file(output / "capvector.safetensors")
            assert gamma.keys() == {n for n in read if n in SFT}
            for name, value in gamma.items():
                assert_bitwise(value, read[name].float() - SFT[name].float(), name)
        code = run("inspect", tmp / "aux")
        assert code in (0, 2)


# --- shard indexes --------------------------------------------------------------------------------------------------

SHARDS = {
    "model-00001-of-00002.safetensors": {"x.0.w": torch.arange(12.0).reshape(3, 4), "x.1.w": torch.ones(5)},
    "model-00002-of-00002.safetensors": {"x.2.w": torch.full((2, 2), -3.0)},
}
VALID_MAP = {name: shard for shard, tensors in SHARDS.items() for name in tensors}
GAMMA = {name: torch.full(t.shape, 0.125) for tensors in SHARDS.values() for name, t in tensors.items()}


@pytest.fixture(scope="module")
def index_setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded model (the template), a trap outside it holding the same names with other values, and a vector."""
    root = tmp_path_factory.mktemp("index")
    (root / "pt").mkdir()
    for shard, tensors in SHARDS.items():
        save_file(tensors, root / "pt" / shard)
    (root / "pt" / "config.json").write_text("{}")
    (root / "pt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": VALID_MAP}))
    save_file({name: torch.full(t.shape, 1000.0) for name, t in GAMMA.items()}, root / "trap.safetensors")
    (root / "pt" / "link.safetensors").symlink_to(root / "trap.safetensors")
    (root / "gamma").mkdir()
    save_file(GAMMA, root / "gamma" / "capvector.safetensors")
    return root


shard_names = st.sampled_from(
    [
        *SHARDS,
        "../trap.safetensors",
        "link.safetensors",
        "/ABSOLUTE",
        "./model-00001-of-00002.safetensors",
        "sub/../model-00002-of-00002.safetensors",
        "missing.safetensors",
        "",
        ".",
        "config.json",
    ]
) | st.text(max_size=12)


@st.composite
def indexes(draw: st.DrawFn) -> object:
    kind = draw(st.sampled_from(["map", "map", "map", "any", "no_map"]))
    if kind == "any":
        return draw(json_values)
    weight_map: dict[str, object] = dict(VALID_MAP)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from([*VALID_MAP, "zz"]))
        if draw(st.booleans()):
            weight_map[name] = draw(shard_names | json_values)
        else:
            weight_map.pop(name, None)
    index: dict[str, object] = {"metadata": draw(json_values), "weight_map": weight_map}
    if kind == "no_map":
        del index["weight_map"]
    return index


@FUZZ
@given(index=indexes())
def test_fuzz_shard_indexes(index_setup: Path, index: object) -> None:
    with tempfile.TemporaryDirectory(dir=index_setup) as work:
        tmp = Path(work)
        shutil.copytree(index_setup / "pt", tmp / "pt", symlinks=True)
        text = json.dumps(index).replace("/ABSOLUTE", str(index_setup / "trap.safetensors"))
        (tmp / "pt" / "model.safetensors.index.json").write_text(text)
        output = tmp / "meta"
        code = run("merge", "--pretrained", tmp / "pt", "--vector", index_setup / "gamma", "-o", output)
        assert_refused_cleanly(code, output)
        if code == 0:  # every tensor from the model's own shards, plus gamma; an index that names only those
            assert_opens_with_safetensors(output)
            written = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
            merged = {}
            for shard in set(written.values()):
                path = output / shard
                assert path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(output.resolve())
                merged |= load_file(path)
            assert merged.keys() == written.keys() == GAMMA.keys()
            for shard, tensors in SHARDS.items():
                for name, value in tensors.items():
                    assert_bitwise(merged[name], value + GAMMA[name], name)
                    assert written[name].endswith(shard[-20:])


# --- adapter configs ------------------------------------------------------------------------------------------------

A = torch.linspace(-1, 1, 32).reshape(4, 8)  # rank 4, in_features 8
B = torch.linspace(0.5, -0.5, 48).reshape(12, 4)  # out_features 12
BASE = {"q.weight": torch.linspace(-2, 2, 96).reshape(12, 8), "q.bias": torch.zeros(12)}
config_fields = {  # a valid value first and most often (the adapter's weights have rank 4), then broken ones
    "r": st.sampled_from([4, 4, 4, 8, 2, 0, -4, 4.0, "4", True, None]),
    "lora_alpha": st.sampled_from([8, 16, 3.5, 0, -2, "8", None, True, float("inf")]),
    "use_rslora": st.sampled_from([False, True, None, "yes", 1]),
    "fan_in_fan_out": st.sampled_from([False, False, True, None, "no"]),
    "alpha_pattern": st.sampled_from([{}, {"q": 2}, {"^q$": 4.5}, {"k": 1}, {"q(": 2}, {"q": "2"}, None, []]),
    "rank_pattern": st.sampled_from([{}, {"q": 4}, {".*": 4}, {"q": 8}, {"q": 0}, None, "q"]),
    "peft_type": st.sampled_from(["LORA", "LORA", "IA3", None, 3]),
    "use_dora": st.sampled_from([False, False, None, True]),
}


@st.composite
def adapter_configs(draw: st.DrawFn) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    config: dict[str, object] = {"r": 4}
    for field in draw(st.sets(st.sampled_from([*config_fields, "other"]))):
        arbitrary = field not in config_fields or draw(st.integers(0, 4)) == 0
        config[field] = draw(json_values if arbitrary else config_fields[field])
    return config


def peft_scaling(config: dict[str, object]) -> tuple[float, bool]:
    """(scaling, transposed) as PEFT takes them for module 'q' (written from peft's LoraConfig and LoraLayer)."""

    def pattern_value(patterns: object, default: object) -> object:
        for pattern, value in (patterns or {}).items():  # type: ignore[attr-defined]
            if re.match(rf"(.*\.)?({pattern})$", "q"):
                return value
        return default

    r = pattern_value(config.get("rank_pattern"), config.get("r") if config.get("r") is not None else 8)
    alpha = pattern_value(
        config.get("alpha_pattern"), config.get("lora_alpha") if config.get("lora_alpha") is not None else 8
    )
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r  # type: ignore[operator]
    return float(scaling), bool(config.get("fan_in_fan_out"))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    save_file(BASE, folder / "model.safetensors")
    return folder


@FUZZ
@given(config=adapter_configs())
def test_fuzz_adapter_configs(base_model: Path, config: object) -> None:
    with tempfile.TemporaryDirectory() as work:
        tmp = Path(work)
        (tmp / "adapter").mkdir()
        save_file(
            {"base_model.model.q.lora_A.weight": A, "base_model.model.q.lora_B.weight": B},
            tmp / "adapter" / "adapter_model.safetensors",
        )
        (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(config))
        output = tmp / "gamma"
        code = run("extract", "--aux", tmp / "adapter", "--sft", base_model, "--pretrained", base_model, "-o", output)
        assert_refused_cleanly(code, output)
        if code == 0:  # the adapter's delta with PEFT's scaling, and a config PEFT would load for these weights
            assert isinstance(config, dict)
            scaling, transposed = peft_scaling(config)
            assert not transposed and config.get("peft_type", "LORA") in ("LORA", None)
            gamma = load_file(output / "capvector.safetensors")
            expected = (BASE["q.weight"] + scaling * (B @ A)) - BASE["q.weight"]
            torch.testing.assert_close(gamma["q.weight"], expected, rtol=1e-5, atol=1e-5)
            assert float(gamma["q.bias"].abs().max()) == 0.0


# --- vector metadata ------------------------------------------------------------------------------------------------


@FUZZ
@given(metadata=json_values, in_header=st.booleans())
def test_fuzz_vector_metadata(index_setup: Path, metadata: object, in_header: bool) -> None:
    with tempfile.TemporaryDirectory(dir=index_setup) as work:
        tmp = Path(work)
        (tmp / "gamma").mkdir()
        if in_header:  # a single-file vector keeps its metadata in the header only
            save_file(GAMMA, tmp / "gamma" / "capvector.safetensors", metadata={"capvector": json.dumps(metadata)})
        else:
            save_file(GAMMA, tmp / "gamma" / "capvector.safetensors")
            (tmp / "gamma" / "capvector.json").write_text(json.dumps(metadata))
        shutil.copytree(index_setup / "pt", tmp / "pt", symlinks=True)
        (tmp / "pt" / "link.safetensors").unlink()
        output = tmp / "meta"
        code = run("merge", "--pretrained", tmp / "pt", "--vector", tmp / "gamma", "-o", output)
        assert_refused_cleanly(code, output)
        assert code == (0 if isinstance(metadata, dict) else 2)
        assert run("inspect", tmp / "gamma") == code
